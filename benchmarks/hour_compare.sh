#!/bin/bash
# Issue 20's one-hour CPU comparison on runs/hour (benchmarks/hour_run.sh: tiny, 2,100 steps of 64, --posthoc_ema,
# --save_model_every 525): the run sampled plainly against autoguidance by the run's own early model, with the
# best post-hoc EMA length (benchmarks/results/hour_phema_sweep.json: sigma_rel 0.02). Each row is `ddpmkit eval`
# at 500 images, deis, per class, seed 0; a row whose JSON exists is skipped (resumable). The table:
# benchmarks/results/hour_compare.md.
set -euo pipefail
cd "$(dirname "$0")/.."
DDPMKIT=${DDPMKIT:-.venv/bin/ddpmkit}
RUN=${RUN:-runs/hour}
OUT=benchmarks/results/hour_compare
mkdir -p "$OUT"
for step in 264 528 ""; do  # the EMA of length 0.02 at the end and at 1/8 and 1/4 of the run (the guides)
  dir="$RUN-ema0.02${step:+-step$step}"
  [ -d "$dir" ] || $DDPMKIT ema "$RUN" --sigma_rel 0.02 ${step:+--step $step} --out "$dir"
done
row() {  # name, then eval flags
  local name=$1; shift
  [ -f "$OUT/$name.json" ] && return
  $DDPMKIT eval --dataset emoji --per_class --num_images 500 --scheduler deis --out "$OUT/$name.json" "$@" \
    2>&1 | tr '\r' '\n' | grep -v '^sampling\|^features\|^ *$' > "$OUT/$name.log"
  grep -E '^FID' "$OUT/$name.log" || tail -5 "$OUT/$name.log"
}
row plain                     --model "$RUN" --autoguide none
row ag2-step525               --model "$RUN" --autoguide "$RUN/step_525" --autoguide_scale 2
row ema002-plain              --model "$RUN-ema0.02" --autoguide none
row ema002-ag2-step525        --model "$RUN-ema0.02" --autoguide "$RUN/step_525" --autoguide_scale 2
row ema002-ag3-step525        --model "$RUN-ema0.02" --autoguide "$RUN/step_525" --autoguide_scale 3
row ema002-ag2.5-step525      --model "$RUN-ema0.02" --autoguide "$RUN/step_525" --autoguide_scale 2.5
row ema002-ag3.5-step525      --model "$RUN-ema0.02" --autoguide "$RUN/step_525" --autoguide_scale 3.5
row ema002-ag4-step525        --model "$RUN-ema0.02" --autoguide "$RUN/step_525" --autoguide_scale 4
row ema002-ag2-ema002-step528 --model "$RUN-ema0.02" --autoguide "$RUN-ema0.02-step528" --autoguide_scale 2
row ema002-ag3-ema002-step528 --model "$RUN-ema0.02" --autoguide "$RUN-ema0.02-step528" --autoguide_scale 3
row ema002-ag3-ema002-step264 --model "$RUN-ema0.02" --autoguide "$RUN-ema0.02-step264" --autoguide_scale 3
row ema002-ag4-step1050       --model "$RUN-ema0.02" --autoguide "$RUN/step_1050" --autoguide_scale 4
.venv/bin/python - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}
base = rows.get("plain", {}).get("fid")
lines = ["| row | main model | guide | scale | model calls per image | FID (500 images) | plain / FID | KID | precision | recall |",
         "|---|---|---|---|---|---|---|---|---|---|"]
for name, r in sorted(rows.items(), key=lambda kv: -kv[1]["fid"]):
    m = r["settings"]["model"]; s = m["sampler"]
    calls = f"{m['nfe']} + {m['guide_calls']}" if m.get("guide_calls") else str(m["nfe"])
    ratio = f"{base / r['fid']:.2f}" if base else "-"
    lines.append(f"| {name} | {m['name']} | {s.get('autoguide', '-')} | {s.get('autoguide_scale', '-')} | {calls} | "
                 f"{r['fid']:.1f} | {ratio} | {r['kid_mean']:.4f} ± {r['kid_std']:.4f} | {r['precision']:.3f} | "
                 f"{r['recall']:.3f} |")
floor = next(iter(rows.values()))["floor"]
text = ("# The one-hour CPU run: plain against post-hoc EMA and autoguidance (benchmarks/hour_compare.sh)\n\n"
        f"runs/hour at step 2,100; `ddpmkit eval --per_class --num_images 500 --scheduler deis`, seed 0; "
        f"floor at 500 images: FID {floor['fid']:.1f}.\n\n" + "\n".join(lines) + "\n")
(out.parent / "hour_compare.md").write_text(text)
print(text)
PY
