"""ddpmkit: train, fine-tune, sample and guide pixel-space diffusion models (diffusers + accelerate).

    import ddpmkit
    run = ddpmkit.train(dataset="emoji", image_size=32, max_steps=2000, output_dir="runs/emoji32")
    pipe = ddpmkit.load_pipeline(run)
    out = ddpmkit.sample(pipe, scheduler="ddim", steps=40, num_images=16, seed=0)
    ddpmkit.save_grid(out.images, "samples.png")

Names are imported on first use, so `ddpmkit --help` and one-line errors do not wait for torch and diffusers.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "TrainConfig": "config",
    "UserError": "errors", "Interrupted": "errors",
    "ImageData": "data", "load_image_data": "data", "ShuffledBatches": "data",
    "make_grid": "images", "save_grid": "images",
    "PRESETS": "models", "build_unet": "models", "load_pipeline": "models",
    "SampleOutput": "sampling", "denoise": "sampling", "predicted_x0": "sampling", "sample": "sampling",
    "SCHEDULERS": ("schedulers", "REGISTRY"), "make_scheduler": "schedulers",
    "Trainer": "trainer", "train": "trainer",
    "Guide": "guidance", "LossGuidance": "guidance", "ColorLoss": "guidance", "ClipLoss": "guidance",
    "ImageLoss": "guidance", "CustomLoss": "guidance", "build_guidance": "guidance",
    "evaluate": "evaluation", "EvalResult": "evaluation", "InceptionFeatures": "evaluation",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'ddpmkit' has no attribute {name!r}")
    module, attr = target if isinstance(target, tuple) else (target, name)
    value = getattr(importlib.import_module(f"ddpmkit.{module}"), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
