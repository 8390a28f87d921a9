"""The one training loop: a step changes the weights, seeds reproduce, accumulation scales the loss, targets follow
prediction_type, Min-SNR weights follow the paper, EMA is what gets saved, checkpoints resume at the right step, the
step callback sees every step, and plain diffusers loads the result."""
from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from ddpmkit import runs
from ddpmkit.config import TrainConfig
from ddpmkit.data import ImageData
from ddpmkit.models import new_noise_scheduler
from ddpmkit.trainer import Trainer, loss_target, min_snr_weights, train

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"



def _data(n: int = 8, size: int = 8, seed: int = 0) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    return ImageData(torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8), source="random")


def _config(tmp_path: Path, name: str = "run", **overrides) -> TrainConfig:
    """A run of the micro preset at 8x8 that writes a 4-image, 2-step sample grid at the end."""
    base = dict(preset="micro", image_size=8, batch_size=4, max_steps=2, device="cpu", num_sample_images=4,
                sample_steps=2, output_dir=str(tmp_path / name), seed=0)
    return TrainConfig(**{**base, **overrides}).validate()


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / WEIGHTS))


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class FixedNoise:
    """Stands in for `Trainer.draw_noise`: noise and timesteps come from fixed tables, handed out in order.

    The same table rows go to the same images whatever the micro-batch size, so accumulated and full-batch
    steps see identical (x0, eps, t) triples.
    """

    def __init__(self, noise: torch.Tensor, timesteps: torch.Tensor):
        self.noise, self.timesteps, self.used = noise, timesteps, 0

    def __call__(self, clean_images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = clean_images.shape[0]
        noise, timesteps = self.noise[self.used:self.used + n].to(clean_images), self.timesteps[self.used:self.used + n]
        self.used += n
        assert noise.shape == clean_images.shape and len(timesteps) == n, "ran out of fixed noise"
        return noise, timesteps


# ----------------------------------------------------------------------------- one run, many checks
@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """Two optimizer steps from scratch; keeps the initial and final weights of the Trainer."""
    tmp = tmp_path_factory.mktemp("short")
    trainer = Trainer(_config(tmp), data=_data())
    initial = _state(trainer.unet)
    path = trainer.run()
    final = _state(trainer.accelerator.unwrap_model(trainer.unet))
    return types.SimpleNamespace(path=path, initial=initial, final=final, trainer=trainer)


def test_training_steps_are_finite_and_change_the_weights(short_run):
    records = runs.read_loss_log(short_run.path)
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) and 0 < r["loss"] < 10 for r in records)
    assert all(r["lr"] == pytest.approx(4e-4) for r in records)  # the course's learning rate
    saved = _weights(short_run.path)
    assert set(saved) == set(short_run.initial)
    assert all(torch.isfinite(v).all() for v in saved.values())
    changed = [k for k in saved if not torch.equal(saved[k], short_run.initial[k])]
    assert len(changed) > 0.9 * len(saved), f"only {len(changed)} of {len(saved)} tensors moved"
    # without EMA the saved weights are the trained weights
    assert all(torch.equal(saved[k], short_run.final[k]) for k in saved)
    state = runs.read_train_state(short_run.path)
    assert state["global_step"] == 2 and state["num_processes"] == 1


def test_saved_folder_is_a_plain_diffusers_pipeline(short_run):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    path = short_run.path
    for name in ("model_index.json", "unet/config.json", WEIGHTS, "scheduler/scheduler_config.json",
                 runs.LOSS_LOG, "loss_curve.png", "samples.png", runs.CONFIG_FILE):
        assert (path / name).is_file(), name
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["diffusers", "DDPMScheduler"]
    scheduler = json.loads((path / "scheduler/scheduler_config.json").read_text())
    assert scheduler["beta_schedule"] == "squaredcos_cap_v2" and scheduler["num_train_timesteps"] == 1000
    assert scheduler["prediction_type"] == "epsilon"

    pipe = DDPMPipeline.from_pretrained(path)
    assert isinstance(pipe.unet, UNet2DModel) and isinstance(pipe.scheduler, DDPMScheduler)
    assert pipe.unet.config.sample_size == 8 and tuple(pipe.unet.config.block_out_channels) == (8, 16)
    loaded = pipe.unet.state_dict()
    assert all(torch.equal(loaded[k], short_run.final[k]) for k in loaded)
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all()

    grid = Image.open(path / "samples.png")
    assert grid.size == (2 * (8 + 2) + 2,) * 2  # 4 images of 8x8 in a 2x2 grid with 2-pixel padding
    assert Image.open(path / "loss_curve.png").size[0] >= 300


