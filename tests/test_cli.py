"""The `ddpmkit` command end to end: train -> sample on a tiny folder, `python -m ddpmkit`, `schedule`, the
diffusers flag aliases, and every user error as exit code 2 with exactly one line on stderr and no traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import MICRO_UNET, save_plain_pipeline, write_images
from PIL import Image

import ddpmkit
from ddpmkit.cli import build_parser, config_from_args
from ddpmkit.config import TrainConfig

BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
# a run small enough for a few seconds: micro UNet, 8x8, 2 steps, a 4-image 2-step sample grid
TINY_RUN = ["--image_size", "8", "--max_steps", "2", "--batch_size", "4", "--device", "cpu",
            "--num_sample_images", "4", "--sample_steps", "2"]


def ddpmkit_cmd(*args, cwd=None, module: bool = False) -> subprocess.CompletedProcess:
    """Run the installed console script (or `python -m ddpmkit`) in a fresh process."""
    head = [sys.executable, "-m", "ddpmkit"] if module else [str(BIN / "ddpmkit")]
    return subprocess.run([*head, *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)



@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny image folder, a micro UNet config JSON and a plain diffusers pipeline, shared by this module."""
    root = tmp_path_factory.mktemp("cli")
    write_images(root / "images", n=8, size=12)
    write_images(root / "images" / "nested", n=2, size=12, seed=1)
    (root / "micro.json").write_text(json.dumps({**MICRO_UNET, "_class_name": "UNet2DModel"}))
    save_plain_pipeline(root / "plain")
    return root


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow  # two fresh processes (~10-20 s on a shared 2-core machine)
def test_train_then_sample_end_to_end(workdir):
    run = workdir / "run"
    # the flag names of diffusers' train_unconditional.py, as aliases
    result = ddpmkit_cmd("train", "--dataset_name", workdir / "images", "--resolution", 8, "--train_batch_size", 2,
                         "--learning_rate", 1e-3, "--gradient_accumulation_steps", 2, "--unet_config",
                         workdir / "micro.json", "--max_steps", 2, "--device", "cpu", "--num_sample_images", 4,
                         "--sample_steps", 2, "--output_dir", run)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    config = json.loads((run / "train_config.json").read_text())
    assert (config["dataset"], config["image_size"], config["batch_size"], config["lr"],
            config["grad_accumulation_steps"]) == (str(workdir / "images"), 8, 2, 1e-3, 2)
    losses = [json.loads(line) for line in (run / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses] == [1, 2] and all(np.isfinite(r["loss"]) for r in losses)
    assert all(r["lr"] == pytest.approx(1e-3) for r in losses)
    for name in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                 "scheduler/scheduler_config.json", "loss_curve.png", "samples.png"):
        assert (run / name).is_file(), name
    unet_config = json.loads((run / "unet/config.json").read_text())
    assert unet_config["sample_size"] == 8 and unet_config["block_out_channels"] == [8, 16]

    out = workdir / "out" / "grid.png"
    result = ddpmkit_cmd("sample", "--model", run, "--scheduler", "ddpm", "--steps", 6, "--num_images", 4,
                         "--seed", 5, "--out", out, "--trajectory", 2, "--save_individual")
    assert result.returncode == 0, result.stderr
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * (2 * (8 + 2) + 2), 2 * (2 * (8 + 2) + 2), 3)  # 2x2 grid of 8x8, scale 2
    singles = sorted((workdir / "out" / "grid").glob("*.png"))
    assert len(singles) == 4 and Image.open(singles[0]).size == (8, 8)
    assert Image.open(workdir / "out" / "grid_trajectory.png").height > 0

    # the command is a thin layer: the same call from Python gives the same pixels
    same = ddpmkit.sample(str(run), scheduler="ddpm", steps=6, num_images=4, seed=5, progress=False)
    expected = np.asarray(ddpmkit.make_grid(same.images, scale=2))
    assert np.abs(grid.astype(int) - expected.astype(int)).max() <= 1
    individual = np.asarray(Image.open(singles[2]))
    assert np.abs(individual.astype(int) - ddpmkit.images.to_uint8(same.images)[2].astype(int)).max() <= 1


def test_python_dash_m_and_schedule_plots(workdir):
    out = workdir / "sched" / "schedule.png"
    out.parent.mkdir()
    result = ddpmkit_cmd("schedule", "--beta_schedule", "linear", "--dataset", workdir / "images", "--image_size", 16,
                         "--out", out, module=True)
    assert result.returncode == 0, result.stderr
    plot, strip = Image.open(out), Image.open(workdir / "sched" / "schedule_noised.png")
    assert plot.width >= 300 and plot.height >= 200
    assert strip.width >= 8 * 16 and strip.height >= 16  # 8 noised images of 16x16 in one row


