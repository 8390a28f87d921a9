#!/usr/bin/env bash
# `make demo`: Units 1 and 2 of the course on the built-in emoji data, on a CPU, in under 10 minutes.
# Everything lands in demo-output/. DEMO_STEPS sets the training length (default below).
set -euo pipefail
OUT=${DEMO_OUT:-demo-output}
STEPS=${DEMO_STEPS:-500}
FT_STEPS=${DEMO_FT_STEPS:-60}
mkdir -p "$OUT"
start=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - start ))s] $*"; }

stamp "Unit 1: the forward process (noise schedule and one emoji noised at 8 timesteps)"
ddpmkit -q schedule --dataset emoji --image_size 32 --out "$OUT/schedule.png"

stamp "Unit 1: train a tiny UNet2DModel from scratch on 4,009 emoji at 32x32 ($STEPS steps)"
ddpmkit train --dataset emoji --image_size 32 --preset tiny --batch_size 64 --max_steps "$STEPS" \
  --lr 1e-3 --lr_scheduler cosine --lr_warmup_steps 50 --use_ema --cache_dir "$OUT/.cache" \
  --output_dir "$OUT/emoji32"

stamp "Unit 1: DDPM sampling, 1000 steps, with the denoising trajectory"
ddpmkit sample --model "$OUT/emoji32" --scheduler ddpm --num_images 16 --seed 0 \
  --trajectory 125 --out "$OUT/samples_ddpm.png"

stamp "Unit 2: fast sampling with DDIM (40 steps) and DPM++ (20 steps)"
ddpmkit sample --model "$OUT/emoji32" --scheduler ddim --steps 40 --num_images 16 --seed 0 --out "$OUT/samples_ddim.png"
ddpmkit sample --model "$OUT/emoji32" --compare ddim:10,ddim:40,dpm++:10,dpm++:20 --num_images 8 --seed 0 \
  --out "$OUT/compare_schedulers.png"

stamp "Unit 2: fine-tune the demo model on one category (Smileys & Emotion, $FT_STEPS steps)"
ddpmkit finetune --start_model "$OUT/emoji32" --dataset "emoji:smileys-emotion" --image_size 32 --batch_size 32 \
  --max_steps "$FT_STEPS" --lr 1e-4 --cache_dir "$OUT/.cache" --output_dir "$OUT/finetune" \
  --model_save_name emoji32-smileys --save_model_every 1000
ddpmkit sample --model "$OUT/finetune/emoji32-smileys" --scheduler ddim --steps 40 --num_images 16 --seed 0 \
  --out "$OUT/samples_finetuned_ddim.png"

stamp "Unit 2: colour guidance on the demo model (the course's #BB2266 and #44CCAA), DDIM 40 steps"
for c in BB2266 44CCAA; do
  ddpmkit sample --model "$OUT/emoji32" --scheduler ddim --steps 40 --num_images 8 --seed 0 \
    --guide "color:#$c:5" --out "$OUT/guided_$c.png"
done

stamp "done in $(( $(date +%s) - start ))s: see $OUT/"
ls "$OUT"