def test_same_seed_gives_identical_weights(tmp_path, short_run):
    again = train(_config(tmp_path, "again"), data=_data())
    other = train(_config(tmp_path, "other", seed=1), data=_data())
    reference, same, different = _weights(short_run.path), _weights(again), _weights(other)
    assert all(torch.equal(reference[k], same[k]) for k in reference)
    assert sum(not torch.equal(reference[k], different[k]) for k in reference) > 0.9 * len(reference)


def test_a_fresh_run_in_an_old_folder_starts_a_new_loss_log(tmp_path):
    config = _config(tmp_path, max_steps=1)
    train(config, data=_data())
    train(config, data=_data())
    steps = [r["step"] for r in runs.read_loss_log(tmp_path / "run")]
    assert steps == [1]


def test_grayscale_model_has_one_channel(tmp_path):
    data = ImageData(_data(4).images[:, :1], source="gray")
    path = train(_config(tmp_path, channels=1, max_steps=1), data=data)
    unet = json.loads((path / "unet/config.json").read_text())
    assert unet["in_channels"] == unet["out_channels"] == 1
    assert Image.open(path / "samples.png").mode == "L"


# ----------------------------------------------------------------------------- gradient accumulation
def test_grad_accumulation_gives_the_full_batch_gradient(tmp_path):
    """accumulation 2 x batch 2 == batch 4 on the same images, noise and timesteps: the loss is divided by 2."""
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    timesteps = torch.tensor([10, 300, 650, 990])
    data = _data(4)

    def run(name: str, batch_size: int, accumulation: int) -> list[torch.Tensor]:
        config = _config(tmp_path, name, batch_size=batch_size, grad_accumulation_steps=accumulation, max_steps=1,
                         random_flip=False, max_grad_norm=0.0, lr=1e-3)
        trainer = Trainer(config, data=data)
        trainer.draw_noise = fixed = FixedNoise(noise, timesteps)
        seen = []  # the gradient each optimizer step sees
        trainer.optimizer.optimizer.register_step_pre_hook(
            lambda optimizer, args, kwargs: seen.append([p.grad.detach().clone() for group in optimizer.param_groups
                                                         for p in group["params"]]))
        trainer.run()
        assert trainer.global_step == 1 and len(seen) == 1, "one optimizer step"
        assert fixed.used == 4, "each of the 4 images was noised once"
        return seen[0]

    full = run("full", batch_size=4, accumulation=1)
    accumulated = run("accumulated", batch_size=2, accumulation=2)
    norm = torch.sqrt(sum((g**2).sum() for g in full))
    assert norm > 1e-3
    for a, b in zip(full, accumulated):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    # the check has teeth: without the division the accumulated gradient is twice the full one
    assert not torch.allclose(full[0], 2 * accumulated[0], rtol=1e-3, atol=1e-7)


