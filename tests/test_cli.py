"""The `ddpmkit` command end to end: train -> sample on a tiny folder, `python -m ddpmkit`, `schedule`, the
diffusers flag aliases, and every user error as exit code 2 with exactly one line on stderr and no traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import MICRO_UNET, save_plain_pipeline, write_images
from PIL import Image

import ddpmkit
from ddpmkit import runs
from ddpmkit.cli import build_parser, config_from_args
from ddpmkit.config import TrainConfig

BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
# a run small enough for a few seconds: micro UNet, 8x8, 2 steps, a 4-image 2-step sample grid
TINY_RUN = ["--image_size", "8", "--max_steps", "2", "--batch_size", "4",
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
                         workdir / "micro.json", "--max_steps", 2, "--num_sample_images", 4,
                         "--sample_steps", 2, "--output_dir", run)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    config = runs.read_train_config(run)
    assert (config["dataset"], config["image_size"], config["batch_size"], config["lr"],
            config["grad_accumulation_steps"]) == (str(workdir / "images"), 8, 2, 1e-3, 2)
    losses = runs.read_loss_log(run)
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
    assert np.abs(individual.astype(int) - ddpmkit.images.to_uint8_hwc(same.images)[2].astype(int)).max() <= 1


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
    assert (plain.image_size, plain.batch_size, plain.lr, plain.dataset) == (None, 64, None, "emoji")
    assert plain.validate().image_size == 32  # from scratch: the course's size (a fine-tune: its model's)


# ----------------------------------------------------------------------------- user errors
# Each case runs `ddpmkit.cli.main(argv)` in a process forked from one that imported ddpmkit once (conftest's
# `forked_cli`): a real process (its own exit code, its own stderr, logging set up from scratch) without paying the
# imports for each case. `test_user_errors_through_the_console_script` checks a case the slow, fully real way.
def _error_cases(w: Path) -> dict[str, tuple[list, str]]:
    """name -> (argv, a piece of the expected message). Everything but the mistake is valid."""
    train = ["train", "--dataset", w / "images", "--unet_config", w / "micro.json", *TINY_RUN,
             "--output_dir", w / "err_run"]
    finetune = ["finetune", "--start_model", w / "plain", "--dataset", w / "images", "--image_size", 8, "--max_steps",
                1, "--output_dir", w / "err_ft"]

    def with_(*extra):
        return [*train, *extra]

    def sample(model="plain", *extra):
        return ["sample", "--model", w / model, "--steps", 2, "--num_images", 2, "--out", w / "s.png", *extra]

    return {
        # train: data
        "missing dataset path": (with_("--dataset", w / "no/such/folder"), "does not exist"),
        "empty folder": (with_("--dataset", w / "empty"), "no images in folder"),
        "only broken images": (with_("--dataset", w / "broken"), "no readable image"),
        "image column with an image folder": (with_("--image_column", "img"), "--image_column img has no effect"),
        "image column that does not exist": (with_("--dataset", w / "data.parquet", "--image_column", "nosuch"),
                                             "no column 'nosuch'"),
        "label column that does not exist": (with_("--dataset", w / "data.parquet", "--class_column", "nosuch"),
                                             "no label column 'nosuch'"),
        # a folder, emoji or fashion_mnist has no columns: any name was read as 'label', so a typo trained on classes
        "label column of an image folder other than label": (with_("--class_column", "labels"),
                                                             "no label column 'labels'"),
        "label column of the emoji set other than label": (with_("--dataset", "emoji", "--class_column", "category"),
                                                           "whose classes (its categories) are the column 'label'"),
        "classes from a folder with images outside class sub-folders": (
            with_("--class_column", "label"), "8 image(s) at the top of"),
        "cache folder under a file": (with_("--cache_dir", w / "a_file/cache"), "cannot write to --cache_dir"),
        "cache cap 0": (with_("--cache_max_gb", 0), "--cache_max_gb must be a positive number"),
        # train: model and numbers
        "image size the UNet cannot take": (with_("--image_size", 9), "--image_size 9"),
        "image size 0": (with_("--image_size", 0), "--image_size must be at least 1"),
        "unknown preset": (["train", "--dataset", w / "images", "--preset", "huge"], "unknown --preset 'huge'"),
        "unet_config missing": (with_("--unet_config", w / "nope.json"), "does not exist"),
        "unet_config invalid JSON": (with_("--unet_config", w / "bad.json"), "not valid JSON"),
        "unet_config wrong type": (with_("--unet_config", w / "wrong_type.json"), "layers_per_block is 'two'"),
        "max_steps 0": (with_("--max_steps", 0), "--max_steps must be at least 1"),
        "train seed past numpy's range": (with_("--seed", 2**32), "--seed must be an integer from 0 to 4294967295"),
        "batch size 0": (with_("--batch_size", 0), "--batch_size must be at least 1"),
        "negative batch size": (with_("--batch_size", -4), "--batch_size must be at least 1"),
        "num_epochs negative": (with_("--num_epochs", -1), "--num_epochs must be at least 1"),
        "lr 0": (with_("--lr", 0), "--lr must be a positive number"),
        "accumulation 0": (with_("--grad_accumulation_steps", 0), "--grad_accumulation_steps must be at least 1"),
        "checkpoint limit 0": (with_("--checkpoints_total_limit", 0), "--checkpoints_total_limit must be at least 1"),
        "skip_nonfinite negative": (with_("--skip_nonfinite", -1), "--skip_nonfinite must be 0 or more"),
        "max_grad_norm negative": (with_("--max_grad_norm", -1), "--max_grad_norm must be 0"),
        "cond_drop_prob 1.5": (with_("--cond_drop_prob", 1.5), "--cond_drop_prob must be in [0, 1)"),
        "channels 2": (with_("--channels", 2), "--channels"),
        "unknown lr scheduler": (with_("--lr_scheduler", "zigzag"), "--lr_scheduler"),
        "mixed precision value": (with_("--mixed_precision", "fp8"), "--mixed_precision"),
        "fp16 on the CPU": (with_("--mixed_precision", "fp16"), "fp16 needs a GPU"),
        "cuda without a GPU": (with_("--device", "cuda"), "no CUDA GPU"),
        "cuda:N in train": (with_("--device", "cuda:1"), "choose it with CUDA_VISIBLE_DEVICES=1 and --device cuda"),
        "unknown train device": (with_("--device", "tpu"), "--device must be one of auto, cpu, cuda, mps"),
        "push without a repo id": (with_("--push_to_hub"), "--push_to_hub needs --hub_model_id"),
        # train: output and checkpoints (the output folder is checked before the data: this dataset does not exist)
        "output folder under a file": (with_("--dataset", w / "no/such/folder", "--output_dir", w / "a_file/run"),
                                       "cannot write to --output_dir"),
        "new run over an earlier run's checkpoints": (with_("--output_dir", w / "old_run"),
                                                      "holds the checkpoints of an earlier run (the latest: step_0000004)"),
        "not a checkpoint": (with_("--resume_from_checkpoint", w / "images"), "not a ddpmkit checkpoint"),
        "incomplete checkpoint": (with_("--resume_from_checkpoint", w / "ckpt/.tmp_step_0000004"),
                                  "incomplete checkpoint"),
        "unknown flag": (["train", "--no_such_flag", "1"], "--no_such_flag"),
        # finetune
        "finetune without a model": (["finetune", "--dataset", w / "images"], "--start_model"),
        "finetune model missing": ([*finetune, "--start_model", w / "no_model"], "does not exist"),
        "finetune model not a pipeline": ([*finetune, "--start_model", w / "images"], "not a diffusion pipeline"),
        "finetune size the UNet cannot take": ([*finetune, "--image_size", 9], "--image_size 9"),
        "finetune channels differ": ([*finetune, "--channels", 1], "use --channels 3"),
        "finetune prediction type change": ([*finetune, "--prediction_type", "v_prediction"], "cannot change"),
        # sample: numbers
        "steps 0": (sample("plain", "--steps", 0), "--steps must be at least 1"),
        "negative steps": (sample("plain", "--steps", -5), "--steps must be at least 1"),
        "num_images 0": (sample("plain", "--num_images", 0), "--num_images must be at least 1"),
        "sample batch size 0": (sample("plain", "--batch_size", 0), "--batch_size must be at least 1"),
        "scale 0": (sample("plain", "--scale", 0), "--scale must be at least 1"),
        "negative trajectory": (sample("plain", "--trajectory", -1), "--trajectory must be at least 0"),
        # seeds outside numpy's range: a traceback from dpm++sde's Brownian tree / accelerate's set_seed
        "negative seed": (sample("plain", "--seed", -1), "--seed must be an integer from 0 to 4294967295 (got -1)"),
        "guidance_every 0": (sample("plain", "--guide", "color:#BB2266", "--guidance_every", 0),
                             "--guidance_every must be at least 1"),
        # sample: names and specs
        "unknown scheduler": (sample("plain", "--scheduler", "nonesuch"), "nonesuch"),
        "unknown loss": (sample("plain", "--guide", "sharpness:5"), "--guide 'sharpness:5'"),
        "malformed colour": (sample("plain", "--guide", "color:#GGHHII"), "'#GGHHII'"),
        "guide without an argument": (sample("plain", "--guide", "color"), "--guide 'color'"),
        "guide scale not a number": (sample("plain", "--guide", "color:#BB2266:lots"), "lots"),
        "custom loss module missing": (sample("plain", "--loss", "no_such_module:f"), "no_such_module"),
        "compare unknown scheduler": (sample("plain", "--compare", "ddim:4,bogus:2"), "unknown scheduler 'bogus'"),
        "compare not name:steps": (sample("plain", "--compare", "ddim:four"), "is not NAME:STEPS"),
        "option the scheduler does not take": (sample("plain", "--scheduler", "ddim", "--solver_order", 2),
                                               "--solver_order does not apply to scheduler ddim"),
        "karras for ddpm": (sample("plain", "--scheduler", "ddpm", "--karras"), "--karras does not apply"),
        "eta for dpm++": (sample("plain", "--scheduler", "dpm++", "--eta", 0.5), "--eta applies to ddim only"),
        "eta out of range": (sample("plain", "--scheduler", "ddim", "--eta", 2), "--eta must be between 0"),
        "sample on cuda without a GPU": (sample("plain", "--device", "cuda"), "no CUDA GPU"),
        # sample: model folders
        "model path missing": (sample("no_model"), "does not exist"),
        "model folder not a pipeline": (sample("images"), "not a diffusion pipeline folder"),
        "folder without unet/": (sample("no_unet"), "it needs unet/ and scheduler/"),
        "run without its final pipeline": (sample("old_run"), "is a run without its final pipeline yet: resume it"),
        "folder without model_index.json": (sample("no_index"), "no model_index.json"),
        "unsupported pipeline class": (sample("sd_pipeline"), "'StableDiffusionPipeline' pipeline"),
        "config with a missing field": (sample("missing_field"), "could not load the pipeline"),
        "config with a wrong type": (sample("wrong_type"), "layers_per_block is 'two' (str)"),
        "scheduler config with a wrong type": (sample("wrong_scheduler"), "num_train_timesteps is 'many' (str)"),
        # sample: classes
        "class label out of range": (sample("classes", "--class_label", 7), "--class_label 7 is out of range"),
        "class name unknown": (sample("classes", "--class_label", "zebra"), "unknown --class_label 'zebra'"),
        "class label to an unconditional model": (sample("plain", "--class_label", 0), "not class-conditioned"),
        "cfg scale on an unconditional model": (sample("plain", "--cfg_scale", 3), "--cfg_scale needs"),
        # sample: output
        "out not an image": (["sample", "--model", w / "plain", "--out", w / "samples.txt"], "--out"),
        "out is a folder": (["sample", "--model", w / "plain", "--out", w / "images.png"], "is a folder"),
        # each output is checked before the work that writes it (a path under a file cannot be made)
        "out under a file": ([*sample("plain")[:-1], w / "a_file/s.png"], "cannot write to --out"),
        "eval out under a file": (["eval", "--images", w / "images", "--dataset", w / "images", "--out",
                                   w / "a_file/r.json"], "cannot write to --out"),
        "nearest grid under a file": (["eval", "--images", w / "images", "--dataset", w / "images", "--nearest", 2,
                                       "--nearest_grid", w / "a_file/n.png"], "cannot write to --nearest_grid"),
        "ema out under a file": (["ema", w / "plain", "--sigma_rel", 0.1, "--out", w / "a_file/e"],
                                 "cannot write to --out"),
        "schedule out under a file": (["schedule", "--out", w / "a_file/p.png"], "cannot write to --out"),
        # eval: numbers (a negative size was a RuntimeError traceback, 0 was read as the default)
        "eval image size negative": (["eval", "--images", w / "images", "--dataset", w / "images", "--image_size", -8],
                                     "--image_size must be at least 2 (got -8)"),
        "eval negative seed": (["eval", "--images", w / "images", "--dataset", w / "images", "--seed", -2],
                               "--seed must be an integer from 0"),
        "eval image size 0": (["eval", "--images", w / "images", "--dataset", w / "images", "--image_size", 0],
                              "--image_size must be at least 2 (got 0)"),
        # schedule, schedulers, the command itself
        "schedule out not an image": (["schedule", "--out", w / "plot.pdf"], "--out"),
        "schedule model missing": (["schedule", "--model", w / "no_model", "--out", w / "p.png"], "does not exist"),
        "schedule negative seed": (["schedule", "--seed", -1, "--out", w / "p.png"], "--seed must be an integer"),
        "schedule image size 0": (["schedule", "--image_size", 0, "--out", w / "p.png"],
                                  "--image_size must be at least 1"),
        "schedule dataset missing": (["schedule", "--dataset", w / "no/such", "--out", w / "p.png"], "does not exist"),
        "schedule unknown beta schedule": (["schedule", "--beta_schedule", "cubic", "--out", w / "p.png"],
                                           "--beta_schedule"),
        "schedulers with an argument": (["schedulers", "--fast"], "--fast"),
        "no subcommand": ([], "required"),
        "unknown subcommand": (["trian"], "'trian'"),
    }


def _valid_cases(w: Path) -> dict[str, list]:
    """Unusual but valid: these must run (exit 0)."""
    return {
        "ddim with eta 0, one image": ["sample", "--model", w / "plain", "--scheduler", "ddim", "--eta", 0, "--steps",
                                       2, "--num_images", 1, "--out", w / "ok1.png"],
        "ddpm with eta 0 (no noise change)": ["sample", "--model", w / "plain", "--scheduler", "ddpm", "--eta", 0,
                                              "--steps", 2, "--num_images", 2, "--batch_size", 1, "--out",
                                              w / "ok2.png"],
        "class 0 with cfg 0 (unconditional)": ["sample", "--model", w / "classes", "--class_label", 0, "--cfg_scale", 0,
                                               "--steps", 2, "--num_images", 2, "--out", w / "ok3.png"],
        "batch larger than the data, latest with no checkpoint": [
            "train", "--dataset", w / "images", "--unet_config", w / "micro.json", *TINY_RUN, "--batch_size", 100,
            "--max_steps", 1, "--resume_from_checkpoint", "latest", "--output_dir", w / "ok_run"],
        "schedule of a saved model": ["schedule", "--model", w / "plain", "--out", w / "ok_schedule.png"],
    }


def _edit_json(path: Path, **changes) -> None:
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def error_inputs(workdir) -> Path:
    import shutil

    import datasets

    from conftest import make_micro_unet

    w = workdir
    (w / "empty").mkdir(exist_ok=True)
    (w / "broken").mkdir(exist_ok=True)
    (w / "broken" / "a.png").write_bytes(b"not a png")
    (w / "broken" / "b.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (w / "bad.json").write_text("{layers_per_block: 1,")
    (w / "wrong_type.json").write_text(json.dumps({**MICRO_UNET, "layers_per_block": "two"}))
    (w / "a_file").write_text("a file, not a folder")
    (w / "images.png").mkdir(exist_ok=True)
    (w / "ckpt" / ".tmp_step_0000004").mkdir(parents=True, exist_ok=True)
    (w / "ckpt" / ".tmp_step_0000004" / "model.safetensors").write_bytes(b"")
    (w / "old_run" / "checkpoints" / "step_0000004").mkdir(parents=True, exist_ok=True)  # an earlier run's checkpoint
    (w / "old_run" / "checkpoints" / "step_0000004" / runs.CHECKPOINT_MARKER).write_text('{"global_step": 4}')
    datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8))] * 2, "label": [0, 1]},
                               features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
                               ).to_parquet(str(w / "data.parquet"))
    for name in ("no_unet", "no_index", "sd_pipeline", "missing_field", "wrong_type", "wrong_scheduler"):
        shutil.copytree(w / "plain", w / name)
    shutil.rmtree(w / "no_unet" / "unet")
    (w / "no_index" / "model_index.json").unlink()
    _edit_json(w / "sd_pipeline" / "model_index.json", _class_name="StableDiffusionPipeline")
    _edit_json(w / "missing_field" / "unet" / "config.json", block_out_channels=None)
    _edit_json(w / "wrong_type" / "unet" / "config.json", layers_per_block="two")
    _edit_json(w / "wrong_scheduler" / "scheduler" / "scheduler_config.json", num_train_timesteps="many")
    from diffusers import DDPMPipeline, DDPMScheduler

    DDPMPipeline(unet=make_micro_unet(8, num_class_embeds=4), scheduler=DDPMScheduler()).save_pretrained(w / "classes")
    runs.write_meta(w / "classes", {"class_names": ["cat", "dog", "owl"], "null_class": 3})
    return w


ERROR_CASES = list(_error_cases(Path(".")))
assert len(ERROR_CASES) >= 40


@pytest.mark.parametrize("case", ERROR_CASES)
def test_user_error_is_one_line_and_exit_code_2(forked_cli, error_inputs, case):
    argv, expected = _error_cases(error_inputs)[case]
    code, stderr = forked_cli.run(*argv)
    lines = stderr.splitlines()
    assert code == 2, f"exit code {code}; stderr:\n{stderr}"
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("ddpmkit: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in stderr


@pytest.mark.parametrize("case", list(_valid_cases(Path("."))))
def test_unusual_but_valid_invocations_run(forked_cli, error_inputs, case):
    code, stderr = forked_cli.run("-q", *_valid_cases(error_inputs)[case])
    assert code == 0, stderr
    assert "error" not in stderr.lower(), stderr


@pytest.mark.parametrize("case", ["only broken images"])  # a warning used to come first here
def test_user_errors_through_the_console_script(error_inputs, case):
    argv, expected = _error_cases(error_inputs)[case]
    result = ddpmkit_cmd(*argv)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("ddpmkit: error: ") and expected in result.stderr


def test_a_failed_command_leaves_no_new_empty_output_folder(forked_cli, error_inputs, tmp_path):
    """The output folder is made (and checked writable) before the input is read: when the input is wrong, the new,
    still empty folders go again; a folder that was there before stays, as does anything the command wrote."""
    w = error_inputs
    there = tmp_path / "there"
    (there / "keep").mkdir(parents=True)
    for argv in (["train", "--dataset", str(w / "nonexistent"), "--output_dir", str(tmp_path / "new" / "run")],
                 ["train", "--dataset", str(w / "nonexistent"), "--output_dir", str(tmp_path / "run2"),
                  "--cache_dir", str(tmp_path / "cache" / "x")],
                 ["sample", "--model", str(w / "nope"), "--out", str(tmp_path / "grids" / "a" / "s.png")],
                 ["eval", "--model", str(w / "nope"), "--dataset", "emoji", "--out", str(tmp_path / "ev" / "r.json")],
                 ["doctor", str(w / "nope"), "--report_dir", str(tmp_path / "report")],
                 ["sample", "--model", str(w / "nope"), "--out", str(there / "keep" / "sub" / "s.png")]):
        code, stderr = forked_cli.run(*argv)
        assert code == 2 and stderr.startswith("ddpmkit: error: "), stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["there"]
    assert [p.relative_to(there).as_posix() for p in there.rglob("*")] == ["keep"]