def test_diffusers_flag_aliases_are_accepted():
    args = build_parser().parse_args(["train", "--resolution", "16", "--train_batch_size", "3", "--learning_rate",
                                      "2e-4", "--dataset_name", "some/dataset", "--gradient_accumulation_steps", "4"])
    config = config_from_args(TrainConfig, args)
    assert (config.image_size, config.batch_size, config.lr, config.dataset, config.grad_accumulation_steps) == (
        16, 3, 2e-4, "some/dataset", 4)
    plain = config_from_args(TrainConfig, build_parser().parse_args(["train"]))
    assert (plain.image_size, plain.batch_size, plain.lr, plain.dataset) == (32, 64, None, "emoji")


# ----------------------------------------------------------------------------- user errors
# Each case runs `ddpmkit.cli.main(argv)` in a process forked from one that imported ddpmkit once: a real process
# (its own exit code, its own stderr file descriptor, logging set up from scratch) without paying the imports
# fifteen times. `test_user_errors_through_the_console_script` checks a case the slow, fully real way.
FORK_SERVER = textwrap.dedent("""
    import json, os, sys, traceback
    import ddpmkit.cli, ddpmkit.trainer, ddpmkit.sampling, ddpmkit.plots, ddpmkit.models
    print("ready", flush=True)
    for line in sys.stdin:
        argv, err_path = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os.dup2(os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            try:
                code = ddpmkit.cli.main(argv)
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else 1
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
""")


@pytest.fixture(scope="module")
def cli_process(tmp_path_factory):
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    folder = tmp_path_factory.mktemp("errors")
    server = subprocess.Popen([sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=ENV, cwd=folder)
    assert server.stdout.readline().strip() == "ready"
    counter = iter(range(10**6))

    def run(*argv) -> tuple[int, str]:
        err = folder / f"stderr_{next(counter)}.txt"
        server.stdin.write(json.dumps([list(map(str, argv)), str(err)]) + "\n")
        server.stdin.flush()
        return json.loads(server.stdout.readline()), err.read_text()

    yield run
    server.stdin.close()
    server.wait(timeout=60)
    assert server.stderr.read() == "", "importing ddpmkit must print nothing"


def _error_cases(w: Path) -> dict[str, tuple[list, str]]:
    """name -> (argv, a piece of the expected message). Everything but the mistake is valid."""
    train = ["train", "--dataset", w / "images", "--unet_config", w / "micro.json", *TINY_RUN,
             "--output_dir", w / "err_run"]

    def with_(*extra):
        return [*train, *extra]

    return {
        "missing dataset path": (with_("--dataset", w / "no/such/folder"), "does not exist"),
        "empty folder": (with_("--dataset", w / "empty"), "no images in folder"),
        "only broken images": (with_("--dataset", w / "broken"), "no readable image"),
        "image size the UNet cannot take": (with_("--image_size", 9), "--image_size 9"),
        "unknown preset": (["train", "--dataset", w / "images", "--preset", "huge"], "unknown --preset 'huge'"),
        "unet_config missing": (with_("--unet_config", w / "nope.json"), "does not exist"),
        "unet_config invalid JSON": (with_("--unet_config", w / "bad.json"), "not valid JSON"),
        "max_steps 0": (with_("--max_steps", 0), "--max_steps must be at least 1"),
        "mixed precision value": (with_("--mixed_precision", "fp8"), "--mixed_precision"),
        "fp16 on the CPU": (with_("--mixed_precision", "fp16"), "fp16 needs a GPU"),
        "not a checkpoint": (with_("--resume_from_checkpoint", w / "images"), "not a ddpmkit checkpoint"),
        "model path missing": (["sample", "--model", w / "no_model", "--out", w / "s.png"], "does not exist"),
        "model folder not a pipeline": (["sample", "--model", w / "images", "--out", w / "s.png"],
                                        "not a diffusion pipeline folder"),
        "unknown scheduler": (["sample", "--model", w / "plain", "--scheduler", "nonesuch", "--out", w / "s.png"],
                              "nonesuch"),
        "out not an image": (["sample", "--model", w / "plain", "--out", w / "samples.txt"], "--out"),
        "unknown flag": (["train", "--no_such_flag", "1"], "--no_such_flag"),
        "schedule out not an image": (["schedule", "--out", w / "plot.pdf"], "--out"),
    }


@pytest.fixture(scope="module")
def error_inputs(workdir) -> Path:
    (workdir / "empty").mkdir(exist_ok=True)
    (workdir / "broken").mkdir(exist_ok=True)
    (workdir / "broken" / "a.png").write_bytes(b"not a png")
    (workdir / "broken" / "b.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (workdir / "bad.json").write_text("{layers_per_block: 1,")
    return workdir


@pytest.mark.parametrize("case", list(_error_cases(Path("."))))
def test_user_error_is_one_line_and_exit_code_2(cli_process, error_inputs, case):
    argv, expected = _error_cases(error_inputs)[case]
    code, stderr = cli_process(*argv)
    lines = stderr.splitlines()
    assert code == 2, f"exit code {code}; stderr:\n{stderr}"
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("ddpmkit: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in stderr


@pytest.mark.parametrize("case", ["only broken images"])  # a warning used to come first here
def test_user_errors_through_the_console_script(error_inputs, case):
    argv, expected = _error_cases(error_inputs)[case]
    result = ddpmkit_cmd(*argv)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("ddpmkit: error: ") and expected in result.stderr
