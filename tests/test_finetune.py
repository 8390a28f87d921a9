"""Fine-tuning (`ddpmkit finetune`, the course's finetune_model.py): the one training loop started from a
pipeline saved by plain diffusers, on new data; checkpoints, trackers, model cards and the course's command."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline
from PIL import Image

from conftest import save_plain_pipeline
from ddpmkit import runs
from ddpmkit.cli import build_parser, config_from_args, main
from ddpmkit.config import TrainConfig
from ddpmkit.data import load_image_data
from ddpmkit.models import load_pipeline
from ddpmkit.trainer import train

COURSE_COMMAND = [
    "finetune", "--image_size", "128", "--batch_size", "8", "--num_epochs", "16", "--grad_accumulation_steps", "2",
    "--start_model", "google/ddpm-celebahq-256", "--dataset_name", "Norod78/Vintage-Faces-FFHQAligned",
    "--log_samples_every", "100", "--save_model_every", "1000", "--model_save_name", "vintageface",
]
STEPS, SAVE_EVERY, SAMPLES_EVERY = 24, 8, 12  # 8 images in batches of 4: 2 steps per epoch, 12 epochs



def write_uniform_images(folder: Path, n: int = 8, size: int = 16) -> Path:
    """n images of one flat colour each, shades of orange: data the random 'pretrained' model has never seen."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        colour = (230, 90 + 12 * i, 20)
        Image.fromarray(np.full((size, size, 3), colour, np.uint8)).save(folder / f"flat_{i}.png")
    return folder