# ----------------------------------------------------------------------------- loss targets
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_loss_target_follows_prediction_type(tmp_path, prediction_type):
    data = _data(3)
    trainer = Trainer(_config(tmp_path, prediction_type=prediction_type), data=data)
    assert trainer.noise_scheduler.config.prediction_type == prediction_type
    x0 = data.images.float() / 127.5 - 1
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 499, 999])
    trainer.draw_noise = FixedNoise(eps, t)
    loss = trainer.forward_backward({"images": x0, "labels": torch.full((3,), -1)})

    # by hand (DDPM eq. 4 and Salimans & Ho 2022 for v), from the scheduler's alphas_cumprod
    ab = trainer.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    target = {"epsilon": eps, "sample": x0, "v_prediction": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[prediction_type]
    with torch.no_grad():
        output = trainer.unet(x_t, t).sample
    torch.testing.assert_close(loss.detach(), F.mse_loss(output, target), rtol=1e-5, atol=1e-6)
    assert all(p.grad is not None for p in trainer.unet.parameters() if p.requires_grad)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_loss_target_is_eps_x0_or_v(prediction_type):
    scheduler = new_noise_scheduler("linear", 1000, prediction_type)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(3, 3, 4, 4, generator=g) * 2 - 1, torch.randn(3, 3, 4, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    ab = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = {"epsilon": eps, "sample": x0, "v_prediction": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[prediction_type]
    torch.testing.assert_close(loss_target(scheduler, x0, eps, t), expected)


def test_min_snr_weights_follow_hang_et_al():
    """SNR = ab / (1 - ab); weights min(SNR, gamma) / SNR (eps), / (SNR + 1) (v), min(SNR, gamma) (x0): 1 for eps
    below gamma, gamma / SNR above it."""
    t = torch.tensor([0, 300, 600, 999])
    for prediction_type, weight in (("epsilon", lambda snr, m: m / snr), ("v_prediction", lambda snr, m: m / (snr + 1)),
                                    ("sample", lambda snr, m: m)):
        scheduler = new_noise_scheduler("linear", 1000, prediction_type)
        ab = scheduler.alphas_cumprod[t].double()
        snr = ab / (1 - ab)
        expected = weight(snr, snr.clamp(max=5.0)).float()
        torch.testing.assert_close(min_snr_weights(scheduler, t, 5.0), expected, rtol=1e-5, atol=0)
    eps = min_snr_weights(new_noise_scheduler("linear", 1000, "epsilon"), t, 5.0)
    assert eps[0] < 0.01 and eps[-1] == 1.0  # t = 0 has an SNR of ~10^4: its weight is 5 / SNR; t = 999: SNR < 5


# ----------------------------------------------------------------------------- EMA
def test_ema_weights_are_saved(tmp_path):
    trainer = Trainer(_config(tmp_path, use_ema=True, max_steps=3, prediction_type="v_prediction"), data=_data())
    path = trainer.run()
    saved = _weights(path)
    raw = _state(trainer.accelerator.unwrap_model(trainer.unet))
    ema = dict(zip([name for name, _ in trainer.accelerator.unwrap_model(trainer.unet).named_parameters()],
                   trainer.ema.shadow_params))
    assert trainer.ema.optimization_step == 3
    differ = [k for k in ema if not torch.equal(saved[k], raw[k])]
    assert len(differ) > 0.9 * len(ema), "the saved weights must be the EMA weights, not the raw ones"
    assert all(torch.equal(saved[k], ema[k].detach().cpu()) for k in ema)
    scheduler = json.loads((path / "scheduler/scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_and_resume_latest_continues_at_the_right_step(tmp_path, monkeypatch):
    """Resumed at step 2 of 4 (8 images in batches of 2: the checkpoint falls mid-epoch), the run ends with the
    uninterrupted run's weights and losses, bit for bit."""
    config = _config(tmp_path, max_steps=4, checkpointing_steps=2, batch_size=2)
    first = Trainer(config, data=_data())
    first.run()
    run_dir = tmp_path / "run"
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["step_0000002"]  # the last step is saved as the pipeline, not as a checkpoint
    checkpoint = run_dir / "checkpoints/step_0000002"
    assert runs.read_checkpoint_marker(checkpoint) == {"global_step": 2, "num_processes": 1}
    first_log = runs.read_loss_log(run_dir)
    uninterrupted = _weights(run_dir)
    with runs.loss_log_path(run_dir).open("a") as f:
        f.write('{"step": 5, "lo')  # a line cut short by a kill: left out on resume

    resumed_weights = []
    original_run_step = Trainer.run_step

    def counting_run_step(self, batch):
        if not resumed_weights:
            resumed_weights.append(_state(self.accelerator.unwrap_model(self.unet)))
        return original_run_step(self, batch)

    monkeypatch.setattr(Trainer, "run_step", counting_run_step)
    calls = []
    monkeypatch.setattr(Trainer, "forward_backward",
                        lambda self, batch, _fb=Trainer.forward_backward: calls.append(1) or _fb(self, batch))
    second = Trainer(_config(tmp_path, max_steps=4, checkpointing_steps=2, batch_size=2,
                             resume_from_checkpoint="latest"), data=_data())
    second.run()
    assert len(calls) == 2, "steps 3 and 4 only"
    checkpoint_weights = load_file(str(checkpoint / "model.safetensors"))
    assert all(torch.equal(resumed_weights[0][k], checkpoint_weights[k]) for k in checkpoint_weights)
    log = runs.read_loss_log(run_dir)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert len(runs.loss_log_path(run_dir).read_text().splitlines()) == 4, "the cut line is gone from the file"

    def losses(records):
        return [(r["step"], r["loss"], r["epoch"]) for r in records]

    assert losses(log) == losses(first_log), "the resumed steps are the uninterrupted run's: same batches and noise"
    resumed = _weights(run_dir)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted), "bit for bit"
    assert runs.read_train_state(run_dir)["global_step"] == 4
    assert runs.read_meta(run_dir)["step"] == 4


# ----------------------------------------------------------------------------- the step callback
def test_step_callback_sees_every_optimizer_step_with_its_loss_still_on_the_device(tmp_path):
    seen = []
    path = train(_config(tmp_path, max_steps=3, batch_size=2, grad_accumulation_steps=2), data=_data(),
                 callback=seen.append)
    assert [info["step"] for info in seen] == [1, 2, 3], "once per optimizer step, not per micro-batch"
    assert all(isinstance(info["loss"], torch.Tensor) and info["loss"].dim() == 0 for info in seen)
    assert [info["loss"].item() for info in seen] == [r["loss"] for r in runs.read_loss_log(path)]
    assert [info["images_seen"] for info in seen] == [4, 8, 12]  # two micro-batches of 2 per step
    assert 0 < seen[0]["seconds"] < seen[1]["seconds"] < seen[2]["seconds"]


def test_a_stop_signal_during_the_final_save_waits_for_the_pipeline(tmp_path, monkeypatch, caplog):
    """Ctrl-C (or SIGTERM) while the final pipeline's sample grid is made: the pipeline is saved whole, then the
    run ends as done (the signal handlers were gone after the last step: the run was lost in .tmp_pipeline)."""
    import logging
    import os
    import signal

    from ddpmkit import train_saving

    original = train_saving.sample_grid

    def interrupted_grid(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(train_saving, "sample_grid", interrupted_grid)
    config = TrainConfig(preset="micro", image_size=8, batch_size=4, max_steps=2, device="cpu", seed=0,
                         num_sample_images=2, sample_steps=2, output_dir=str(tmp_path / "run")).validate()
    data = ImageData(torch.randint(0, 256, (8, 3, 8, 8), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8))
    with caplog.at_level(logging.INFO, logger="ddpmkit"):
        path = train(config, data=data)
    assert (path / "model_index.json").exists() and (path / "samples.png").exists()
    assert not list(path.glob(".tmp*")) and runs.read_meta(path)["step"] == 2
    assert "SIGINT came after the last step: the final pipeline was saved first" in caplog.text


def test_resuming_from_a_checkpoint_of_another_model_is_one_line(tmp_path):
    """A checkpoint of another run (another preset) named by --resume_from_checkpoint: one line saying what to do
    (it was a RuntimeError traceback from load_state_dict)."""
    from ddpmkit.errors import UserError

    train(_config(tmp_path, "micro", max_steps=2, checkpointing_steps=1), data=_data())
    checkpoint = runs.checkpoints_dir(tmp_path / "micro") / "step_0000001"
    other = _config(tmp_path, "other", preset="tiny", resume_from_checkpoint=str(checkpoint))
    with pytest.raises(UserError, match=r"does not fit the model these flags build \(its UNet's layers or sizes "
                                        r"differ\): resume with the flags of the run that saved it"):
        train(other, data=_data())


def test_the_loss_curve_draws_a_moving_mean_only_where_it_smooths(monkeypatch, tmp_path):
    """Under 20 steps the 'mean of 1' line was the loss itself drawn twice (make demo's short runs); from 20 steps a
    moving mean over a tenth of the run, at most 50 steps, is drawn beside the loss."""
    from ddpmkit import images

    drawn = {}
    monkeypatch.setattr(images, "plot_lines", lambda series, path, *a, **k: drawn.setdefault(len(drawn), series))
    for n in (16, 20, 1000):
        images.plot_loss_curve(list(range(1, n + 1)), [1.0 / s for s in range(1, n + 1)], tmp_path / "c.png")
    assert list(drawn[0]) == ["loss"]
    assert list(drawn[1]) == ["loss", "mean of 2"] and len(drawn[1]["mean of 2"][1]) == 19
    assert list(drawn[2]) == ["loss", "mean of 50"] and len(drawn[2]["mean of 50"][0]) == 951
