#!/usr/bin/env bash
# The bundled emoji32 model's training run (the recipe chosen by benchmarks/emoji32_recipe.py: tiny, v-prediction,
# AdamW 1e-3 with a cosine decay, EMA). Resumable: rerun the same command after any stop. Then:
#   python benchmarks/time_to_quality.py --run runs/emoji32        # FID at 15/30/60 training minutes
#   python scripts/bundle_emoji32.py --run runs/emoji32 --pipeline runs/emoji32/step_N
set -euo pipefail
ddpmkit train --dataset emoji --image_size 32 --class_column label --preset tiny --prediction_type v_prediction \
  --batch_size 64 --lr 1e-3 --lr_scheduler cosine --lr_warmup_steps 50 --use_ema --max_steps "${STEPS:-2100}" \
  --save_model_every 200 --checkpointing_steps 200 --resume_from_checkpoint latest --seed 0 \
  --cache_dir runs/.emoji-cache --output_dir runs/emoji32 "$@"
