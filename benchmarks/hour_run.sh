#!/bin/bash
# The one-hour CPU run of issues 20 (item 4) and 21 (item 4): emoji32's recipe at batch 64, 2,100 steps
# (45 minutes on a quiet 2-core AMD EPYC at 1.30 s a step), post-hoc EMA, a pipeline every 525 steps, FID every 525.
# Resumable: run it again after a stop (SIGTERM saves a checkpoint) and it continues. Then benchmarks/hour_compare.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/hour}
R=(); [ -d "$RUN/checkpoints" ] && R=(--resume_from_checkpoint latest)
exec "${DDPMKIT:-.venv/bin/ddpmkit}" train --dataset emoji --class_column label --cond_drop_prob 0.1 --preset tiny \
  --image_size 32 --batch_size 64 --lr 1e-3 --max_steps 2100 --lr_warmup_steps 50 --lr_scheduler cosine \
  --prediction_type v_prediction --beta_schedule squaredcos_cap_v2 --use_ema --posthoc_ema \
  --save_model_every 525 --eval_every 525 --keep_best --checkpointing_steps 150 --output_dir "$RUN" "${R[@]}"
