"""Better images from the same model (issue 20): emoji32 plain, with CFG, with autoguidance, each also in a limited
interval of noise levels, at the fast `deis` and at the best sampler. One row per setting, `ddpmkit eval` on each.

Every row samples the classes in the data's proportions (`--per_class`), so that plain, CFG and autoguidance are
compared on the same labels, and is scored against the same reference images (2,000 emoji by default) with the
floor beside it. Each row also writes a grid, one line per category, to look at. Rows already in the results file
are kept (the script resumes where it stopped); `--rows` picks some.

    .venv/bin/python benchmarks/guidance_table.py                      # all rows, 2,000 images: hours on a CPU
    .venv/bin/python benchmarks/guidance_table.py --num_images 200 --rows plain-deis,ag2-deis --out /tmp/gt  # smoke
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

from ddpmkit.evaluation import evaluate  # noqa: E402
from ddpmkit.images import labelled_rows  # noqa: E402
from ddpmkit.models import class_names, load_pipeline  # noqa: E402
from ddpmkit.sampling import SamplerSettings, sample  # noqa: E402
from ddpmkit.tuning import cpu_model, native_bf16  # noqa: E402

GUIDE = "emoji32-guide"  # the earlier CPU-trained emoji32: the same architecture, 1/8 of the images seen
INTERVAL = "0.28,5.42"  # Kynkaanniemi et al. 2024's interval for SD-XL, in EDM's sigma (the first try)
SDE = {"scheduler": "dpm++sde"}  # auto's sampler (40 Karras steps, 79 calls): the best measured for emoji32

# id -> (what it is, sampler settings, cfg scale)
ROWS = {
    "plain-deis": ("plain", {"scheduler": "deis"}, 1.0),
    "cfg1.5-deis": ("CFG 1.5", {"scheduler": "deis"}, 1.5),
    "cfg2-deis": ("CFG 2", {"scheduler": "deis"}, 2.0),
    "cfg3-deis": ("CFG 3", {"scheduler": "deis"}, 3.0),
    "cfg2-interval-deis": (f"CFG 2 in sigma {INTERVAL}", {"scheduler": "deis", "guidance_interval": INTERVAL}, 2.0),
    "ag1.5-deis": ("autoguidance 1.5", {"scheduler": "deis", "autoguide": GUIDE, "autoguide_scale": 1.5}, 1.0),
    "ag2-deis": ("autoguidance 2", {"scheduler": "deis", "autoguide": GUIDE, "autoguide_scale": 2.0}, 1.0),
    "ag2.5-deis": ("autoguidance 2.5", {"scheduler": "deis", "autoguide": GUIDE, "autoguide_scale": 2.5}, 1.0),
    "ag3-deis": ("autoguidance 3", {"scheduler": "deis", "autoguide": GUIDE, "autoguide_scale": 3.0}, 1.0),
    "ag2-interval-deis": (f"autoguidance 2 in sigma {INTERVAL}",
                          {"scheduler": "deis", "autoguide": GUIDE, "autoguide_scale": 2.0,
                           "guidance_interval": INTERVAL}, 1.0),
    "plain-sde": ("plain", SDE, 1.0),
    "cfg2-sde": ("CFG 2", SDE, 2.0),
    "ag2-sde": ("autoguidance 2", {**SDE, "autoguide": GUIDE, "autoguide_scale": 2.0}, 1.0),
    "ag1.5-sde": ("autoguidance 1.5", {**SDE, "autoguide": GUIDE, "autoguide_scale": 1.5}, 1.0),
    "ag2.5-sde": ("autoguidance 2.5", {**SDE, "autoguide": GUIDE, "autoguide_scale": 2.5}, 1.0),
    "ag2-interval-sde": (f"autoguidance 2 in sigma {INTERVAL}",
                         {**SDE, "autoguide": GUIDE, "autoguide_scale": 2.0, "guidance_interval": INTERVAL}, 1.0),
    "cfg2-interval-sde": (f"CFG 2 in sigma {INTERVAL}", {**SDE, "guidance_interval": INTERVAL}, 2.0),
}


def grid(pipe, sampler: SamplerSettings, cfg_scale: float, path: Path, per_class: int = 6) -> None:
    """One line per category, `per_class` images each, seed 0: what the row's setting makes."""
    names = class_names("emoji32") or []
    labels = [k for k in range(len(names)) for _ in range(per_class)]
    out = sample(pipe, **sampler.kwargs(), num_images=len(labels), seed=0, class_labels=labels, cfg_scale=cfg_scale,
                 progress=False)
    labelled_rows(list(out.images.split(per_class)), names, path, scale=2)


