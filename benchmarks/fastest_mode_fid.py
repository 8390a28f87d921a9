"""Does the fastest sampling mode change the images? `ddpmkit eval` of the bundled emoji32 with `--dtype fp32` and
with `--dtype auto` (which may pick bf16, channels-last and a micro-batch), same sampler, seed and images, and the
FID, KID, precision and recall of each. On a CPU without native bf16, auto stays in fp32 and the two differ by float
rounding only; on one with avx512_bf16 or AMX (or a GPU) auto may run the UNet in bf16, and this is where its cost in
quality is measured. One JSON per kind of machine: fastest_mode_fid.json (no native bf16), fastest_mode_fid_bf16.json.

    .venv/bin/python benchmarks/fastest_mode_fid.py                      # 1,000 images a side: minutes on a CPU
    .venv/bin/python benchmarks/fastest_mode_fid.py --num_images 100 --out /tmp/fm.json   # a smoke run
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ddpmkit.tuning import cpu_flags, device_name, native_bf16  # noqa: E402

COMMAND = ("ddpmkit eval --model emoji32 --autoguide none --num_images {n} --scheduler deis --seed 0 "
           "--dtype {dtype}")


def run(dtype: str, num_images: int) -> dict:
    """One `ddpmkit eval`: its JSON, the UNet-call choice it logged and its wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "eval.json"
        cmd = [str(ROOT / ".venv/bin/ddpmkit"), *COMMAND.format(n=num_images, dtype=dtype).split()[1:],
               "--out", str(out)]
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        seconds = time.perf_counter() - started
        if proc.returncode:
            sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        result = json.loads(out.read_text())
    chose = re.search(r"UNet calls: (.*)", proc.stderr)
    result.update(seconds=round(seconds, 1), chose=chose.group(1).strip() if chose else None)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_images", type=int, default=1000)
    parser.add_argument("--out", default=None, help="default: benchmarks/results/fastest_mode_fid[_bf16].json")
    args = parser.parse_args()
    bf16 = native_bf16("cpu")
    out = Path(args.out or ROOT / "benchmarks/results" / f"fastest_mode_fid{'_bf16' if bf16 else ''}.json")
    simd = sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx")) or f in {"avx2", "fma"})
    results = {dtype: run(dtype, args.num_images) for dtype in ("fp32", "auto")}
    record = {"what": COMMAND.format(n=args.num_images, dtype="{fp32,auto}"),
              "machine": f"{device_name('cpu')}, native bf16: {bf16}; {' '.join(simd)}",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "auto_chose": results["auto"]["chose"],
              "fid_auto_over_fp32": results["auto"]["fid"] / results["fp32"]["fid"], **results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    for dtype, r in results.items():
        print(f"--dtype {dtype}: FID {r['fid']:.3f}, KID {r['kid_mean']:.4f} ± {r['kid_std']:.4f}, precision "
              f"{r['precision']:.3f}, recall {r['recall']:.3f}, {r['seconds']} s ({r['chose']})")
    print(f"auto / fp32 FID: {record['fid_auto_over_fp32']:.4f}; written to {out}")


if __name__ == "__main__":
    main()
