"""The result of an evaluation: the four figures, the counts, the floor when known, per-class figures, what
reproduces them (`settings`, saved as JSON) and the lines `ddpmkit eval` prints, one figure a line."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ddpmkit.evaluation.nearest import nearest_lines


@dataclass
class EvalResult:
    """The four figures, the counts, the floor when known, per-class figures, and how to reproduce them."""

    fid: float
    kid_mean: float
    kid_std: float
    precision: float
    recall: float
    num_generated: int
    num_reference: int
    seconds: float
    floor: dict | None = None
    per_class: dict[str, dict] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    nearest: dict | None = None  # --nearest K: `evaluation.nearest.Nearest.to_dict()` (and the grid's path)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    def lines(self) -> list[str]:
        """What `ddpmkit eval` prints: one figure per line."""
        floor = self.floor
        ref = self.settings.get("reference", {})
        what = f"{ref.get('dataset', 'reference')}, {ref.get('image_size')}x{ref.get('image_size')}"
        if self.settings.get("is_floor"):
            fid_floor = (f"   (this is the floor: two disjoint samples of {ref.get('dataset')}; recorded for later "
                         f"runs at {self.num_generated} images)")
        elif floor:
            fid_floor = f"   (floor {floor['fid']:.2f}: two disjoint samples of {ref.get('dataset')} at {floor['count']} images)"
        elif self.settings.get("model", {}).get("class_labels") and "class" in ref:
            fid_floor = "   (one class: no floor)"
        else:
            fid_floor = "   (floor: not known for this dataset, size and count; measure it with --floor)"
        kid_floor = f"   (floor {floor['kid_mean']:.5f})" if floor else ""
        out = [f"FID        {self.fid:.3f}{fid_floor}",
               f"KID        {self.kid_mean:.5f} ± {self.kid_std:.5f}{kid_floor}",
               f"precision  {self.precision:.3f}" + (f"   (floor {floor['precision']:.3f})" if floor else ""),
               f"recall     {self.recall:.3f}" + (f"   (floor {floor['recall']:.3f})" if floor else ""),
               f"images     {self.num_generated} evaluated, {self.num_reference} reference ({what})"]
        out += [f"class      {name}: {_class_figures(c)}" for name, c in self.per_class.items()]
        if self.nearest:
            out += nearest_lines(self.nearest)
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items())
        out.append(f"time       {self.seconds:.1f} s ({parts})")
        return out


def _class_figures(c: dict) -> str:
    """One class's figures as far as its counts allow (`per_class_figures`: FID from as many images a side as the
    features have dimensions, KID with its spread from a few); the bar it missed, when it missed one."""
    counts = f"{c['num_generated']} vs {c['num_reference']}"
    if c.get("fid") is not None:
        kid = "" if c.get("kid_mean") is None else f", KID {c['kid_mean']:.4f} ± {c['kid_std']:.4f}"
        return f"FID {c['fid']:.2f}{kid} ({counts} images)"
    fid_bar = f"; FID needs {c['fid_min_images']} a side" if c.get("fid_min_images") else ""
    if c.get("kid_mean") is not None:
        return f"KID {c['kid_mean']:.4f} ± {c['kid_std']:.4f} ({counts} images{fid_bar})"
    kid_bar = f"; KID needs {c['kid_min_images']} a side" if c.get("kid_min_images") else ""
    return f"too few images for a figure ({counts}{kid_bar})"
