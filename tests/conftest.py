"""Shared fixtures: tiny UNets, pipelines saved by plain diffusers, small image folders made in the test."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny models: threads only add overhead, and CI shares 2 cores

from ddpmkit.models import PRESETS  # noqa: E402  (after the environment: huggingface_hub reads it on import)

MICRO_UNET = dict(PRESETS["micro"])  # ~20k parameters: a full 1000-step loop takes a few seconds on CPU


def make_micro_unet(sample_size: int = 8, channels: int = 3, seed: int = 0, **extra):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=sample_size, in_channels=channels, out_channels=channels, **{**MICRO_UNET, **extra})


def save_plain_pipeline(folder: Path, sample_size: int = 8, beta_schedule: str = "squaredcos_cap_v2",
                        safe_serialization: bool = True, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """A pipeline folder written by plain diffusers, as a course user would (UNet2DModel + DDPMScheduler)."""
    from diffusers import DDPMPipeline, DDPMScheduler

    unet = make_micro_unet(sample_size, seed=seed)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, prediction_type=prediction_type)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder, safe_serialization=safe_serialization)
    return folder


def write_images(folder: Path, n: int = 12, size: int = 20, seed: int = 0, color=None) -> list[Path]:
    """n small RGB PNGs: a coloured square on a gradient background (varied, decodable)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = np.zeros((size, size, 3), np.uint8)
        img[...] = np.linspace(0, 255, size, dtype=np.uint8)[None, :, None]
        c = color if color is not None else rng.integers(0, 256, 3)
        a, b = sorted(rng.integers(0, size, 2))
        img[a:b + 2, a:b + 2] = c
        paths.append(folder / f"img_{i:03d}.png")
        Image.fromarray(img).save(paths[-1])
    return paths


@pytest.fixture
def plain_pipeline(tmp_path) -> Path:
    return save_plain_pipeline(tmp_path / "plain_pipe")


@pytest.fixture
def image_folder(tmp_path) -> Path:
    write_images(tmp_path / "images")
    return tmp_path / "images"
