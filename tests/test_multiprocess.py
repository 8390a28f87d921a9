"""Multi-process training on the CPU: `torchrun --nproc_per_node 2 -m ddpmkit train` (gloo) gives one saved
pipeline and the same weights on both processes; killed (launcher and workers, SIGKILL) and resumed, it ends with the
uninterrupted run's weights bit for bit."""
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
from conftest import MICRO_UNET, write_images
from safetensors.torch import load_file

from ddpmkit import runs

TORCHRUN = Path(sys.executable).parent / "torchrun"
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def _command(root: Path, run: Path, *extra) -> list[str]:
    # --standalone: a free local rendezvous port, so two test runs on one machine do not collide on 29500
    return [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "ddpmkit", "train",
            "--dataset", str(root / "images"), "--image_size", "8", "--unet_config", str(root / "micro.json"),
            "--max_steps", "12", "--checkpointing_steps", "3", "--batch_size", "2",
            "--num_sample_images", "4", "--sample_steps", "2", "--output_dir", str(run), *extra]


def _start(command: list[str]) -> subprocess.Popen:
    # its own session, so that a hang can be cleaned up: torchrun and both workers go with the process group
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(process: subprocess.Popen, timeout: float = 240) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s (a worker hung at exit?):\n" + stderr[-3000:])
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return result


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _steps(run: Path) -> list[int]:
    return [r["step"] for r in runs.read_loss_log(run)]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    write_images(root / "images", n=8, size=12)
    (root / "micro.json").write_text(json.dumps(MICRO_UNET))
    return root


@pytest.fixture(scope="module")
def uninterrupted(root) -> tuple[Path, subprocess.CompletedProcess]:
    run = root / "uninterrupted"
    return run, _finish(_start(_command(root, run)))


@pytest.mark.slow
def test_torchrun_two_processes_train_one_pipeline_with_equal_weights(uninterrupted):
    run, result = uninterrupted
    assert [p.relative_to(run) for p in run.rglob("model_index.json")] == [Path("model_index.json")]
    state = runs.read_train_state(run)
    assert state["num_processes"] == 2 and state["global_step"] == 12
    checksums = state["weights_checksum_per_process"]
    assert len(checksums) == 2 and checksums[0] == checksums[1], checksums
    # the saved pipeline holds those weights
    saved = load_file(str(run / WEIGHTS))
    total = sum(float(t.double().sum()) for t in saved.values())
    assert total == pytest.approx(checksums[0], rel=1e-5, abs=1e-3)
    # one process writes the log: each step once, the loss averaged over both processes
    assert _steps(run) == list(range(1, 13))
    # 8 images over 2 processes x batch 2: two micro-batches per process and epoch
    assert "2 process(es)" in result.stderr and "2 micro-batches of 2" in result.stderr


@pytest.mark.slow
@pytest.mark.long  # left out of make test for its time (make test-long, CI)
def test_torchrun_killed_and_resumed_gives_the_uninterrupted_weights(root, uninterrupted):
    reference, _ = uninterrupted
    run = root / "killed"
    command = _command(root, run, "--resume_from_checkpoint", "latest")
    process = _start(command)
    kill_after = random.Random().randint(4, 7)  # logged steps of 12; the kill lands a little later
    deadline = time.monotonic() + 240
    while not (len(_steps(run)) >= kill_after and list(run.glob(f"checkpoints/step_*/{runs.CHECKPOINT_MARKER}"))):
        assert process.poll() is None, f"the run ended before the kill:\n{process.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the run to train"
        time.sleep(0.005)
    # a preempted machine: the launcher and both workers (each in its own session) die at once
    for pid in [process.pid, *_children(process.pid)]:
        os.kill(pid, signal.SIGKILL)
    process.communicate(timeout=60)
    reached = len(_steps(run))
    assert reached < 12, "killed after the end"

    result = _finish(_start(command))
    assert "resumed from" in result.stderr, result.stderr[-3000:]
    expected, got = load_file(str(reference / WEIGHTS)), load_file(str(run / WEIGHTS))
    differ = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not differ, f"killed after {reached} logged steps: {len(differ)} tensors differ, e.g. {differ[:3]}"
    assert _steps(run) == list(range(1, 13)), "each step once in loss.jsonl"
    losses = [r["loss"] for r in runs.read_loss_log(run)]
    assert losses == [r["loss"] for r in runs.read_loss_log(reference)]


def _readme_command(prefix: str) -> list[str]:
    """The README's own line that starts with `prefix` (inside its code blocks), split as a shell would."""
    import shlex

    readme = Path(__file__).resolve().parents[1] / "README.md"
    lines = [line for line in readme.read_text().splitlines() if line.startswith(prefix)]
    assert lines, f"the README has no line starting with {prefix!r}"
    return shlex.split(lines[0].split("#")[0])


@pytest.mark.slow
def test_the_readmes_torchrun_line_trains_as_two_processes_on_a_cpu(tmp_path):
    """The README's multi-process line as written (no --device cpu), with fewer steps and its own output folder: both
    processes share one run (gloo on the CPU), one pipeline is saved, exit 0. Before the fix each worker trained alone
    and the two collided while saving."""
    command = _readme_command("torchrun --nproc_per_node 2 -m ddpmkit train")
    assert "--device" not in command
    command[command.index("--max_steps") + 1] = "3"
    command[command.index("--output_dir") + 1] = str(tmp_path / "ddp")
    command[0] = str(TORCHRUN)
    command.insert(1, "--standalone")  # a free rendezvous port (the README's default port may be taken by another test)
    env = {**ENV, "DDPMKIT_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stderr and "1 process(es)" not in result.stderr, result.stderr[-3000:]
    run = tmp_path / "ddp"
    assert [p.relative_to(run) for p in run.rglob("model_index.json")] == [Path("model_index.json")]
    state = runs.read_train_state(run)
    assert state["num_processes"] == 2 and state["global_step"] == 3
    assert state["weights_checksum_per_process"][0] == state["weights_checksum_per_process"][1]
