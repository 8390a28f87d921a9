#!/usr/bin/env bash
# The bundled emoji32 model's training command: tiny, v-prediction, AdamW 1e-3 with a cosine decay, EMA, batch 256,
# 4,125 steps (about 4 minutes on an H100; trained there by benchmarks/gpu_session.sh, where tiny beat small at the
# same wall time: benchmarks/results/emoji32_gpu.md). On a 2-core CPU (40-60 images/s) the same steps take 5-7 hours;
# STEPS=2100 BATCH=64 is about one CPU hour (the time-to-quality curve in docs/performance.md). Resumable: rerun the same command
# after any stop. Then:
#   python scripts/bundle_emoji32.py --run runs/emoji32 --hardware "what it ran on"
# This is the bundled model's first stage. Its second and third, 7,000 and then 1,500 more steps on a 2-core CPU
# with post-hoc EMA, are `bash benchmarks/emoji32_cpu_ft.sh train` (RUN=runs/emoji32-ft, then runs/emoji32-ft2; stage 4: -ft3),
# each bundled with (the model card lists every stage)
#   python scripts/bundle_emoji32.py --run runs/emoji32-ft2 --pipeline runs/emoji32-ft2-ema0.10-step1500
set -euo pipefail
ddpmkit train --dataset emoji --image_size 32 --class_column label --preset tiny --prediction_type v_prediction \
  --batch_size "${BATCH:-256}" --lr 1e-3 --lr_scheduler cosine --lr_warmup_steps 100 --use_ema \
  --max_steps "${STEPS:-4125}" --save_model_every 500 --checkpointing_steps 500 --resume_from_checkpoint latest \
  --seed 0 --cache_dir runs/.emoji-cache --output_dir runs/emoji32 "$@"
