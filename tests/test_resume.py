"""A killed run resumes into the run it replaces: real `ddpmkit train` processes killed with SIGKILL at a random step,
inside a checkpoint write and inside the final save, then resumed with `--resume_from_checkpoint latest`, end with the
uninterrupted run's weights bit for bit and each step once in loss.jsonl. Also: SIGINT/SIGTERM save and exit
130/143, a full disk leaves the previous checkpoint and pipeline intact, a NaN loss stops or is skipped."""
from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import write_images
from safetensors.torch import load_file

from ddpmkit import runs
from ddpmkit.errors import UserError
from ddpmkit.models import load_pipeline

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def _train_args(images: Path, out: Path, *extra) -> list[str]:
    """The micro preset at 8x8 on 10 images in 2 class folders: EMA, accumulation over a 3-micro-batch epoch (so
    steps straddle epochs), label drops, flips, a warm-up/cosine LR schedule: every piece of state must come back."""
    return ["train", "--dataset", images, "--class_column", "label", "--preset", "micro", "--image_size", 8,
            "--batch_size", 4, "--grad_accumulation_steps", 2, "--use_ema", "--lr", 2e-3, "--lr_scheduler", "cosine",
            "--lr_warmup_steps", 3, "--max_steps", 24, "--checkpointing_steps", 4, "--checkpoints_total_limit", 2,
            "--num_sample_images", 2, "--sample_steps", 2, "--seed", 7, "--output_dir", out, *extra]


def _wait_for(condition, cli, pid: int, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if not cli.alive(pid):
            code, stderr = cli.wait(pid)
            pytest.fail(f"the run ended (exit {code}) before {what}:\n{stderr[-3000:]}")
        if time.monotonic() > deadline:
            cli.wait(pid) if not _signal(pid, signal.SIGKILL) else None
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def _signal(pid: int, signum: int) -> None:
    import os

    os.kill(pid, signum)


def _kill(cli, pid: int) -> str:
    _signal(pid, signal.SIGKILL)
    code, stderr = cli.wait(pid)
    assert code == -signal.SIGKILL, stderr[-2000:]
    return stderr


def _lines(run: Path) -> int:
    log = runs.loss_log_path(run)
    return len(log.read_text().splitlines()) if log.exists() else 0


def _records(run: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["lr"], r["epoch"]) for r in runs.read_loss_log(run)]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume_images")
    write_images(root / "a", n=5, size=12, seed=1)
    write_images(root / "b", n=5, size=12, seed=2)
    return root


