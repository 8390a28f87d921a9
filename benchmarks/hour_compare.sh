#!/bin/bash
# Issue 20's comparison on the 45-minute CPU run runs/hour (RUN=runs/hour STEPS=2100 EVERY=525 bash
# benchmarks/hour_run.sh: tiny, 2,100 steps of 64, --posthoc_ema, --save_model_every 525): the run sampled plainly
# against autoguidance by the run's own early model, with the
# best post-hoc EMA length (benchmarks/results/hour_phema_sweep.json: sigma_rel 0.02). Each row is `ddpmkit eval`
# at 500 images, deis, per class, seed 0; a row whose JSON exists is skipped (resumable). The table:
# benchmarks/results/hour_compare.md.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/hour}
GUIDE=${GUIDE:-runs/hour-guide-half}
OUT=benchmarks/results/hour_compare
source benchmarks/hour_lib.sh
for step in 264 528 ""; do ema "$step" >/dev/null; done  # the 0.02 EMA at the end and at 1/8 and 1/4 of the run
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
# the purpose-trained half-width guide (benchmarks/hour_guide.sh: 0.79M parameters against 3.15M, 875 steps of 64)
row ema002-ag2.5-half438      --model "$RUN-ema0.02" --autoguide "$GUIDE/step_438" --autoguide_scale 2.5
row ema002-ag2.5-half875      --model "$RUN-ema0.02" --autoguide "$GUIDE" --autoguide_scale 2.5
.venv/bin/python benchmarks/hour_table.py "$OUT" "The one-hour CPU run: plain against post-hoc EMA and autoguidance (benchmarks/hour_compare.sh)" \
  "runs/hour at step 2,100;"
