"""Cost of loss guidance relative to unguided sampling at the same steps (tiny preset, 32x32, colour loss).

The runs are interleaved (unguided, shortcut, full, unguided, ...) so a change in machine load hits
every method alike; a ratio is the median over repeats of guided / unguided time within the same
repeat. Targets: shortcut <= 1.3x, full <= 3.5x.

    .venv/bin/python benchmarks/guidance_cost.py            # writes benchmarks/results/guidance_cost.{json,md}
    .venv/bin/python benchmarks/guidance_cost.py --quick    # a smoke run
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ddpmkit.guidance import ColorLoss, Guide, LossGuidance  # noqa: E402
from ddpmkit.models import build_unet, new_noise_scheduler  # noqa: E402
from ddpmkit.sampling import sample  # noqa: E402

TARGETS = {"shortcut": 1.3, "full": 3.5}


def make_pipeline(image_size: int, device: str):
    """The tiny preset with random weights: the cost of a UNet call does not depend on its training."""
    from diffusers import DDPMPipeline

    torch.manual_seed(0)
    unet = build_unet("tiny", image_size=image_size).to(device)
    return DDPMPipeline(unet=unet, scheduler=new_noise_scheduler())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheduler", default="ddim")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--num_images", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine a contended second thread makes "
                             "times erratic)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="2 repeats of 5 steps")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "guidance_cost"))
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = 5, 2
    torch.set_num_threads(args.threads)
    pipe = make_pipeline(args.image_size, args.device)
    methods = {
        "unguided": None,
        "shortcut": LossGuidance(Guide(ColorLoss("#BB2266"), 40.0), method="shortcut"),
        "full": LossGuidance(Guide(ColorLoss("#BB2266"), 40.0), method="full"),
    }

    def run(guidance) -> float:
        start = time.perf_counter()
        sample(pipe, args.scheduler, steps=args.steps, num_images=args.num_images, seed=0, guidance=guidance,
               progress=False)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for guidance in methods.values():  # warm-up: allocator, kernels, lazy imports
        run(guidance)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, guidance in methods.items():
            times[name].append(run(guidance))
    median = {name: statistics.median(ts) for name, ts in times.items()}
    # paired: each repeat's guided time over the unguided time of the same repeat, then the median
    ratios = {name: statistics.median(t / u for t, u in zip(times[name], times["unguided"]))
              for name in ("shortcut", "full")}
    result = {
        "benchmark": "guidance_cost",
        "setup": {"preset": "tiny", "image_size": args.image_size, "scheduler": args.scheduler, "steps": args.steps,
                  "num_images": args.num_images, "repeats": args.repeats, "threads": args.threads,
                  "device": args.device, "loss": "color #BB2266, scale 40", "torch": torch.__version__,
                  "machine": platform.processor() or platform.machine()},
        "median_seconds": {k: round(v, 4) for k, v in median.items()},
        "all_seconds": {k: [round(t, 4) for t in ts] for k, ts in times.items()},
        "ratio_to_unguided": {k: round(v, 3) for k, v in ratios.items()},
        "targets": TARGETS,
        "meets_targets": {k: ratios[k] <= TARGETS[k] for k in TARGETS},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Guidance cost",
        "",
        f"Tiny preset, {args.image_size}x{args.image_size}, {args.scheduler} {args.steps} steps, {args.num_images} "
        f"images per batch, {args.device} ({args.threads} thread(s)), {args.repeats} interleaved repeats; "
        "ratio = median over repeats of guided / unguided time; colour loss. Written by `benchmarks/guidance_cost.py`.",
        "",
        "| method | median s | x unguided | target | met |",
        "|---|---|---|---|---|",
        f"| unguided | {median['unguided']:.3f} | 1.00 | | |",
    ]
    for name in ("shortcut", "full"):
        lines.append(f"| {name} | {median[name]:.3f} | {ratios[name]:.2f} | <= {TARGETS[name]} | "
                     f"{'yes' if ratios[name] <= TARGETS[name] else 'NO'} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[5:]))
    return 0 if all(result["meets_targets"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
