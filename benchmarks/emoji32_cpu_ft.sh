#!/bin/bash
# Issue 20's FID target without a GPU: emoji32 trained on, on the 2-core CPU, from its bundled weights, with post-hoc
# EMA, then measured as the bundled model is. runs/emoji32-ft (stage 2) started from the GPU stage (1.06M images
# seen); its step-7,000 EMA 0.10 was bundled on 2026-12-05. That run folder did not survive into the next session
# (runs/ is not kept between sessions on these machines), so stage 3, runs/emoji32-ft2, started again from the bundled
# weights: a fresh run (no checkpoint in RUN) starts from whatever is bundled. Stage 3 trained over eight sessions and
# was bundled at its step 17,800; its folder was lost with the machine on 2026-12-06 (at step 18,754, not bundled),
# so stage 4, runs/emoji32-ft3 (the default RUN now), started from the step-17,800 bundle; it was bundled at its
# step 8,200 and then at its step 11,900 (EMA 0.15, the sweep's best there) on 2026-12-06. Stage 5, runs/emoji32-cd,
# is a cool-down from that bundle (SCHEDULE=linear MAX_STEPS=1500 train, then RUN=runs/emoji32-cd sweep), measured
# on 2026-12-06 (docs/quality.md: 24.4 guided, 30.6 plain); its weights were lost before they were bundled, so a rerun
# starts from the step-11,900 bundle again (about 54 minutes in bf16 on an AVX-512 EPYC, 4 hours in fp32 on AVX2).
# A step of RUN is bundled with scripts/bundle_emoji32.py --run RUN --pipeline DIR: a new stage in the model card for
# a new RUN, or a replacement of its stage for a later step of the run bundled last.
#   bash benchmarks/emoji32_cpu_ft.sh train    train on (resumable: run it again after a stop, SIGTERM saves a
#                                              checkpoint); bf16 autocast where the CPU has it natively (2x fp32 on
#                                              an AVX-512 EPYC: 1.9 s a step of 256, 133 images/s; 1.2 s, 206
#                                              images/s on a family-26 EPYC), fp32 elsewhere;
#                                              a constant lr 3e-4 (the bundled run's cosine ended at 0), a post-hoc
#                                              EMA snapshot every 100 steps, a pipeline every 500; SCHEDULE=linear
#                                              MAX_STEPS=N makes it a cool-down instead: lr 3e-4 falling linearly to
#                                              0 at step N (stage 5, runs/emoji32-cd: 1,500 steps)
#   bash benchmarks/emoji32_cpu_ft.sh sweep    FID of the post-hoc EMA lengths LENGTHS at the last snapshot, plain, at
#                                              deis, 1,000 images (the GPU stage there: 122.3, docs/quality.md)
#   bash benchmarks/emoji32_cpu_ft.sh default  the post-hoc EMA of length SIGMA (the sweep's best at that step where
#                                              it was swept, else 0.10) at the last snapshot as a
#                                              pipeline, and its FID at 2,000 images as `ddpmkit eval --per_class`
#                                              measures the bundled default (autoguidance 2 by emoji32-guide, the
#                                              default sampler); each stage's and bundle's figures are in
#                                              docs/quality.md (54.9 for the GPU stage, 27.3 for stage 3's step
#                                              17,800, 25.9 for stage 4's step 8,200, 25.6 for its
#                                              step 11,900 bundled now, EMA 0.15; floor 17.2)
#   bash benchmarks/emoji32_cpu_ft.sh scales   the bundled emoji32 guided by GUIDE (emoji32-guide; or a pipeline
#                                              folder) at each of SCALES (1.5,2,2.5), the default sampler, 1,000
#                                              images (SCALE_IMAGES): is the stored guide and scale still the best
#                                              on the weights bundled now
# Rows are JSON in OUT, skipped when there (resumable).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/emoji32-ft3}
OUT=${OUT:-benchmarks/results/emoji32_cpu_ft}
LENGTHS=${LENGTHS:-0.05,0.10,0.15,0.20}
SIGMA=${SIGMA:-}
SCALES=${SCALES:-1.5,2,2.5}
SCALE_IMAGES=${SCALE_IMAGES:-1000}
GUIDE=${GUIDE:-emoji32-guide}
SCHEDULE=${SCHEDULE:-constant_with_warmup}
MAX_STEPS=${MAX_STEPS:-30000}
DDPMKIT=${DDPMKIT:-.venv/bin/ddpmkit}
mkdir -p "$OUT"
last_step() { ls "$RUN/phema" | sed -n 's/^step_0*\([0-9]*\)\.safetensors$/\1/p' | sort -n | tail -1; }
case ${1:-} in
  train)
    mp=no; grep -q -e avx512_bf16 -e amx_bf16 /proc/cpuinfo && mp=bf16
    exec "$DDPMKIT" train --init_from emoji32 --dataset emoji --class_column label --batch_size 256 \
      --lr 3e-4 --lr_scheduler "$SCHEDULE" --lr_warmup_steps 100 --max_steps "$MAX_STEPS" --mixed_precision "$mp" \
      --posthoc_ema --posthoc_ema_every 100 --save_model_every 500 --checkpointing_steps 100 \
      --checkpoints_total_limit 2 --resume_from_checkpoint latest --cache_dir runs/.emoji-cache --output_dir "$RUN" \
      --log_every 20 ;;
  sweep)
    name=sweep-step$(last_step)
    [ -f "$OUT/$name.json" ] || "$DDPMKIT" eval --model "$RUN" --sigma_rel "$LENGTHS" --dataset emoji --per_class \
      --num_images 1000 --scheduler deis --autoguide none --seed 0 --out "$OUT/$name.json" 2>&1 | tr '\r' '\n' \
      | grep -v '^sampling\|^features\|^ *$' | tee "$OUT/$name.log" ;;
  default)
    step=$(last_step)
    # SIGMA unset: the best length of this step's sweep where one was run (0.15 at step 11,900), else 0.10
    [ -n "$SIGMA" ] || SIGMA=$(python3 -c "import json,sys; print('%.2f' % json.load(open(sys.argv[1]))['best_sigma_rel'])" \
      "$OUT/sweep-step$step.json" 2>/dev/null) || SIGMA=0.10
    dir=$RUN-ema$SIGMA-step$step
    [ -d "$dir" ] || "$DDPMKIT" ema "$RUN" --sigma_rel "$SIGMA" --step "$step" --out "$dir"
    name=ema$SIGMA-step$step-default-2000
    [ -f "$OUT/$name.json" ] || "$DDPMKIT" eval --model "$dir" --autoguide emoji32-guide --autoguide_scale 2 \
      --dataset emoji --per_class --num_images 2000 --seed 0 --out "$OUT/$name.json" 2>&1 | tr '\r' '\n' \
      | grep -v '^sampling\|^features\|^ *$' | tee "$OUT/$name.log" ;;
  scales)
    sha=$(sha256sum src/ddpmkit/pretrained/emoji32/unet/diffusion_pytorch_model.safetensors | cut -c1-8)
    by=; [ "$GUIDE" = emoji32-guide ] || by=-by-$(basename "$GUIDE")
    for scale in ${SCALES//,/ }; do
      name=bundled-$sha-ag$scale$by-$SCALE_IMAGES
      [ -f "$OUT/$name.json" ] || "$DDPMKIT" eval --model emoji32 --autoguide "$GUIDE" --autoguide_scale "$scale" \
        --dataset emoji --per_class --num_images "$SCALE_IMAGES" --seed 0 --out "$OUT/$name.json" 2>&1 \
        | tr '\r' '\n' | grep -v '^sampling\|^features\|^ *$' | tee "$OUT/$name.log"
    done ;;
  *) echo "usage: bash benchmarks/emoji32_cpu_ft.sh train|sweep|default|scales" >&2; exit 2 ;;
esac
