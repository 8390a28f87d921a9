"""A killed run resumes into the run it replaces: real `ddpmkit train` processes killed with SIGKILL at a random step,
inside a checkpoint write and inside the final save, then resumed with `--resume_from_checkpoint latest`, end with the
uninterrupted run's weights bit for bit and each step once in loss.jsonl. Also: SIGINT/SIGTERM save and exit
130/143, a full disk leaves the previous checkpoint and pipeline intact, a NaN loss stops or is skipped."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_images
from safetensors.torch import load_file

HARNESS = Path(__file__).parent / "pause_harness.py"
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}


def _train_args(images: Path, out: Path, *extra) -> list[str]:
    """The micro preset at 8x8 on 10 images in 2 class folders: EMA, accumulation over a 3-micro-batch epoch (so
    steps straddle epochs), label drops, flips, a warm-up/cosine LR schedule: every piece of state must come back."""
    return ["train", "--dataset", str(images), "--class_column", "label", "--preset", "micro", "--image_size", "8",
            "--batch_size", "4", "--grad_accumulation_steps", "2", "--use_ema", "--lr", "2e-3",
            "--lr_scheduler", "cosine", "--lr_warmup_steps", "3", "--max_steps", "24", "--checkpointing_steps", "4",
            "--checkpoints_total_limit", "2", "--device", "cpu", "--num_sample_images", "2", "--sample_steps", "2",
            "--seed", "7", "--output_dir", str(out), *extra]


def _start(args: list[str], pause_at: str | None = None, paused: Path | None = None) -> subprocess.Popen:
    env = {**ENV, "PAUSE_AT": pause_at or "", "PAUSED": str(paused or "")}
    return subprocess.Popen([sys.executable, str(HARNESS), *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended (exit {process.returncode}) before {what}:\n{process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def _kill(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    return process.stderr.read()


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "loss.jsonl").read_text().splitlines()]


def _losses(run: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["lr"], r["epoch"]) for r in map(json.loads, (run / "loss.jsonl").read_text()
                                                                      .splitlines())]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume_images")
    write_images(root / "a", n=5, size=12, seed=1)
    write_images(root / "b", n=5, size=12, seed=2)
    return root


@pytest.fixture(scope="module")
def uninterrupted(images, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = subprocess.run([sys.executable, "-m", "ddpmkit", *_train_args(images, run)], env=ENV, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _steps(run) == list(range(1, 25))
    return run


@pytest.mark.slow
def test_sigkill_at_three_points_then_resume_gives_the_uninterrupted_weights(images, uninterrupted, tmp_path):
    run, paused = tmp_path / "run", tmp_path / "paused"
    args = _train_args(images, run, "--resume_from_checkpoint", "latest")
    checkpoints = run / "checkpoints"

    # 1. a random moment during training (first start: 'latest' finds no checkpoint and says so)
    kill_after = random.Random().randint(6, 14)  # logged steps seen before the kill; the kill lands a little later
    process = _start(args)
    _wait_for(lambda: (run / "loss.jsonl").exists() and len((run / "loss.jsonl").read_text().splitlines())
              >= kill_after, process, f"{kill_after} logged steps")
    stderr = _kill(process)
    assert "starting a new run" in stderr, stderr[-2000:]
    reached = len((run / "loss.jsonl").read_text().splitlines())
    assert (checkpoints / "step_0000004").is_dir(), f"killed at step {reached}: no checkpoint yet?"

    # 2. inside a checkpoint write: accelerate has written model.safetensors, not yet optimizer.bin
    process = _start(args, "torch.save:.tmp_step_", paused)
    _wait_for(paused.exists, process, "the pause inside a checkpoint write")
    _kill(process)
    partial = sorted(checkpoints.glob(".tmp_step_*"))
    assert len(partial) == 1 and (partial[0] / "model.safetensors").exists()
    assert not (partial[0] / "optimizer.bin").exists() and not (partial[0] / "training_state.json").exists()
    paused.unlink()

    # 3. inside the final save: unet/ and scheduler/ moved into the run folder, model_index.json not yet
    process = _start(args, "os.replace:model_index.json", paused)
    _wait_for(paused.exists, process, "the pause inside the final save")
    stderr = _kill(process)
    assert f"ignoring {partial[0]}: an incomplete checkpoint" in stderr, stderr[-2000:]
    assert (run / WEIGHTS).exists() and not (run / "model_index.json").exists()
    from ddpmkit.errors import UserError
    from ddpmkit.models import load_pipeline

    with pytest.raises(UserError, match="incomplete"):  # half a pipeline is no pipeline
        load_pipeline(run)
    complete = sorted(p.name for p in checkpoints.glob("step_*"))
    assert complete == ["step_0000016", "step_0000020"], complete  # --checkpoints_total_limit 2

    # 4. resumed once more: it runs from step 20 to the end
    result = subprocess.run([sys.executable, "-m", "ddpmkit", *args], env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr and "at step 20" in result.stderr

    expected, got = load_file(str(uninterrupted / WEIGHTS)), load_file(str(run / WEIGHTS))
    assert expected.keys() == got.keys()
    differ = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not differ, f"killed at step {reached} and twice more: {len(differ)} tensors differ, e.g. {differ[:3]}"
    assert _steps(run) == list(range(1, 25)), "each step once in loss.jsonl"
    assert _losses(run) == _losses(uninterrupted)  # the same batches, flips, timesteps, noise and learning rates
    assert not list(checkpoints.glob(".tmp_*")) and not list(run.glob(".tmp_*")) and not list(run.glob(".old_*"))
