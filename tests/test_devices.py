"""The one device rule (`ddpmkit.devices`) for training and evaluation, with a GPU faked (`devices.cuda_available`):
where the model, the noise and the Inception network would go, without moving anything to a GPU; and that every
command's `--help` says what the default does. (Sampling and the web app: tests/test_autoguidance.py, test_ui.py.)"""
from __future__ import annotations

import logging

import pytest
import torch
from conftest import save_plain_pipeline, write_images

from ddpmkit import devices
from ddpmkit.cli import build_parser
from ddpmkit.config import TrainConfig
from ddpmkit.errors import UserError

RULE = "auto (default): a CUDA GPU when there is one, else Apple's MPS, else the CPU"


@pytest.fixture
def gpu(monkeypatch):
    """A machine with a CUDA GPU, as far as ddpmkit's rule can tell (torch itself still has none)."""
    monkeypatch.setattr(devices, "cuda_available", lambda: True)
    monkeypatch.setattr(devices, "mps_available", lambda: False)


class _Stop(Exception):
    """Raised by the stand-ins once they have seen where the work would go."""


def test_training_asks_accelerate_for_the_gpu_by_default_and_for_the_cpu_when_told(gpu, monkeypatch, tmp_path):
    import accelerate

    from ddpmkit.train_parts import make_accelerator

    asked = []

    def accelerator(**kwargs):  # accelerate places the model, the batches and the generators on its device
        asked.append(kwargs["cpu"])
        raise _Stop

    monkeypatch.setattr(accelerate, "Accelerator", accelerator)
    for device, cpu in (("auto", False), ("cuda", False), ("cpu", True)):
        with pytest.raises(_Stop):
            make_accelerator(TrainConfig(device=device, output_dir=str(tmp_path)).validate(), tmp_path)
        assert asked.pop() is cpu, device
    monkeypatch.setattr(devices, "cuda_available", lambda: False)
    with pytest.raises(UserError, match="--device cuda, but no CUDA GPU is visible"):
        make_accelerator(TrainConfig(device="cuda", output_dir=str(tmp_path)), tmp_path)


def test_the_model_the_batches_and_the_noise_go_where_the_accelerator_is(tmp_path):
    """Every piece of a training step follows `accelerator.device` (the CPU here): the UNet, the uint8 cache and the
    batches, the generator of the timesteps, noise and label drops, and the noise itself."""
    from ddpmkit.trainer import Trainer

    write_images(tmp_path / "images")
    config = TrainConfig(dataset=str(tmp_path / "images"), preset="micro", image_size=8, batch_size=4, max_steps=1,
                         device="cpu", output_dir=str(tmp_path / "run")).validate()
    trainer = Trainer(config)
    device = trainer.accelerator.device
    batch = next(iter(trainer.batches))
    noise, timesteps = trainer.draw_noise(batch["images"])
    placed = {"unet": next(trainer.unet.parameters()).device, "batch": batch["images"].device,
              "generator": trainer.generator.device, "noise": noise.device, "timesteps": timesteps.device,
              "flips": trainer.batches.flip_generator.device, "images": trainer.batches.images.device}
    assert set(placed.values()) == {device}, placed


def test_evaluation_samples_and_extracts_features_on_the_gpu_by_default(gpu, monkeypatch, tmp_path):
    from ddpmkit import sampling
    from ddpmkit.evaluation import evaluate
    from ddpmkit.evaluation.features import InceptionFeatures

    loaded = []

    def load(path, map_location=None):  # where the Inception network's weights would be loaded to
        loaded.append(torch.device(map_location))
        raise _Stop

    monkeypatch.setattr(torch.jit, "load", load)
    network = tmp_path / "inception.pt"
    network.write_bytes(b"weights")
    for device, expected in ((None, "cuda"), ("cpu", "cpu")):
        with pytest.raises(_Stop):
            InceptionFeatures(path=network, device=device)
        assert loaded.pop() == torch.device(expected)

    sampled_on, original = [], sampling._sampling_device

    def sampling_device(unet, device):  # where sample() would put the UNet; then the test samples on the CPU
        sampled_on.append(original(unet, device))
        return torch.device("cpu")

    monkeypatch.setattr(sampling, "_sampling_device", sampling_device)

    class Pixels:  # a cheap feature extractor, so that only the sampling's device is in question
        identity = {"network": "pixels", "sha256": "0" * 64, "resize": "none", "dims": 4}

        def __call__(self, images, progress=True, desc=""):
            return images.float().flatten(1)[:, :4].numpy()

    write_images(tmp_path / "images", n=6, size=8)
    model = save_plain_pipeline(tmp_path / "model")
    evaluate(str(model), dataset=str(tmp_path / "images"), num_images=6, features=Pixels(), progress=False,
             cache_dir=tmp_path / "cache", kid_subset_size=3,
             sampler=sampling.SamplerSettings(scheduler="ddim", steps=2))
    assert sampled_on == [torch.device("cuda")]


@pytest.mark.parametrize("command", ["train", "finetune", "sample", "eval", "serve"])
def test_help_says_what_the_default_device_is(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help lines
    assert "--device" in text and RULE in text, command


def test_the_choice_is_logged_once_per_device_and_purpose(gpu, caplog):
    devices._log_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="ddpmkit"):
        for _ in range(3):
            devices.announce("cuda", "sampling")
        devices.announce("cpu", "sampling")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["sampling on cuda (a CUDA GPU; --device overrides)",
                     "sampling on cpu (the CPU, as asked; --device overrides)"]