def fixed_noise_mse(unet, noise_scheduler, images: torch.Tensor, seed: int = 0) -> float:
    """The training loss on `images` (uint8) for one fixed set of noise and timesteps: comparable across models."""
    x0 = images.float() / 127.5 - 1
    x0 = x0.repeat(4, 1, 1, 1)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (x0.shape[0],), generator=g)
    with torch.no_grad():
        pred = unet(noise_scheduler.add_noise(x0, noise, timesteps), timesteps).sample
    return torch.nn.functional.mse_loss(pred, noise).item()


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One fine-tune with everything switched on: a new resolution, step_N pipelines, sample grids, W&B offline."""
    root = tmp_path_factory.mktemp("finetune")
    base = save_plain_pipeline(root / "base", sample_size=8)  # "pretrained" at 8x8, fine-tuned at 16x16
    images = write_uniform_images(root / "flat")
    logger, handler = logging.getLogger("ddpmkit"), Collect()
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        final = train(init_from=str(base), dataset=str(images), image_size=16, batch_size=4, max_steps=STEPS,
                      lr=2e-3, save_model_every=SAVE_EVERY, log_samples_every=SAMPLES_EVERY, sample_steps=4,
                      num_sample_images=4, output_dir=str(root / "run"), model_save_name="flat", device="cpu",
                      wandb_project="ddpmkit-tests", seed=0)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return SimpleNamespace(base=base, images=images, final=final, out=root / "run", log=handler.messages)


def test_finetune_lowers_the_loss_on_the_new_data(run):
    records = runs.read_loss_log(run.out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    first, last = np.mean([r["loss"] for r in records[:6]]), np.mean([r["loss"] for r in records[-6:]])
    assert last < 0.85 * first, (first, last)
    data = load_image_data(str(run.images), 16).images
    before = load_pipeline(run.base)
    after = DDPMPipeline.from_pretrained(run.final)
    mse_before = fixed_noise_mse(before.unet, before.scheduler, data)
    mse_after = fixed_noise_mse(after.unet, after.scheduler, data)
    assert mse_after < 0.8 * mse_before, (mse_before, mse_after)


def test_step_pipelines_keep_counting_across_epochs_and_load_in_plain_diffusers(run):
    assert run.final == run.out / "flat"
    steps = sorted(int(p.name.split("_")[1]) for p in run.final.glob("step_*"))
    assert steps == [8, 16]  # 2 steps per epoch: the counter did not restart each epoch
    for folder in [run.final / "step_8", run.final / "step_16", run.final]:
        pipe = DDPMPipeline.from_pretrained(folder)
        assert pipe.unet.config.sample_size == 16  # saved at the training resolution
        assert runs.read_train_config(folder)["init_from"] == str(run.base)
        meta = runs.read_meta(folder)
        assert meta["base_model"] == str(run.base)
        assert meta["step"] == (int(folder.name.split("_")[1]) if folder.name.startswith("step_") else STEPS)
    step8, step16 = (DDPMPipeline.from_pretrained(run.final / f"step_{n}").unet.state_dict() for n in (8, 16))
    assert any(not torch.equal(step8[k], step16[k]) for k in step8)  # each is its own snapshot
    # the noise schedule is the pretrained pipeline's own
    assert json.loads((run.final / "scheduler" / "scheduler_config.json").read_text())["beta_schedule"] == \
        json.loads((run.base / "scheduler" / "scheduler_config.json").read_text())["beta_schedule"]


def test_new_resolution_is_logged_and_samples_use_it(run):
    assert any("fine-tuning at 16x16 a model pretrained at 8" in m for m in run.log)
    grids = sorted(p.name for p in (run.out / "samples").glob("*.png"))
    assert grids == ["step_000012.png", "step_000024.png"]
    assert Image.open(run.out / "samples" / "step_000012.png").size == (2 + 2 * 18, 2 + 2 * 18)  # 2x2 of 16 px


def test_model_cards_for_final_and_step_pipelines(run):
    from huggingface_hub import ModelCard

    for folder in (run.final, run.final / "step_8"):
        card = ModelCard.load(folder / "README.md")
        assert "diffusion-models-class" in card.data.tags and card.data.library_name == "diffusers"
        assert f"ddpmkit finetune --dataset_name {run.images}" in card.text
        assert "DDPMPipeline.from_pretrained" in card.text
    final = ModelCard.load(run.final / "README.md").text
    assert "![samples](samples.png)" in final and (run.final / "samples.png").exists()
    assert f"| steps trained | {STEPS} |" in final and "Final training loss" in final
    assert "| steps trained | 8 |" in (run.final / "step_8" / "README.md").read_text()


def test_trackers_get_loss_lr_and_sample_grids(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((run.out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = events.Tags()
    assert {"loss", "lr"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("loss")] == list(range(1, STEPS + 1))
    assert events.Scalars("lr")[0].value == pytest.approx(2e-3)
    assert any(t.startswith("samples") for t in tags["images"])
    wandb_runs = list((run.out / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1 and list(wandb_runs[0].glob("run-*.wandb"))


def test_train_init_from_and_finetune_start_model_are_one_code_path(tmp_path):
    base = save_plain_pipeline(tmp_path / "base")
    images = write_uniform_images(tmp_path / "flat", n=4)
    common = ["--dataset", str(images), "--image_size", "8", "--batch_size", "2", "--max_steps", "2",
              "--num_sample_images", "1", "--sample_steps", "1"]
    train_args = ["train", "--init_from", str(base), "--output_dir", str(tmp_path / "a"), *common]
    finetune_args = ["finetune", "--start_model", str(base), "--output_dir", str(tmp_path / "b"), *common]
    parser = build_parser()
    parsed = [parser.parse_args(a) for a in (train_args, finetune_args)]
    assert parsed[0].func is parsed[1].func
    assert config_from_args(TrainConfig, parsed[0]).init_from == config_from_args(TrainConfig, parsed[1]).init_from
    assert main(["-q", *train_args]) == 0 and main(["-q", *finetune_args]) == 0
    a = DDPMPipeline.from_pretrained(tmp_path / "a").unet.state_dict()
    b = DDPMPipeline.from_pretrained(tmp_path / "b" / "finetuned").unet.state_dict()  # finetune's default name
    original = load_pipeline(base).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # same loop, same seed: the same weights
    assert any(not torch.equal(a[k], original[k]) for k in a)
    for run_dir in (tmp_path / "a", tmp_path / "b"):  # both used the fine-tuning learning rate 1e-5
        assert runs.read_loss_log(run_dir)[0]["lr"] == pytest.approx(1e-5)


def test_failed_push_after_training_exits_2_and_keeps_the_pipeline(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    base = save_plain_pipeline(tmp_path / "base")
    images = write_uniform_images(tmp_path / "flat", n=2)
    code = main(["-q", "finetune", "--start_model", str(base), "--dataset", str(images), "--image_size", "8",
                 "--batch_size", "2", "--max_steps", "1", "--num_sample_images", "1", "--sample_steps", "1",
                 "--output_dir", str(tmp_path / "run"), "--push_to_hub", "--hub_model_id", "me/flat"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # (and the progress bar)
    assert code == 2 and len(errors) == 1 and errors[0].startswith("ddpmkit: error: cannot push")
    assert "HF_HUB_OFFLINE" in errors[0] and f"kept in {tmp_path / 'run' / 'finetuned'}" in errors[0]
    assert DDPMPipeline.from_pretrained(tmp_path / "run" / "finetuned").unet.config.sample_size == 8


def test_wandb_without_a_key_is_one_line_before_training(tmp_path, capsys, monkeypatch):
    """The course's --wandb_project dm_finetune on a machine never logged in to W&B: one line saying to log in or
    go offline, before any step (it was wandb's UsageError traceback once training had set up)."""
    import wandb
    from wandb.errors import UsageError

    def not_logged_in(*args, **kwargs):
        raise UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(wandb, "login", not_logged_in)
    base = save_plain_pipeline(tmp_path / "base")
    images = write_uniform_images(tmp_path / "flat", n=2)
    code = main(["-q", "finetune", "--start_model", str(base), "--dataset", str(images), "--image_size", "8",
                 "--batch_size", "2", "--max_steps", "1", "--output_dir", str(tmp_path / "run"),
                 "--wandb_project", "dm_finetune"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "--wandb_project: W&B has no usable API key (No API key configured." in err and "WANDB_MODE=offline" in err
    assert not runs.loss_log_path(tmp_path / "run").exists()


def test_course_command_parses_with_the_course_values():
    args = build_parser().parse_args(COURSE_COMMAND)
    config = config_from_args(TrainConfig, args)
    assert (config.image_size, config.batch_size, config.num_epochs, config.grad_accumulation_steps) == (128, 8, 16, 2)
    assert config.init_from == "google/ddpm-celebahq-256"
    assert config.dataset == "Norod78/Vintage-Faces-FFHQAligned"
    assert (config.log_samples_every, config.save_model_every, config.model_save_name) == (100, 1000, "vintageface")
    assert config.lr is None and config.sample_scheduler == "ddim" and config.sample_steps == 40
    more = build_parser().parse_args(COURSE_COMMAND + [
        "--wandb_project", "dm_finetune", "--lr", "2e-5", "--seed", "3", "--use_ema",
        "--mixed_precision", "bf16", "--output_dir", "runs/vintage"])
    config = config_from_args(TrainConfig, more).validate()
    assert (config.wandb_project, config.lr, config.device, config.seed) == ("dm_finetune", 2e-5, "auto", 3)
    assert config.use_ema and config.mixed_precision == "bf16" and config.output_dir == "runs/vintage"


def test_course_command_offline_ends_with_one_line_about_downloading(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    code = main(COURSE_COMMAND + ["--output_dir", str(tmp_path / "run")])
    stderr = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(stderr) == 1
    assert "'google/ddpm-celebahq-256'" in stderr[0] and "local folder" in stderr[0]
    assert not (tmp_path / "run" / "vintageface").exists()


def test_finetune_size_must_fit_the_pretrained_unet_and_fails_before_the_data(tmp_path, capsys):
    base = save_plain_pipeline(tmp_path / "base")  # the micro UNet halves the size once: even sizes only
    code = main(["finetune", "--start_model", str(base), "--dataset", str(tmp_path / "no-such-folder"),
                 "--image_size", "7", "--output_dir", str(tmp_path / "run")])
    stderr = capsys.readouterr().err.strip()
    assert code == 2 and "--image_size 7 does not fit this UNet" in stderr and "multiple of 2" in stderr


def test_finetune_without_image_size_trains_at_the_start_models_size(tmp_path, capsys):
    """The course's finetune_model.py defaults to its start model's size (256 for ddpm-bedroom-256); ddpmkit's
    default was a fixed 128, which fine-tuned the bundled 32-px emoji32 at 16x the cost and changed its size."""
    base = save_plain_pipeline(tmp_path / "base")
    size = load_pipeline(base).unet.config.sample_size
    images = write_uniform_images(tmp_path / "flat", n=2)
    assert main(["finetune", "--start_model", str(base), "--dataset", str(images), "--batch_size", "2",
                 "--max_steps", "1", "--num_sample_images", "1", "--sample_steps", "1",
                 "--output_dir", str(tmp_path / "run")]) == 0
    assert runs.read_train_config(tmp_path / "run")["image_size"] == size
    assert DDPMPipeline.from_pretrained(tmp_path / "run" / "finetuned").unet.config.sample_size == size
    card = (tmp_path / "run" / "finetuned" / "README.md").read_text()
    assert f"--image_size {size} " in card  # the command in the card says the size it trained at
    assert main(["train", "--dataset", str(images), "--batch_size", "2", "--max_steps", "1", "--preset", "tiny",
                 "--num_sample_images", "1", "--sample_steps", "1", "--output_dir", str(tmp_path / "scratch")]) == 0
    assert runs.read_train_config(tmp_path / "scratch")["image_size"] == 32  # from scratch: the course's 32
