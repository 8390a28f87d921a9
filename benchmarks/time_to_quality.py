"""FID against wall-clock training minutes: evaluate the pipelines a run saved along the way (--save_model_every).

    python benchmarks/time_to_quality.py --run runs/emoji32 [--minutes 15 30 60] [--num_images 1000]

For each target minute, the saved pipeline (RUN/step_N) whose training time (`train_s` in RUN/loss.jsonl, summed over
resumed runs) is nearest is scored with `ddpmkit eval --per_class` against the emoji data. Each result is kept as
RUN/step_N/eval_<count>.json (a rerun skips it). Writes benchmarks/results/time_to_quality.{json,md} and
docs/time_to_quality.png (FID against minutes, with the floor at the same count).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from ddpmkit import runs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--minutes", type=float, nargs="+", default=[15, 30, 60])
    parser.add_argument("--num_images", type=int, default=1000)
    parser.add_argument("--scheduler", default="auto")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    run = Path(args.run)
    log = runs.read_loss_log(run)
    minutes_at = {r["step"]: r["train_s"] / 60 for r in log if "train_s" in r}
    snapshots = {int(p.name[5:]): p for p in run.glob("step_*") if (p / "model_index.json").is_file()}
    if not snapshots:
        sys.exit(f"{run} has no saved pipelines (step_N): train with --save_model_every")
    from ddpmkit.tuning import cpu_model

    cpu = cpu_model()
    rows = []
    for target in args.minutes:
        step = min(snapshots, key=lambda s: abs(minutes_at.get(s, 1e9) - target))
        if abs(minutes_at.get(step, 1e9) - target) > 5:
            print(f"no snapshot within 5 minutes of {target} min (nearest: step {step}); skipped")
            continue
        out = snapshots[step] / f"eval_{args.num_images}.json"
        cmd = ["eval", "--model", str(snapshots[step]), "--dataset", "emoji", "--per_class", "--num_images",
               str(args.num_images), "--seed", "0", "--scheduler", args.scheduler, "--out", str(out)]
        if args.steps:
            cmd += ["--steps", str(args.steps)]
        if not out.exists():
            subprocess.run([sys.executable, "-m", "ddpmkit", "-q", *cmd], check=True)
        e = json.loads(out.read_text())
        rows.append({"target_minutes": target, "minutes": round(minutes_at[step], 1), "step": step,
                     "images_seen": step * 64, "fid": e["fid"], "kid": e["kid_mean"], "kid_std": e["kid_std"],
                     "precision": e["precision"], "recall": e["recall"], "floor_fid": (e.get("floor") or {}).get("fid"),
                     "command": "ddpmkit " + " ".join(cmd)})
    report = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu, "run": str(run), "num_images": args.num_images,
              "train_command": runs.read_train_config(run), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "time_to_quality.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Time to quality ({report['date']}, {cpu})", "",
             f"`ddpmkit eval --per_class`, {args.num_images} images a side, sampler {args.scheduler}, seed 0.", "",
             "| training minutes | step | images seen | FID | floor | KID | precision | recall |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        floor = f"{r['floor_fid']:.1f}" if r["floor_fid"] is not None else "n/a"
        lines.append(f"| {r['minutes']} | {r['step']} | {r['images_seen']:,} | {r['fid']:.1f} | {floor} | "
                     f"{r['kid']:.4f} ± {r['kid_std']:.4f} | {r['precision']:.3f} | {r['recall']:.3f} |")
    (RESULTS / "time_to_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
        ax.plot([r["minutes"] for r in rows], [r["fid"] for r in rows], "o-", label="emoji32 recipe")
        if rows[-1]["floor_fid"] is not None:
            ax.axhline(rows[-1]["floor_fid"], color="gray", ls="--", label=f"floor at {args.num_images} images")
        ax.set_xlabel(f"training minutes ({cpu}, 2 cores)", fontsize=7)
        ax.set_ylabel("FID")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(ROOT / "docs" / "time_to_quality.png")


if __name__ == "__main__":
    main()