@pytest.fixture(scope="module")
def uninterrupted(images, forked_cli, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    code, stderr = forked_cli.run(*_train_args(images, run))
    assert code == 0, stderr[-3000:]
    assert [r[0] for r in _records(run)] == list(range(1, 25))
    return run


@pytest.mark.slow
def test_sigkill_at_three_points_then_resume_gives_the_uninterrupted_weights(images, uninterrupted, forked_cli,
                                                                             tmp_path):
    cli, run, paused = forked_cli, tmp_path / "run", tmp_path / "paused"
    args = _train_args(images, run, "--resume_from_checkpoint", "latest")
    checkpoints = run / "checkpoints"

    # 1. a random moment during training (the first start: 'latest' finds no checkpoint and says so)
    kill_after = random.Random().randint(6, 14)  # logged steps seen before the kill; the kill lands a little later
    pid = cli.start(*args)
    _wait_for(lambda: _lines(run) >= kill_after, cli, pid, f"{kill_after} logged steps")
    stderr = _kill(cli, pid)
    assert "starting a new run" in stderr, stderr[-2000:]
    reached = _lines(run)
    assert list(checkpoints.glob(f"step_*/{runs.CHECKPOINT_MARKER}")), f"killed at step {reached}: no checkpoint yet?"

    # 2. inside a checkpoint write: accelerate has written model.safetensors, not yet optimizer.bin
    before = sorted(checkpoints.glob("step_*"))
    pid = cli.start(*args, pause_at="torch.save:.tmp_step_", paused=paused)
    _wait_for(paused.exists, cli, pid, "the pause inside a checkpoint write")
    _kill(cli, pid)
    assert sorted(checkpoints.glob("step_*")) == before, "no complete checkpoint deleted before the new one is done"
    partial = sorted(checkpoints.glob(".tmp_step_*"))
    assert len(partial) == 1 and (partial[0] / "model.safetensors").exists()
    assert not (partial[0] / "optimizer.bin").exists() and not (partial[0] / runs.CHECKPOINT_MARKER).exists()
    paused.unlink()

    # 3. inside the final save: unet/ and scheduler/ moved into the run folder, model_index.json not yet
    pid = cli.start(*args, pause_at="os.replace:model_index.json", paused=paused)
    _wait_for(paused.exists, cli, pid, "the pause inside the final save")
    stderr = _kill(cli, pid)
    assert f"ignoring {partial[0]}: an incomplete checkpoint" in stderr, stderr[-2000:]
    assert (run / WEIGHTS).exists() and not (run / "model_index.json").exists()
    with pytest.raises(UserError, match="incomplete"):  # half a pipeline is no pipeline
        load_pipeline(run)
    complete = sorted(p.name for p in checkpoints.glob("step_*"))
    assert complete == ["step_0000016", "step_0000020"], complete  # --checkpoints_total_limit 2

    # 4. resumed once more: from step 20 to the end
    code, stderr = cli.run(*args)
    assert code == 0, stderr[-3000:]
    assert "resumed from" in stderr and "at step 20" in stderr
    assert f"ignoring {run}: an incomplete pipeline" in stderr, stderr[-2000:]

    expected, got = load_file(str(uninterrupted / WEIGHTS)), load_file(str(run / WEIGHTS))
    assert expected.keys() == got.keys()
    differ = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not differ, f"killed at step {reached} and twice more: {len(differ)} tensors differ, e.g. {differ[:3]}"
    assert [r[0] for r in _records(run)] == list(range(1, 25)), "each step once in loss.jsonl"
    assert _records(run) == _records(uninterrupted)  # the same batches, flips, timesteps, noise and learning rates
    assert not list(checkpoints.glob(".tmp_*")) and not list(run.glob(".tmp_*")) and not list(run.glob(".old_*"))
    assert isinstance(load_pipeline(run).unet, torch.nn.Module)


# ----------------------------------------------------------------------------- SIGINT / SIGTERM
@pytest.mark.parametrize("signum, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_save_a_checkpoint_then_exit_with_one_line(images, forked_cli, tmp_path, signum,
                                                                      exit_code):
    run = tmp_path / "run"
    args = ["-q", *_train_args(images, run, "--max_steps", 100000, "--checkpointing_steps", 0)]
    pid = forked_cli.start(*args)
    _wait_for(lambda: _lines(run) >= 3, forked_cli, pid, "3 logged steps")
    _signal(pid, signum)
    code, stderr = forked_cli.wait(pid)
    assert code == exit_code, stderr[-3000:]
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ddpmkit: stopped by {signal.Signals(signum).name} at step "), stderr
    assert "--resume_from_checkpoint latest" in lines[0]
    step = int(lines[0].split(" at step ")[1].split()[0])
    checkpoint = run / "checkpoints" / f"step_{step:07d}"
    assert str(checkpoint) in lines[0]
    assert runs.read_checkpoint_marker(checkpoint)["global_step"] == step
    assert _lines(run) == step
    if signum == signal.SIGTERM:  # and it resumes from there
        code, stderr = forked_cli.run(*_train_args(images, run, "--max_steps", step + 2, "--resume_from_checkpoint",
                                                   "latest", "--checkpointing_steps", 0))
        assert code == 0 and f"at step {step}" in stderr, stderr[-3000:]
        assert [r[0] for r in _records(run)] == list(range(1, step + 3))


# ----------------------------------------------------------------------------- a full disk
@pytest.mark.parametrize("failing", ["checkpoint", "pipeline"])
def test_full_disk_keeps_the_previous_checkpoint_and_pipeline(images, forked_cli, tmp_path, failing):
    """Files are capped at 64 kB with RLIMIT_FSIZE in the training process (the UNet's weights take 181 kB): the
    write fails as it would on a full disk, at a chosen size, without root or a special file system."""
    run = tmp_path / "run"
    code, stderr = forked_cli.run(*_train_args(images, run, "--max_steps", 4, "--checkpointing_steps", 2))
    assert code == 0, stderr[-3000:]
    checkpoint = run / "checkpoints" / "step_0000002"
    before = {p: p.read_bytes() for p in [*checkpoint.rglob("*"), *run.glob("unet/*"), run / "model_index.json"]
              if p.is_file()}
    more = ["--checkpointing_steps", 0] if failing == "pipeline" else []
    code, stderr = forked_cli.run("-q", *_train_args(images, run, "--max_steps", 8, "--resume_from_checkpoint",
                                                     "latest", *more), max_file_bytes=64_000)
    lines = stderr.splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    what = "the checkpoint of step 4" if failing == "checkpoint" else "the pipeline of step 8"
    assert lines[0].startswith(f"ddpmkit: error: could not save {what}") and "File too large" in lines[0], lines[0]
    assert "step_0000002" in lines[0] and "--resume_from_checkpoint latest" in lines[0]
    after = {p: p.read_bytes() for p in before if p.is_file()}
    assert after == before, "the previous checkpoint and pipeline are byte for byte as they were"
    assert not list(run.rglob(".tmp_*")), "no half-written folder left behind"
    assert isinstance(load_pipeline(run).unet, torch.nn.Module)


def test_only_a_full_disk_or_quota_asks_for_disk_space(tmp_path, monkeypatch):
    """A save that fails for another reason (a folder removed under the run, as two runs writing to one folder did)
    says what failed and where, in one line, and does not blame the disk; the previous pipeline stays loadable."""
    import errno

    from ddpmkit.runs import save_error_advice
    from ddpmkit.trainer import train

    for code, advice in ((errno.ENOSPC, "free some disk space"), (errno.EDQUOT, "free some disk space"),
                         (errno.ENOENT, "another run writing to the same --output_dir"),
                         (errno.EACCES, "make the folder writable")):
        reason, said = save_error_advice(OSError(code, os.strerror(code), "/runs/x/unet"))
        assert advice in said and reason == f"{os.strerror(code)}: /runs/x/unet"
        assert ("disk space" in said) == (code in (errno.ENOSPC, errno.EDQUOT))
    run = tmp_path / "run"
    train(_nan_config(tmp_path, max_steps=2, checkpointing_steps=0), data=_random_data())
    before = (run / WEIGHTS).read_bytes()

    def vanished(staged, folder):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(folder / "unet"))

    monkeypatch.setattr(runs, "commit_pipeline", vanished)
    with pytest.raises(UserError) as err:
        train(_nan_config(tmp_path, max_steps=4, checkpointing_steps=0), data=_random_data())
    message = str(err.value)
    assert "\n" not in message and "disk space" not in message, message
    assert f"No such file or directory: {run / 'unet'}" in message and "same --output_dir" in message
    assert (run / WEIGHTS).read_bytes() == before and isinstance(load_pipeline(run).unet, torch.nn.Module)


