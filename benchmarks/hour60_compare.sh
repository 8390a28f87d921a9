#!/bin/bash
# Issue 20's time to quality on the 60-minute CPU run (benchmarks/hour_run.sh: tiny, 3,500 steps of 64,
# --posthoc_ema with a snapshot every 219 steps, a pipeline every 875 = 15 quiet minutes): at 15, 30 and 60 minutes,
# plain sampling (the run's EMA pipeline) against the best setting of the 45-minute run (benchmarks/hour_compare.sh):
# post-hoc EMA 0.02 + autoguidance 2.5 by the run's own 0.02 EMA at a quarter of the steps; at 60 minutes also the
# run's 15-minute pipeline as the guide; `sweep`: more settings at 60 minutes, and plain and guided at the SDE sampler;
# `sweep2` to `sweep4`: the guide's age and EMA length, the scale, the main EMA and an interval at the SDE sampler;
# `sdecurve`: the 15/30/60-minute curve at the SDE sampler.
# Each row is `ddpmkit eval` at 500 images, deis unless it says, per class, seed 0 unless it says; resumable.
# The table: benchmarks/results/hour60_compare.md. The run trained again on an AVX-512 CPU (other weights) has its own:
# OUT=benchmarks/results/hour60_avx512 NOTE=... bash benchmarks/hour60_compare.sh sde sweep2 sweep3 sweep4 sdecurve
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/hour60}
OUT=${OUT:-benchmarks/results/hour60_compare}  # another run of the recipe (a CPU with other float kernels): its own OUT
NOTE=${NOTE:-"$RUN at step 3,500 (60 quiet minutes of a 2-core AMD EPYC, AVX2);"}
source benchmarks/hour_lib.sh
plain_sde() {  # plain at the SDE sampler (`auto`: DPM++ SDE 40 Karras steps, 79 calls); $1: a seed
  row plain-sde${1:+-seed$1} --model "$RUN" --autoguide none --scheduler auto ${1:+--seed $1}
}
sde() {  # plain and sweep's best at the SDE sampler; $1: a seed
  local seed=(${1:+--seed $1})
  plain_sde "$@"
  row ema002-ag2.5-ema002-step438-sde${1:+-seed$1} --model "$(ema)" --autoguide "$(ema 438)" --autoguide_scale 2.5 \
    --scheduler auto "${seed[@]}"
}
points=${*:-15 30 60 sweep}  # the points to measure now (a point's rows need its pipeline and snapshots: "15" early)
for minutes in $points; do case $minutes in
  15) row m15-plain              --model "$RUN/step_875" --autoguide none
      row m15-best               --model "$(ema 876)" --autoguide "$(ema 219)" --autoguide_scale 2.5 ;;
  30) row m30-plain              --model "$RUN/step_1750" --autoguide none
      row m30-best               --model "$(ema 1752)" --autoguide "$(ema 438)" --autoguide_scale 2.5 ;;
  60) row plain                  --model "$RUN" --autoguide none
      row ema002-ag2.5-ema002-step876 --model "$(ema)" --autoguide "$(ema 876)" --autoguide_scale 2.5
      row ema002-ag2.5-step875   --model "$(ema)" --autoguide "$RUN/step_875" --autoguide_scale 2.5 ;;
  sweep)  # at 60 minutes, beyond the 45-minute run's best: the scale, the EMA lengths, a guide at 1/8 of the
          # steps, and the SDE sampler (`auto`: DPM++ SDE 40 Karras steps, 79 calls) for plain and guided alike
      row ema002-ag3-step875     --model "$(ema)" --autoguide "$RUN/step_875" --autoguide_scale 3
      sde
      row ema002-ag2.5-step875-sde --model "$(ema)" --autoguide "$RUN/step_875" --autoguide_scale 2.5 --scheduler auto
      row ema001-ag2.5-step875   --model "$(ema "" 0.01)" --autoguide "$RUN/step_875" --autoguide_scale 2.5
      row ema002-ag2.5-ema002-step438 --model "$(ema)" --autoguide "$(ema 438)" --autoguide_scale 2.5
      row ema002-ag2-step875     --model "$(ema)" --autoguide "$RUN/step_875" --autoguide_scale 2
      # the best of these (chosen on seed 0), repeated at seed 1
      sde 1 ;;
  sde) sde ;;
  sweep2)  # at the SDE sampler, around sweep's best (the 0.02 EMA guided at 2.5 by its 1/8 EMA): a guide at 1/16 of
           # the steps (EDM2's pairing), scale 3, and autoguidance only at sigma <= 40 (the interval paper: guidance at
           # the highest noise levels costs variety; 40 is about where the image's layout forms at 32x32)
      row ema002-ag2.5-ema002-step219-sde --model "$(ema)" --autoguide "$(ema 219)" --autoguide_scale 2.5 \
        --scheduler auto
      row ema002-ag3-ema002-step438-sde --model "$(ema)" --autoguide "$(ema 438)" --autoguide_scale 3 --scheduler auto
      row ema002-ag2.5-ema002-step438-sde-sigma0-40 --model "$(ema)" --autoguide "$(ema 438)" --autoguide_scale 2.5 \
        --guidance_interval 0,40 --scheduler auto
      row ema002-ag3-ema002-step438-sde-sigma0-40 --model "$(ema)" --autoguide "$(ema 438)" --autoguide_scale 3 \
        --guidance_interval 0,40 --scheduler auto ;;
  sweep3)  # sweep2 left the 1/8 guide at 2.5 best: the guide's EMA length (0.05: the profile's own snapshot at 438,
           # exact where 0.02 is reconstructed from 2 snapshots), a guide at 3/16 (step 657), the main EMA, scale 2
      row ema002-ag2.5-ema005-step438-sde --model "$(ema)" --autoguide "$(ema 438 0.05)" --autoguide_scale 2.5 \
        --scheduler auto
      row ema002-ag2.5-ema002-step657-sde --model "$(ema)" --autoguide "$(ema 657)" --autoguide_scale 2.5 \
        --scheduler auto
      row ema003-ag2.5-ema002-step438-sde --model "$(ema "" 0.03)" --autoguide "$(ema 438)" --autoguide_scale 2.5 \
        --scheduler auto
      row ema002-ag2-ema002-step438-sde --model "$(ema)" --autoguide "$(ema 438)" --autoguide_scale 2 --scheduler auto ;;
  sweep4)  # sweep3's best (the guide at 3/16, 2.5), repeated at seed 1; the same guide at scale 2
      plain_sde 1
      row ema002-ag2.5-ema002-step657-sde-seed1 --model "$(ema)" --autoguide "$(ema 657)" --autoguide_scale 2.5 \
        --scheduler auto --seed 1
      row ema002-ag2-ema002-step657-sde --model "$(ema)" --autoguide "$(ema 657)" --autoguide_scale 2 --scheduler auto ;;
  sdecurve)  # the time-to-quality curve at the SDE sampler: plain against the 0.02 EMA guided at 2.5 by the run's
             # own 0.02 EMA at a quarter of the steps (the deis curve's guide; at 15 minutes step 219, the first snapshot)
      row m15-plain-sde --model "$RUN/step_875" --autoguide none --scheduler auto
      row m15-best-sde  --model "$(ema 876)" --autoguide "$(ema 219)" --autoguide_scale 2.5 --scheduler auto
      row m30-plain-sde --model "$RUN/step_1750" --autoguide none --scheduler auto
      row m30-best-sde  --model "$(ema 1752)" --autoguide "$(ema 438)" --autoguide_scale 2.5 --scheduler auto
      plain_sde
      row ema002-ag2.5-ema002-step876-sde --model "$(ema)" --autoguide "$(ema 876)" --autoguide_scale 2.5 \
        --scheduler auto
      ln -sf plain-sde.json "$OUT/m60-plain-sde.json"
      ln -sf ema002-ag2.5-ema002-step876-sde.json "$OUT/m60-best-sde.json" ;;
  *) echo "usage: $0 [15] [30] [60] [sweep] [sde] [sweep2] [sweep3] [sweep4] [sdecurve]" >&2; exit 2 ;;
esac; done
if [ -f "$OUT/plain.json" ]; then
  ln -sf plain.json "$OUT/m60-plain.json"
  ln -sf ema002-ag2.5-ema002-step876.json "$OUT/m60-best.json"  # the 60-minute point of the curve
fi
.venv/bin/python benchmarks/hour_table.py "$OUT" \
  "The 60-minute CPU run: plain against post-hoc EMA and autoguidance (benchmarks/hour60_compare.sh)" "$NOTE"
