"""Side-by-side grids of an hour run: plain sampling against the best setting, one line per category.

    python benchmarks/hour_grids.py --plain runs/hour60 --best runs/hour60-ema0.02 --guide runs/hour60-ema0.02-step876 \
        --scale 2.5 --out benchmarks/results/hour60_compare_grids/side_by_side.png

Both sides sample the same labels with the same seed (1: not the evaluation's 0) and sampler (`--scheduler`, default
`deis`), 8 images per category
(the categories the run has: emoji's "Component" has too few images to be sampled by eval either)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ddpmkit.images import labelled_rows  # noqa: E402
from ddpmkit.models import class_names, load_pipeline  # noqa: E402
from ddpmkit.sampling import SamplerSettings, sample  # noqa: E402


def side(model: str, names: list[str], per_class: int, seed: int, path: Path, scheduler: str = "deis",
         **guide) -> Path:
    pipe = load_pipeline(model)
    kept = [(k, name) for k, name in enumerate(names) if name != "Component"]
    labels = [k for k, _ in kept for _ in range(per_class)]
    sampler = SamplerSettings(scheduler=scheduler, **guide)
    out = sample(pipe, **sampler.kwargs(), num_images=len(labels), seed=seed, class_labels=labels, cfg_scale=1.0,
                 progress=False)
    return labelled_rows(list(out.images.split(per_class)), [name for _, name in kept], path, scale=2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plain", required=True, help="the run's pipeline, sampled plainly")
    parser.add_argument("--best", required=True, help="the pipeline of the best setting (e.g. a post-hoc EMA)")
    parser.add_argument("--guide", required=True, help="its autoguidance guide")
    parser.add_argument("--scale", type=float, required=True, help="the autoguidance scale")
    parser.add_argument("--per_class", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scheduler", default="deis", help="the sampler of both sides (default: deis)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = Path(args.out)
    names = class_names(args.plain)
    left = side(args.plain, names, args.per_class, args.seed, out.with_name(out.stem + "_plain.png"), args.scheduler)
    right = side(args.best, names, args.per_class, args.seed, out.with_name(out.stem + "_best.png"), args.scheduler,
                 autoguide=args.guide, autoguide_scale=args.scale)
    a, b = Image.open(left), Image.open(right)
    canvas = Image.new("RGB", (a.width + b.width + 10, a.height + 16), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), f"plain: {Path(args.plain).name} ({args.scheduler})", fill="black")
    draw.text((a.width + 14, 2), f"{Path(args.best).name} + AG {args.scale:g} by {Path(args.guide).name}", fill="black")
    canvas.paste(a, (0, 16))
    canvas.paste(b, (a.width + 10, 16))
    canvas.save(out)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
