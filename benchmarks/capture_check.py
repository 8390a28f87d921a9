"""On a CUDA GPU: do the captured training step and the replayed sampling calls (ddpmkit.capture) compute what the
eager ones do? Prints one line each, and exits 1 when a difference is beyond float rounding.

    python benchmarks/capture_check.py            # tiny, batch 64, 12 steps each way; sampling 16 images (~20 s)

The eager and the captured trainer start from the same seed and data; the captured one runs 3 eager steps, then
replays its graphs, so steps 4-12 compare the graphs with eager PyTorch (cuDNN and the fused AdamW round differently:
a tolerance, not bit for bit). Sampling compares `--dtype auto` calls replayed from CUDA graphs with the same calls
launched eagerly (the same kernels: bit for bit expected, a tolerance allowed).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ddpmkit import runs, tuning  # noqa: E402
from ddpmkit.config import TrainConfig  # noqa: E402
from ddpmkit.data import ImageData  # noqa: E402
from ddpmkit.trainer import Trainer  # noqa: E402


def training(work: Path, device: str, steps: int = 12) -> bool:
    g = torch.Generator().manual_seed(0)
    data = ImageData(torch.randint(0, 256, (640, 3, 32, 32), generator=g, dtype=torch.uint8),
                     labels=torch.arange(640) % 4, class_names=list("abcd"))
    trainers = {}
    for name, compile in (("eager", False), ("captured", True)):
        config = TrainConfig(dataset="random", preset="tiny", batch_size=64, max_steps=steps, device=device,
                             compile=compile, use_ema=True, lr_scheduler="cosine", lr_warmup_steps=4,
                             class_column="label", num_sample_images=2, sample_steps=2, seed=0,
                             output_dir=str(work / name))
        trainers[name] = Trainer(config.validate(), data=data)
        trainers[name].run()
    losses = {name: [r["loss"] for r in runs.read_loss_log(work / name)] for name in trainers}
    loss_diff = max(abs(a - b) / abs(b) for a, b in zip(losses["captured"], losses["eager"]))
    weight_diff = max(float((a.detach() - b.detach()).abs().max()) for a, b in zip(trainers["captured"].unet.parameters(),
                                                                  trainers["eager"].unet.parameters()))
    replays = trainers["captured"].captured is not None and trainers["captured"].captured.update.graph is not None
    ok = replays and loss_diff < 1e-3 and weight_diff < 1e-3
    print(f"training: captured={replays}; {steps} steps, largest relative loss difference {loss_diff:.2e}, largest "
          f"weight difference {weight_diff:.2e} (eager losses {losses['eager'][-3:]}): {'ok' if ok else 'DIFFERENT'}")
    return ok


def sampling(device: str) -> bool:
    import ddpmkit
    from ddpmkit.models import build_unet, new_noise_scheduler
    from diffusers import DDPMPipeline

    torch.manual_seed(0)
    pipe = DDPMPipeline(unet=build_unet("tiny", 32).to(device), scheduler=new_noise_scheduler())
    kwargs = dict(scheduler="dpm++", steps=20, num_images=16, seed=0, progress=False, batch_size=8)
    eager = ddpmkit.sample(pipe, **kwargs, dtype="fp32").images
    original = tuning._resolve_graphs
    tuning._resolve_graphs = lambda *args: (True, "; CUDA graphs (capture_check)")
    try:
        replayed = ddpmkit.sample(pipe, **kwargs, dtype="fp32").images
    finally:
        tuning._resolve_graphs = original
    diff = float((eager - replayed).abs().max())
    ok = diff < 1e-4
    print(f"sampling: CUDA graphs against eager calls, largest difference {diff:.2e}: {'ok' if ok else 'DIFFERENT'}")
    return ok


def main() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        print("capture_check: no CUDA GPU here; the CPU keeps its eager step (tests/test_capture.py checks the "
              "capture code with a CPU stand-in for CUDA graphs)")
        return 0
    with tempfile.TemporaryDirectory() as work:
        results = [training(Path(work), device), sampling(device)]
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