# ----------------------------------------------------------------------------- a loss that is not finite
def _poison(monkeypatch, steps: set[int]):
    """NaN images at these optimizer steps: the loss and the gradients become NaN there."""
    from ddpmkit.trainer import Trainer

    original = Trainer.forward_backward

    def forward_backward(self, batch):
        if self.global_step + 1 in steps:
            batch = {**batch, "images": batch["images"] * float("nan")}
        return original(self, batch)

    monkeypatch.setattr(Trainer, "forward_backward", forward_backward)


def _nan_config(tmp_path, **overrides):
    from ddpmkit.config import TrainConfig

    base = dict(preset="micro", image_size=8, batch_size=4, max_steps=8, checkpointing_steps=2, device="cpu",
                num_sample_images=2, sample_steps=2, output_dir=str(tmp_path / "run"), seed=0)
    return TrainConfig(**{**base, **overrides}).validate()


def _random_data():
    from ddpmkit.data import ImageData

    return ImageData(torch.randint(0, 256, (8, 3, 8, 8), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8))


def test_nan_loss_stops_naming_the_step_and_the_intact_checkpoint(tmp_path, monkeypatch):
    from ddpmkit.trainer import train

    _poison(monkeypatch, {5})
    with pytest.raises(UserError) as err:
        train(_nan_config(tmp_path), data=_random_data())
    message = str(err.value)
    checkpoint = tmp_path / "run" / "checkpoints" / "step_0000004"
    assert "the loss became nan at step 5" in message and str(checkpoint) in message and "--skip_nonfinite" in message
    assert "\n" not in message
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["step_0000002", "step_0000004"]
    assert all(torch.isfinite(t).all() for t in load_file(str(checkpoint / "model.safetensors")).values())
    assert not (tmp_path / "run" / "model_index.json").exists(), "no pipeline saved from NaN weights"