def run_row(row_id: str, pipe, num_images: int, folder: Path) -> dict:
    what, settings, cfg_scale = ROWS[row_id]
    sampler = SamplerSettings(**settings)
    started = time.perf_counter()
    result = evaluate(model=pipe, dataset="emoji", num_images=num_images, per_class=True, sampler=sampler,
                      cfg_scale=cfg_scale, seed=0, progress=False)
    model = result.settings.get("model", {})
    grid(pipe, sampler, cfg_scale, folder / f"{row_id}.png")
    return {"row": row_id, "what": what, "settings": settings, "cfg_scale": cfg_scale, "fid": result.fid,
            "kid_mean": result.kid_mean, "kid_std": result.kid_std, "precision": result.precision,
            "recall": result.recall, "nfe": model.get("nfe"), "guide_calls": model.get("guide_calls", 0),
            "per_class": result.per_class, "floor": result.floor, "num_images": num_images,
            "seconds": round(time.perf_counter() - started, 1), "machine": machine()}


def machine() -> str:
    """The CPU a row was measured on, with what decides its sampling arithmetic (bf16 where it is native)."""
    return f"{cpu_model()}, {'AVX-512 with native bf16' if native_bf16('cpu') else 'no native bf16'}"


def write_markdown(results: dict, path: Path) -> None:
    rows = results["rows"]
    plain = {r["settings"]["scheduler"]: r["fid"] for r in rows.values() if r["what"] == "plain"}
    floor = next((r["floor"] for r in rows.values() if r.get("floor")), None)
    head = (f"emoji32, {results['num_images']} images (classes in the data's proportions) against as many emoji, "
            f"seed 0; guide {GUIDE}; floor at this count: FID {floor['fid']:.2f}" if floor else "floor: not known")
    lines = [head + f". {results['cpu']}, {results['date'][:10]}. Regenerate with `python benchmarks/guidance_table.py`.",
             "", "| row | setting | sampler | model calls per image | FID | FID / plain | KID | precision | recall |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows.values(), key=lambda r: (r["settings"]["scheduler"], r["fid"])):
        base = plain.get(r["settings"]["scheduler"])
        ratio = f"{r['fid'] / base:.2f}" if base else "n/a"
        calls = f"{r['nfe']}" + (f" + {r['guide_calls']}" if r["guide_calls"] else "")
        lines.append(f"| {r['row']} | {r['what']} | {r['settings']['scheduler']} | {calls} | {r['fid']:.1f} | {ratio} "
                     f"| {r['kid_mean']:.4f} ± {r['kid_std']:.4f} | {r['precision']:.3f} | {r['recall']:.3f} |")
    others = {r["machine"] for r in rows.values() if r.get("machine")}
    if others:  # rows measured since rows recorded their machine: each names it; the others are the head's
        lines += ["", "Rows that name their machine (the others: the head's): " + "; ".join(
            f"{m}: {', '.join(r['row'] for r in rows.values() if r.get('machine') == m)}" for m in sorted(others))]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help="row ids, comma-separated (default: all)")
    parser.add_argument("--num_images", type=int, default=2000)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "guidance_table"))
    args = parser.parse_args(argv)
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in wanted if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}: use {', '.join(ROWS)}")
    out = Path(args.out)
    folder = out.parent / (out.name + "_grids")
    folder.mkdir(parents=True, exist_ok=True)
    json_path = out.with_suffix(".json")
    results = json.loads(json_path.read_text()) if json_path.exists() else {}
    if results.get("num_images") != args.num_images:
        results = {"num_images": args.num_images, "rows": {}}
    for key, value in (("cpu", cpu_model()), ("torch", torch.__version__),
                       ("date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))):
        results.setdefault(key, value)  # the first rows' machine; later rows record their own
    pipe = load_pipeline("emoji32")
    for row_id in wanted:
        if row_id in results["rows"]:
            continue
        print(f"{row_id}: {ROWS[row_id][0]} ...", flush=True)
        results["rows"][row_id] = run_row(row_id, pipe, args.num_images, folder)
        row = results["rows"][row_id]
        print(f"{row_id}: FID {row['fid']:.2f}, KID {row['kid_mean']:.4f}, {row['seconds']:.0f} s", flush=True)
        json_path.write_text(json.dumps(results, indent=1) + "\n")  # after each row: a stopped run resumes here
        write_markdown(results, out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
