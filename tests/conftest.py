"""Shared fixtures: tiny UNets, pipelines saved by plain diffusers, small image folders made in the test."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DDPMKIT_CACHE", tempfile.mkdtemp(prefix="ddpmkit-test-cache-"))  # the sampling speed cache
torch.set_num_threads(1)  # tiny models: threads only add overhead, and CI shares 2 cores

from ddpmkit.models import PRESETS  # noqa: E402  (after the environment: huggingface_hub reads it on import)

MICRO_UNET = dict(PRESETS["micro"])  # ~20k parameters: a full 1000-step loop takes a few seconds on CPU


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (the benchmark scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


# ----------------------------------------------------------------------------- real `ddpmkit` processes, forked
# Each run is `ddpmkit.cli.main(argv)` in a process forked from a server that imported ddpmkit once: a real process
# (its own pid to SIGKILL or SIGTERM, its own exit code and stderr) without paying ~10 s of imports per run.
FORK_SERVER = """
import json, os, resource, sys, traceback
sys.path.insert(0, {tests!r})
import ddpmkit.cli, ddpmkit.trainer, ddpmkit.sampling, ddpmkit.models, ddpmkit.data, ddpmkit.hub, ddpmkit.plots
import pause_harness
print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    if request["op"] == "wait":
        _, status = os.waitpid(request["pid"], 0)
        print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        os.environ.update(request["env"])
        if request["max_file_bytes"]:
            resource.setrlimit(resource.RLIMIT_FSIZE, (request["max_file_bytes"],) * 2)
        if request["pause_at"]:
            pause_harness.pause_at(request["pause_at"], request["paused"])
        try:
            code = ddpmkit.cli.main(request["argv"])
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(json.dumps(pid), flush=True)
"""

CLI_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}


class ForkedCli:
    """start(argv) -> pid of a running `ddpmkit` process; wait(pid) -> (exit code, stderr); run(argv) does both."""

    def __init__(self, folder: Path):
        import subprocess
        import sys

        self.folder, self.count, self.stderr = folder, 0, {}
        self.server = subprocess.Popen([sys.executable, "-c", FORK_SERVER.format(tests=str(Path(__file__).parent))],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True, env=CLI_ENV, cwd=folder)
        assert self.server.stdout.readline().strip() == "ready", self.server.stderr.read()

    def _ask(self, request: dict):
        import json

        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        return json.loads(self.server.stdout.readline())

    def start(self, *argv, pause_at: str | None = None, paused: Path | None = None, max_file_bytes: int = 0,
              env: dict | None = None) -> int:
        self.count += 1
        stderr = self.folder / f"stderr_{self.count}.txt"
        pid = self._ask({"op": "start", "argv": list(map(str, argv)), "stderr": str(stderr), "env": env or {},
                         "pause_at": pause_at, "paused": str(paused or ""), "max_file_bytes": max_file_bytes})
        self.stderr[pid] = stderr
        return pid

    def wait(self, pid: int) -> tuple[int, str]:
        code = self._ask({"op": "wait", "pid": pid})
        return code, self.stderr.pop(pid).read_text()

    def run(self, *argv, **kwargs) -> tuple[int, str]:
        return self.wait(self.start(*argv, **kwargs))

    @staticmethod
    def alive(pid: int) -> bool:
        """Running (not exited and waiting to be reaped)."""
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except (OSError, IndexError):
            return False

    def close(self) -> str:
        self.server.stdin.close()
        self.server.wait(timeout=60)
        return self.server.stderr.read()


@pytest.fixture(scope="session")
def forked_cli(tmp_path_factory):
    if not hasattr(os, "fork") or not Path("/proc/self/stat").exists():
        pytest.skip("needs os.fork and /proc (Linux)")
    cli = ForkedCli(tmp_path_factory.mktemp("forked_cli"))
    yield cli
    assert cli.close() == "", "importing ddpmkit must print nothing"
