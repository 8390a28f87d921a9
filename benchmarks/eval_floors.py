"""The measuring stick measured: feature-extraction throughput, and FID/KID/precision/recall of two disjoint
halves of a dataset (the floor) at several counts, which shows how FID's bias falls as the count grows.

Throughput: images/s of `InceptionFeatures` (uint8 in -> resize -> network -> numpy) against the network's
own forward pass on a batch already prepared, interleaved repeats, median ratio.
Floors: the two halves (`evaluation.dataset_halves`) are extracted once at the largest count through the same
feature cache `ddpmkit eval` uses (`evaluation.cached_features`); each smaller count is the first N of each half,
exactly the images `ddpmkit eval --vs_dataset D --split_fraction 0.5 --num_images N` selects. The figures are also
written to the package's shipped floors (`evaluation.write_shipped_floors`: src/ddpmkit/eval_floors.json), so
`ddpmkit eval` prints them beside a model's FID.

    .venv/bin/python benchmarks/eval_floors.py                 # emoji at 32x32: 250, 500, 1000, 2000
    .venv/bin/python benchmarks/eval_floors.py --counts 100,200 --no_ship   # a smoke run
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ddpmkit import evaluation as ev  # noqa: E402


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
        flags = next(line for line in out.splitlines() if line.startswith("Flags")).split()
        simd = [f for f in flags if f.startswith(("avx", "amx"))]
        return f"{model} ({', '.join(simd) or 'no AVX'}; {torch.get_num_threads()} torch threads)"
    except Exception:
        return platform.processor() or "unknown CPU"


def throughput(extractor: ev.InceptionFeatures, images: torch.Tensor, repeats: int) -> dict:
    prepared = ev.prepare_for_inception(images)
    extractor.forward(prepared)  # warm-up (TorchScript optimises on the first calls)
    extractor(images, progress=False)
    net, full = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        extractor.forward(prepared)
        net.append(images.shape[0] / (time.perf_counter() - t))
        t = time.perf_counter()
        extractor(images, progress=False)
        full.append(images.shape[0] / (time.perf_counter() - t))
    ratios = [f / n for f, n in zip(full, net)]
    stat = lambda xs: {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}  # noqa: E731
    return {"batch": images.shape[0], "repeats": repeats, "network_img_s": stat(net), "extractor_img_s": stat(full),
            "ratio": stat(ratios), "cpu": cpu_name(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="emoji")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--counts", default="250,500,1000,2000")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--skip_throughput", action="store_true",
                        help="keep the throughput figures of the previous results file (the floors only)")
    parser.add_argument("--no_ship", action="store_true", help="do not write src/ddpmkit/eval_floors.json")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval_floors"))
    args = parser.parse_args(argv)
    counts = sorted(int(c) for c in args.counts.split(","))
    extractor = ev.InceptionFeatures(device="cpu", batch_size=50)
    identity = extractor.identity

    largest = counts[-1]
    halves = ev.dataset_halves(args.dataset, args.image_size, 3, largest)
    previous = Path(args.out).with_suffix(".json")
    if args.skip_throughput and previous.exists():
        tp = json.loads(previous.read_text())["throughput"]
    else:
        tp = throughput(extractor, halves[0].images[:50], args.repeats)
    print(f"throughput: network {tp['network_img_s']['median']:.2f} img/s, extractor "
          f"{tp['extractor_img_s']['median']:.2f} img/s, ratio {tp['ratio']['median']:.3f}", flush=True)

    cache = ev.FeatureCache(args.cache_dir)
    features, extract_seconds = [], 0.0
    for half in halves:  # through the cache `ddpmkit eval` uses: a second run reads them
        t = time.perf_counter()
        f, status = ev.cached_features(half, extractor, cache, desc=f"features ({half.describe['part']})")
        extract_seconds += time.perf_counter() - t if status == "computed" else 0.0
        features.append(f)
    n_max = min(len(h) for h in halves)
    rows, shipped = [], {}
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for count in counts:
        if count > n_max:
            print(f"skip {count}: each half has {n_max} images")
            continue
        t = time.perf_counter()
        m = ev.compute_metrics(features[0][:count], features[1][:count])  # the first N of each half: count N's images
        floor = ev.floor_entry(m, count, 0.5, date)
        rows.append({k: floor[k] for k in ("count", "fid", "kid_mean", "kid_std", "precision", "recall")}
                    | {"metric_seconds": time.perf_counter() - t})
        print(f"{count:>5} per side: FID {m.fid:.3f}  KID {m.kid_mean:.5f} ± {m.kid_std:.5f}  "
              f"precision {m.precision:.3f}  recall {m.recall:.3f}", flush=True)
        shipped[ev.floor_key(args.dataset, args.image_size, 3, count, "train", identity)] = floor

    result = {"dataset": args.dataset, "image_size": args.image_size, "cpu": cpu_name(), "date": date,
              "torch": torch.__version__, "features": identity, "throughput": tp,
              "extract_seconds": extract_seconds, "floors": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Evaluation: the floor and feature throughput ({args.dataset}, {args.image_size}x{args.image_size})",
             "", f"Measured {date} on {result['cpu']}, torch {torch.__version__}, by `benchmarks/eval_floors.py`.",
             "", "Two disjoint halves of the dataset (seeded split, `--split_fraction 0.5`), N images a side:", "",
             "| N per side | FID | KID (mean ± std) | precision | recall |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['count']} | {r['fid']:.2f} | {r['kid_mean']:.5f} ± {r['kid_std']:.5f} | {r['precision']:.3f} | "
              f"{r['recall']:.3f} |" for r in rows]
    t = tp
    lines += ["", f"KID: 100 subsets of min(1000, N/2) images a side. Feature extraction, batch {t['batch']} "
              f"(median of {t.get('repeats', args.repeats)} interleaved repeats, min-max; measured {t.get('date', date)}):", "",
              "| | images/s |", "|---|---:|",
              f"| network forward alone (prepared 299x299 batch) | {t['network_img_s']['median']:.2f} "
              f"({t['network_img_s']['min']:.2f}-{t['network_img_s']['max']:.2f}) |",
              f"| `InceptionFeatures` (uint8 -> resize -> network -> numpy) | {t['extractor_img_s']['median']:.2f} "
              f"({t['extractor_img_s']['min']:.2f}-{t['extractor_img_s']['max']:.2f}) |",
              f"| ratio | {t['ratio']['median']:.3f} ({t['ratio']['min']:.3f}-{t['ratio']['max']:.3f}) |", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    if not args.no_ship:
        ev.write_shipped_floors(shipped)
    print(f"wrote {out.with_suffix('.md')} and .json" + ("" if args.no_ship else f"; floors in {ev.FLOORS_FILE}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
