"""How far colour guidance moves the bundled model's images with every scheduler at its own defaults.

A scale is the push of the course's 40 DDIM steps, spread over a run's noise levels (twice that for an SDE sampler),
so that one scale means about the same at 15 DEIS steps as at 1000 DDPM steps. This measures it: for each scheduler
at its defaults, the colour loss (mean |x0 - colour|, the course's color_loss per image) of guided images over that
of the same images unguided, same seed and class labels. tests/test_guidance.py holds every scheduler to
0.35-0.75 (2 images each).

    .venv/bin/python benchmarks/guidance_strength.py            # benchmarks/results/guidance_strength.{json,md}
    .venv/bin/python benchmarks/guidance_strength.py --quick    # 2 images, 3 schedulers: a smoke run
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ddpmkit.guidance import ColorLoss, build_guidance  # noqa: E402
from ddpmkit.models import load_pipeline  # noqa: E402
from ddpmkit.sampling import sample  # noqa: E402
from ddpmkit.schedulers import REGISTRY, settings_label  # noqa: E402
from ddpmkit.tuning import cpu_model  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="emoji32")
    parser.add_argument("--color", default="#44CCAA")
    parser.add_argument("--scales", default="10,40")
    parser.add_argument("--num_images", type=int, default=4)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "guidance_strength"))
    args = parser.parse_args(argv)
    names = ["course", "ddim", "dpm++", "deis"] if args.quick else ["course", *REGISTRY, "auto"]
    n = 2 if args.quick else args.num_images
    pipe = load_pipeline(args.model)
    loss = ColorLoss(args.color)
    labels = torch.arange(n) % ((pipe.unet.config.num_class_embeds or 1) - 1 or 1) if pipe.unet.config.num_class_embeds \
        else None
    scales = [float(s) for s in args.scales.split(",")]
    rows, started = [], time.perf_counter()
    for name in names:
        sampler = {"scheduler": "ddim", "steps": 40} if name == "course" else {"scheduler": name}
        common = dict(num_images=n, seed=0, class_labels=labels, progress=False, dtype="fp32", **sampler)
        plain = sample(pipe, **common)
        before = float(loss(plain.images).mean())
        row = {"row": name, "setting": settings_label(plain.settings["scheduler"], plain.settings,
                                                       plain.settings["steps"]),
               "nfe": plain.nfe, "unguided": before, "ratios": {}}
        for scale in scales:
            guided = sample(pipe, guidance=build_guidance([f"color:{args.color}:{scale:g}"]), **common)
            row["ratios"][f"{scale:g}"] = float(loss(guided.images).mean()) / before
        rows.append(row)
        print(row["row"], row["setting"], {k: round(v, 3) for k, v in row["ratios"].items()}, flush=True)
    result = {"model": args.model, "color": args.color, "num_images": n, "rows": rows, "cpu": cpu_model(),
              "seconds": round(time.perf_counter() - started, 1),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    head = " | ".join(f"scale {s:g}" for s in scales)
    lines = [f"Colour guidance towards {args.color} on {args.model}, {n} images, seed 0, each scheduler at its "
             f"defaults; colour loss guided / unguided (lower: moved further). {result['cpu']}, {result['date'][:10]}, "
             f"{result['seconds']:.0f} s. Regenerate with `python benchmarks/guidance_strength.py`.", "",
             f"| row | setting | model calls | unguided loss | {head} |", "|---|---|---|---|" + "---|" * len(scales)]
    for r in rows:
        lines.append(f"| {r['row']} | {r['setting']} | {r['nfe']} | {r['unguided']:.3f} | "
                     + " | ".join(f"{r['ratios'][f'{s:g}']:.2f}" for s in scales) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
