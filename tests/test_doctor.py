"""`ddpmkit doctor`: a healthy run passes every check, and a run broken one way is named in one line with what to do:
data in [0, 1], a learning rate that diverges (or one too small to learn), a wrong prediction type in the saved
scheduler, an EMA that has not caught up, a sampler that fails where ddpm does not; before training, from the flags.

The runs are the micro preset at 8x8 with T = 100 (so that ddpm at full steps is 100 calls), v-prediction and a
learning rate of 3e-3, on 8 copies of one smooth image: 150 steps make a model whose samples look like the data,
which is what a healthy run must show."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_evaluation import PixelFeatures

from ddpmkit.doctor import CHECKS, doctor, open_subject
from ddpmkit.doctor.checks import OVERFIT_FACTOR, OVERFIT_STEPS
from ddpmkit.doctor.sampled import check_sampler
from ddpmkit.trainer import train

STEPS = 150


def gradient(low: int = 0, high: int = 255, size: int = 8) -> np.ndarray:
    """A smooth RGB image from `low` to `high`: horizontal, vertical and reversed ramps."""
    ramp = np.linspace(low, high, size)
    channels = [np.broadcast_to(ramp[None, :], (size, size)), np.broadcast_to(ramp[:, None], (size, size)),
                np.broadcast_to(ramp[::-1][None, :], (size, size))]
    return np.stack(channels, -1).round().astype(np.uint8)


def _train(root: Path, name: str, low: int) -> Path:
    folder = root / f"data_{name}"
    folder.mkdir(parents=True)
    for i in range(8):
        Image.fromarray(gradient(low)).save(folder / f"g{i}.png")
    return train(preset="micro", image_size=8, batch_size=8, max_steps=STEPS, lr=3e-3, device="cpu",
                 num_train_timesteps=100, prediction_type="v_prediction", random_flip=False, dataset=str(folder),
                 output_dir=str(root / f"run_{name}"), use_ema=True, checkpointing_steps=STEPS // 3,
                 num_sample_images=4, sample_steps=2, log_every=50)


@pytest.fixture(scope="module")
def runs_made(tmp_path_factory):
    """A healthy run (data spanning [-1, 1]) and one trained on data in [0, 1] (the same image, 128..255)."""
    root = tmp_path_factory.mktemp("doctor")
    return {"healthy": _train(root, "full", 0), "zero_one": _train(root, "half", 128), "root": root}


def _doctor(target, tmp_path, **kw):
    return doctor(target, report_dir=tmp_path / "report", features=PixelFeatures(), **kw)


def _pipeline_copy(run: Path, to: Path) -> Path:
    """The pipeline files of a run alone (what a user's own training loop saves: no training config, no data)."""
    to.mkdir()
    for name in ("model_index.json", "unet", "scheduler"):
        (shutil.copytree if (run / name).is_dir() else shutil.copy)(run / name, to / name)
    return to


def test_a_healthy_run_passes_every_check(runs_made, tmp_path):
    report = _doctor(runs_made["healthy"], tmp_path)
    assert [(f.check, f.status) for f in report.findings] == [(name, "ok") for name in CHECKS], report.lines()
    text = {f.check: f.text for f in report.findings}
    factor = float(text["overfit"].split("(x")[1].split(",")[0])
    assert factor >= OVERFIT_FACTOR and f"{OVERFIT_STEPS} AdamW steps at lr 3.0e-03" in text["overfit"]
    assert "its outputs fit v_prediction best" in text["config"]
    assert "decay 0.97" in text["ema"] and "checkpoint of step 100" in text["ema"]
    assert (tmp_path / "report" / "batch.png").is_file() and (tmp_path / "report" / "samplers.png").is_file()
    assert report.lines()[-1] == f"no problem found in the run {runs_made['healthy']}"
    assert all(line.endswith(" s)") for line in report.lines()[:-1])  # each check says what it cost


def test_a_model_trained_on_data_in_0_1_is_named(runs_made, tmp_path):
    """Its pipeline alone, with the real data (in [-1, 1] as ddpmkit reads it): the samples fit the data mapped to
    [0, 1]; the run itself, with the data it saw: the batch has nothing below 0."""
    pipe = _pipeline_copy(runs_made["zero_one"], tmp_path / "pipe")
    report = _doctor(pipe, tmp_path, checks=("data",), dataset=str(runs_made["root"] / "data_full"))
    [finding] = report.problems
    assert "trained on images in [0, 1], not [-1, 1]" in finding.text and "Normalize([0.5], [0.5])" in finding.advice
    assert len(finding.line().splitlines()) == 1
    [finding] = _doctor(runs_made["zero_one"], tmp_path, checks=("data",)).problems
    assert "nothing below 0, as data in [0, 1] would be" in finding.text


def test_a_wrong_prediction_type_in_the_scheduler_config_is_named(runs_made, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs_made["healthy"], run)
    config = run / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "epsilon"}))
    [finding] = _doctor(run, tmp_path, checks=("config",)).problems
    assert "prediction_type 'epsilon' but the model trained with 'v_prediction'" in finding.text
    assert "the UNet's outputs fit v_prediction best" in finding.text
    assert finding.advice == 'set "prediction_type": "v_prediction" in scheduler/scheduler_config.json'
    # a plain pipeline (no training config): the UNet's outputs alone name it
    pipe = _pipeline_copy(run, tmp_path / "pipe")
    [finding] = _doctor(pipe, tmp_path, checks=("config",), dataset=str(runs_made["root"] / "data_full")).problems
    assert "the scheduler says epsilon but the UNet's outputs fit v_prediction" in finding.text


