#!/bin/bash
# A purpose-trained smaller guide for the one-hour CPU run (issue 20; EDM2's autoguidance pairs each main network
# with a smaller one trained for a fraction of its images): `tiny` at half its width (benchmarks/hour_guide_unet.json,
# 0.79M parameters against 3.15M), emoji32's recipe, 875 steps of 64 with a pipeline every 219 (13.5 minutes on one core
# of the 2-core AMD EPYC beside another job, 69 images/s). Resumable. RUN, STEPS and EVERY set the folder, the length
# and the pipeline interval; MP=bf16 trains in bf16 autocast (440 images/s alone on an EPYC with native bf16): the
# half-width guides tried for the bundled emoji32 in docs/quality.md were trained so.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/hour-guide-half}
STEPS=${STEPS:-875}
EVERY=${EVERY:-219}
EXTRA=(); [ -d "$RUN/checkpoints" ] && EXTRA=(--resume_from_checkpoint latest)
[ -n "${MP:-}" ] && EXTRA+=(--mixed_precision "$MP")
exec "${DDPMKIT:-.venv/bin/ddpmkit}" train --dataset emoji --class_column label --cond_drop_prob 0.1 \
  --unet_config benchmarks/hour_guide_unet.json --image_size 32 --batch_size 64 --lr 1e-3 --max_steps "$STEPS" \
  --lr_warmup_steps 50 --lr_scheduler cosine --prediction_type v_prediction --beta_schedule squaredcos_cap_v2 \
  --use_ema --save_model_every "$EVERY" --checkpointing_steps 150 --output_dir "$RUN" "${EXTRA[@]}"
