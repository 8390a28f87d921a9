#!/bin/bash
# The one-hour CPU run of issues 20 (item 4) and 21 (item 4): emoji32's recipe at batch 64, post-hoc EMA, a pipeline
# every EVERY steps, FID every EVERY. The default, 3,500 steps, is 60 quiet minutes on a 2-core AMD EPYC (AVX2) at
# 1.02 s a step (55-64 images/s), with a pipeline every 15 minutes (875 steps); the earlier run,
# RUN=runs/hour STEPS=2100 EVERY=525, was 45 minutes of a busier core (1.30 s a step); on a 2-core AMD EPYC with
# AVX-512 the default took 57 minutes (train_s 3,432 s) and gave other weights (other float kernels). Resumable: run
# it again after a stop (SIGTERM saves a checkpoint) and it continues. Then benchmarks/hour_compare.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/hour60}
STEPS=${STEPS:-3500}
EVERY=${EVERY:-875}
R=(); [ -d "$RUN/checkpoints" ] && R=(--resume_from_checkpoint latest)
exec "${DDPMKIT:-.venv/bin/ddpmkit}" train --dataset emoji --class_column label --cond_drop_prob 0.1 --preset tiny \
  --image_size 32 --batch_size 64 --lr 1e-3 --max_steps "$STEPS" --lr_warmup_steps 50 --lr_scheduler cosine \
  --prediction_type v_prediction --beta_schedule squaredcos_cap_v2 --use_ema --posthoc_ema \
  --save_model_every "$EVERY" --eval_every "$EVERY" --keep_best --checkpointing_steps 150 --output_dir "$RUN" "${R[@]}"
