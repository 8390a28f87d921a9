"""Multi-process training on the CPU: `torchrun --nproc_per_node 2 -m ddpmkit train` (gloo) gives one saved
pipeline and the same weights on both processes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MICRO_UNET, write_images
from safetensors.torch import load_file

TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.mark.slow
def test_torchrun_two_processes_train_one_pipeline_with_equal_weights(tmp_path):
    write_images(tmp_path / "images", n=8, size=12)
    (tmp_path / "micro.json").write_text(json.dumps(MICRO_UNET))
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # --standalone: a free local rendezvous port, so two test runs on one machine do not collide on 29500
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "ddpmkit", "train",
               "--dataset", str(tmp_path / "images"), "--image_size", "8",
               "--unet_config", str(tmp_path / "micro.json"), "--max_steps", "3", "--batch_size", "2", "--device", "cpu", "--num_sample_images", "4",
               "--sample_steps", "2", "--output_dir", str(run)]
    # its own session, so that a hang can be cleaned up: torchrun and both workers go with the process group
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail("torchrun did not finish in 240 s (a worker hung at exit?):\n" + stderr[-3000:])
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr

    assert [p.relative_to(run) for p in run.rglob("model_index.json")] == [Path("model_index.json")]
    state = json.loads((run / "train_state.json").read_text())
    assert state["num_processes"] == 2 and state["global_step"] == 3
    checksums = state["weights_checksum_per_process"]
    assert len(checksums) == 2 and checksums[0] == checksums[1], checksums
    # the saved pipeline holds those weights
    saved = load_file(str(run / "unet/diffusion_pytorch_model.safetensors"))
    total = sum(float(t.double().sum()) for t in saved.values())
    assert total == pytest.approx(checksums[0], rel=1e-5, abs=1e-3)
    # one process writes the log: each step once, the loss averaged over both processes
    steps = [json.loads(line)["step"] for line in (run / "loss.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    # 8 images over 2 processes x batch 2: two micro-batches per process and epoch
    assert "2 process(es)" in result.stderr and "2 micro-batches of 2" in result.stderr