def test_an_ema_that_has_not_caught_up_is_named(runs_made, tmp_path):
    """The pipeline's EMA weights replaced by the initial ones (an EMA of decay 0.9999 without warm-up, a few
    hundred steps in): worse than the raw weights of the checkpoint by far."""
    from safetensors.torch import save_file

    run = tmp_path / "run"
    shutil.copytree(runs_made["healthy"], run)
    fresh = open_subject(run).fresh_unet()
    save_file(fresh.state_dict(), str(run / "unet" / "diffusion_pytorch_model.safetensors"))
    [finding] = _doctor(run, tmp_path, checks=("ema",)).problems
    assert "the EMA has not caught up with training" in finding.text and "--ema_max_decay" in finding.advice


def test_a_run_still_training_is_examined_with_its_last_saved_pipeline(runs_made, tmp_path, caplog):
    """No final pipeline yet (training, or stopped): the checks that sample take its newest step_N pipeline, as
    'ddpmkit sample' advises for such a run; they were skipped ('no pipeline saved yet')."""
    run = tmp_path / "run"
    shutil.copytree(runs_made["healthy"], run)
    for step in (100, 50):
        _pipeline_copy(run, run / f"step_{step}")
    for name in ("model_index.json", "unet", "scheduler", "ddpmkit.json"):
        (shutil.rmtree if (run / name).is_dir() else Path.unlink)(run / name)
    with caplog.at_level(logging.INFO, logger="ddpmkit"):
        [finding] = _doctor(run, tmp_path, checks=("sampler",)).findings
    assert finding.status == "ok", finding.line()
    assert f"the checks that sample use its last saved one, {run / 'step_100'}" in caplog.text


def test_a_learning_rate_that_diverges_or_cannot_learn_is_named(runs_made, tmp_path):
    [finding] = _doctor(runs_made["healthy"], tmp_path, checks=("overfit",), lr=10.0).problems
    assert "the learning rate diverges" in finding.text and finding.advice.startswith("lower --lr (try 1e+00)")
    [finding] = _doctor(runs_made["healthy"], tmp_path, checks=("overfit",), lr=1e-8).problems
    assert "the model cannot learn" in finding.text and "raise --lr" in finding.advice


def test_the_sampler_check_tells_a_sampler_problem_from_a_model_problem(runs_made, tmp_path):
    subject = open_subject(runs_made["healthy"])
    data_like = subject.batch()
    noise = torch.rand(data_like.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    subject._cache[("samples", "ddpm", 100, 8, False)] = data_like
    subject._cache[("samples", "auto", None, 8, False)] = noise
    finding = check_sampler(subject, tmp_path)
    assert finding.status == "problem" and "the sampler is at fault" in finding.text
    subject._cache[("samples", "ddpm", 100, 8, False)] = noise
    finding = check_sampler(subject, tmp_path)
    assert finding.status == "problem" and "the model is at fault, not the sampler" in finding.text
    # a scheduler that cannot run the model at all (DPM++ SDE has no x0 prediction in diffusers)
    pipe = _pipeline_copy(runs_made["healthy"], tmp_path / "pipe")
    config = pipe / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "sample"}))
    [finding] = _doctor(pipe, tmp_path, checks=("sampler",), scheduler="dpm++sde").problems
    assert "dpm++sde cannot sample this model" in finding.text and "--scheduler ddpm" in finding.advice


def test_doctor_command_before_training_and_on_a_run(runs_made, tmp_path, capsys):
    from ddpmkit.cli import main

    data = str(runs_made["root"] / "data_full")
    flags = ["--dataset", data, "--preset", "micro", "--image_size", "8", "--batch_size", "8", "--no-random_flip",
             "--device", "cpu", "--report_dir", str(tmp_path / "report")]
    code = main(["-q", "doctor", *flags, "--lr", "10"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 1 and [line.split(":")[0] for line in lines[:-1]] == ["ok", "problem", "ok", "skip", "skip"]
    assert lines[1].startswith("problem: overfit: the loss went from") and " -> lower --lr" in lines[1]
    assert lines[3].startswith("skip: ema: trained without --use_ema")
    assert lines[-1] == "1 problem found in the training config"
    code = main(["-q", "doctor", str(runs_made["healthy"]), "--checks", "data,config", "--report_dir",
                 str(tmp_path / "report")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and [line.split(":")[:2] for line in lines[:-1]] == [["ok", " data"], ["ok", " config"]]


@pytest.mark.parametrize("argv, expected", [
    (["NOWHERE"], "model folder NOWHERE does not exist"),
    (["EMPTY"], "neither a run folder"),
    (["--checks", "data,speed"], "unknown check(s) speed"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--checks", "data", "--dataset", "emoji:flags", "--report_dir", "FILE/report"],
     "cannot write to --report_dir"),  # before any check runs (an OSError line without the flag before)
])
def test_doctor_mistakes_are_one_line_and_exit_2(tmp_path, capsys, argv, expected):
    from ddpmkit.cli import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("a file, not a folder")
    names = {"NOWHERE": str(tmp_path / "nowhere" / "run"), "EMPTY": str(tmp_path / "empty"),
             "FILE/report": str(tmp_path / "a_file" / "report")}
    code = main(["-q", "doctor", "--report_dir", str(tmp_path / "report"), *[names.get(a, a) for a in argv]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expected in err.replace(str(tmp_path / "nowhere" / "run"),
                                                                                  "NOWHERE"), err
