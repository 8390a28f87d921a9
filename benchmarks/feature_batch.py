"""Inception feature extraction on a CPU at several images per forward: which batch is fastest, and are the
features the same at every batch (InceptionFeatures' CPU default, features.CPU_BATCH, is chosen from this).

Each repeat extracts the same 50 emoji (uint8 in -> clean resize -> network -> numpy) once at every batch size, in
turn (interleaved, so a machine's slow minute hits all of them); the figure is the median images/s and its ratio
to batch 50 (the default before 2026-12-07) in the same run. Writes benchmarks/results/feature_batch.{json,md}.

    .venv/bin/python benchmarks/feature_batch.py               # about 5 minutes on 2 cores
    .venv/bin/python benchmarks/feature_batch.py --repeats 1 --out /tmp/fb   # a smoke run
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ddpmkit import evaluation as ev  # noqa: E402
from ddpmkit.evaluation.features import CPU_BATCH  # noqa: E402
from eval_floors import cpu_name  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="5,10,16,25,50")
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "feature_batch"))
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    images = ev.dataset_halves("emoji", 32, 3, args.images)[0].images[:args.images]
    extractors = {b: ev.InceptionFeatures(device="cpu", batch_size=b) for b in batches}
    reference = extractors[max(batches)](images, progress=False)  # also the warm-up of the largest
    rates = {b: [] for b in batches}
    differences = {}
    for b in batches:  # warm-up, and the features at each batch against the largest's
        differences[b] = float(np.abs(extractors[b](images, progress=False) - reference).max())
    for _ in range(args.repeats):
        for b in batches:
            t = time.perf_counter()
            extractors[b](images, progress=False)
            rates[b].append(images.shape[0] / (time.perf_counter() - t))
    base = statistics.median(rates[max(batches)])
    rows = [{"batch": b, "img_s": statistics.median(rates[b]), "min": min(rates[b]), "max": max(rates[b]),
             "ratio_to_largest": statistics.median(rates[b]) / base, "max_abs_feature_difference": differences[b]}
            for b in batches]
    result = {"cpu": cpu_name(), "torch": torch.__version__, "images": args.images, "repeats": args.repeats,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "default_cpu_batch": CPU_BATCH, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Inception features on a CPU: images per forward", "",
             f"{result['cpu']}, torch {torch.__version__}, {args.images} emoji at 32x32 resized to 299x299, "
             f"median of {args.repeats} interleaved repeats ({result['date']}). ddpmkit's CPU default: {CPU_BATCH}.",
             "", "| batch | images/s | min-max | vs batch " + str(max(batches)) + " | max feature difference |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['batch']} | {r['img_s']:.2f} | {r['min']:.2f}-{r['max']:.2f} | {r['ratio_to_largest']:.2f}x | "
              f"{r['max_abs_feature_difference']:.1e} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