def test_skip_nonfinite_skips_up_to_n_steps(tmp_path, monkeypatch):
    from ddpmkit.trainer import Trainer, train

    _poison(monkeypatch, {3, 6})
    path = train(_nan_config(tmp_path, skip_nonfinite=2), data=_random_data())
    weights = load_file(str(path / WEIGHTS))
    assert all(torch.isfinite(t).all() for t in weights.values())
    records = runs.read_loss_log(path)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["step"] for r in records if r.get("skipped")] == [3, 6] and records[2]["loss"] is None

    # a skipped step leaves the weights as they were
    seen = {}
    original = Trainer.run_step

    def run_step(self, batch):
        if self.global_step in (2, 3):
            seen[self.global_step] = {k: v.clone() for k, v in self.accelerator.unwrap_model(self.unet)
                                      .state_dict().items()}
        return original(self, batch)

    monkeypatch.setattr(Trainer, "run_step", run_step)
    train(_nan_config(tmp_path, skip_nonfinite=2, output_dir=str(tmp_path / "again"), max_steps=4),
          data=_random_data())
    assert all(torch.equal(seen[2][k], seen[3][k]) for k in seen[2])

    _poison(monkeypatch, {2, 3, 4})
    with pytest.raises(UserError, match="the loss became nan at step 4 .after 2 skipped step"):
        train(_nan_config(tmp_path, skip_nonfinite=2, output_dir=str(tmp_path / "third")), data=_random_data())


def test_resume_with_another_number_of_processes_says_it_is_not_exact(tmp_path, caplog):
    import logging

    from ddpmkit.trainer import train

    config = _nan_config(tmp_path, max_steps=4)
    train(config, data=_random_data())
    checkpoint = runs.checkpoints_dir(tmp_path / "run") / "step_0000002"
    marker = runs.read_checkpoint_marker(checkpoint)
    runs.write_atomic(checkpoint / runs.CHECKPOINT_MARKER, json.dumps({**marker, "num_processes": 2}))  # from torchrun
    with caplog.at_level(logging.INFO, logger="ddpmkit"):
        train(_nan_config(tmp_path, max_steps=4, resume_from_checkpoint="latest"), data=_random_data())
    assert "written by 2 process(es), this run has 1" in caplog.text and "not exactly the one" in caplog.text
    assert "resumed from" in caplog.text and "(epoch 1, batch 0 of 2)" in caplog.text  # 8 images, batches of 4
