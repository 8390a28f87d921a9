"""Quality during training (--eval_every, --keep_best; ddpmkit.train_eval), the progress line's time to --max_steps,
and per-class figures only where the counts allow them: evaluations every N steps and at the last, with the EMA's
and the raw weights' figures, the figures the saved weights really get, TensorBoard scalars, the cost in the log;
the same weights as a run without evaluations; best/ is the pipeline of the lowest FID; a resume keeps the history
and the best; several processes evaluate once, and a wait longer than the process group's timeout does not end it."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_images
from safetensors.torch import load_file
from test_evaluation import PixelFeatures

from ddpmkit import runs
from ddpmkit.cli import main
from ddpmkit.config import TrainConfig
from ddpmkit.data import ImageData
from ddpmkit.errors import UserError
from ddpmkit.evaluation import EvalResult, FeatureCache, ImageSet, fid_from_features, per_class_figures
from ddpmkit.train_eval import QualityDuringTraining, training_reference
from ddpmkit.trainer import Trainer

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
TORCHRUN = Path(sys.executable).parent / "torchrun"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test its own feature cache: whether the reference is extracted or read is the test's to say."""
    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path / "cache"))


def _data() -> ImageData:
    g = torch.Generator().manual_seed(0)
    return ImageData(torch.randint(0, 256, (16, 3, 8, 8), generator=g, dtype=torch.uint8), source="random")


def _config(tmp_path: Path, name: str = "run", **overrides) -> TrainConfig:
    """The micro preset at 8x8; an evaluation every 4 steps of 8 images, DDIM in 2 steps."""
    base = dict(preset="micro", image_size=8, batch_size=4, max_steps=10, device="cpu", num_sample_images=4,
                sample_steps=2, output_dir=str(tmp_path / name), seed=0, eval_every=4, eval_images=8,
                eval_scheduler="ddim", eval_steps=2)
    return TrainConfig(**{**base, **overrides}).validate()


def _trainer(config: TrainConfig) -> tuple[Trainer, QualityDuringTraining]:
    """A Trainer whose evaluations use the cheap PixelFeatures instead of the Inception."""
    trainer = Trainer(config, data=_data())
    hook = next(h for h in trainer.hooks if isinstance(h, QualityDuringTraining))
    hook.features = PixelFeatures()
    return trainer, hook


def _without_clock(records: list[dict]) -> list[dict]:
    """The records without the fields that depend on the clock (seconds, and the share of them)."""
    return [{k: v for k, v in r.items() if not k.endswith("_s") and k != "eval_share"} for r in records]


# ----------------------------------------------------------------------------- evaluations
def test_an_evaluation_every_n_steps_and_at_the_last_with_ema_and_raw_figures(tmp_path, caplog):
    from diffusers import DDPMPipeline
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ddpmkit.sampling import sample

    caplog.set_level(logging.INFO, logger="ddpmkit")
    trainer, hook = _trainer(_config(tmp_path, use_ema=True))
    trainer.run()
    run = tmp_path / "run"
    records = runs.read_eval_log(run)
    assert [r["step"] for r in records] == [4, 8, 10]  # every 4 steps, and the last
    for r in records:
        assert r["weights"] == "ema" and r["images"] == 8
        for prefix in ("", "raw_"):
            assert r[prefix + "fid"] > 0 and r[prefix + "kid_std"] > 0 and np.isfinite(r[prefix + "kid"])
        assert r["eval_s"] > 0 and 0 < r["eval_share"] < 1
        assert r["eval_s"] + 0.25 >= r["sampling_s"] + r["features_s"] + r["raw_sampling_s"] + r["raw_features_s"]
    assert records[0]["fid"] != records[0]["raw_fid"], "the EMA's and the raw weights' figures, not one twice"
    assert [r["train_s"] for r in records] == sorted(r["train_s"] for r in records)
    assert hook.features.calls == [8] * 7, "the reference once, then the EMA's and the raw samples at 3 evaluations"
    assert hook.records == records

    # the last record's FID is the saved pipeline's (EMA weights): seed-0 samples against the training reference
    pipe = DDPMPipeline.from_pretrained(run)
    images = sample(pipe, scheduler="ddim", steps=2, num_images=8, seed=0, progress=False).images
    features = PixelFeatures()
    reference = features(training_reference(_data(), 8, trainer.config).images)
    fake = features(((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
    assert fid_from_features(reference, fake) == pytest.approx(records[-1]["fid"], rel=1e-6)

    # TensorBoard has the figures at the evaluations' steps
    events = EventAccumulator(str(next((run / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/fid")] == [4, 8, 10]
    assert [round(e.value, 3) for e in events.Scalars("eval/raw_fid")] == [round(r["raw_fid"], 3) for r in records]
    # the log: each evaluation's figures and cost; the advice once, as evaluating here outweighs training
    lines = [m for m in caplog.messages if "evaluation took" in m]
    assert len(lines) == 3 and lines[0].startswith("step 4: FID ") and "(ema weights); raw weights: FID" in lines[0]
    assert "% of the training time so far" in lines[0]
    assert sum("would keep it near a tenth" in m for m in caplog.messages) == 1
    # the cards: the final pipeline's has its last evaluation
    assert f"| 10 | ema | {records[-1]['fid']:.2f} |" in (run / "README.md").read_text()


def test_evaluations_leave_the_training_unchanged(tmp_path):
    """Sampling and the features run on copies, with the generators forked: the weights are those of a run without."""
    plain = Trainer(_config(tmp_path, "plain", eval_every=0, use_ema=True), data=_data()).run()
    evaluated, _ = _trainer(_config(tmp_path, "evaluated", eval_every=3, use_ema=True))
    evaluated.run()
    a, b = load_file(str(plain / WEIGHTS)), load_file(str(tmp_path / "evaluated" / WEIGHTS))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_progress_line_shows_the_time_to_max_steps(tmp_path):
    """eta = steps left x the run's seconds per step so far (600 s already trained: as after a resume)."""
    trainer = Trainer(_config(tmp_path, eval_every=0, max_steps=6, log_every=1), data=_data())
    trainer.train_s_before = 600.0
    shown = []
    trainer.callback = lambda info: shown.append(trainer.progress.postfix)
    trainer.run()
    eta = [dict(part.split("=") for part in text.split(", "))["eta"] for text in shown]
    seconds = [int(m) * 60 + int(s) for m, s in (e.split(":") for e in eta)]
    assert seconds[0] == pytest.approx(5 * 600, rel=0.01) and seconds[2] == pytest.approx(3 * 600 / 3, rel=0.01)
    assert eta[-1] == "00:00" and seconds == sorted(seconds, reverse=True)


def test_the_advice_names_the_eval_every_that_keeps_evaluating_near_a_tenth(caplog):
    """100 steps in 150 s (a 10 s reference included), then a 50 s evaluation: 60 of 200 s is 30%; a step takes
    (200 - 60) / 100 = 1.4 s, so 50 s every N steps is a tenth at N = 9 x 50 / 1.4 = 321.4 -> 322."""
    from types import SimpleNamespace

    hook = QualityDuringTraining(_config(Path("unused")), SimpleNamespace(is_main_process=True), PixelFeatures())
    hook.eval_s = 60.0
    caplog.set_level(logging.WARNING, logger="ddpmkit")
    trainer = SimpleNamespace(train_s=150.0, global_step=100, total_steps=1000)
    hook._advise(trainer, 50.0, 200.0)
    hook._advise(trainer, 50.0, 200.0)  # once a run
    assert caplog.messages == ["evaluating takes 30% of the training time so far (50.0 s an evaluation, 1.40 s a "
                               "step): --eval_every 322 (or fewer --eval_images) would keep it near a tenth"]


# ----------------------------------------------------------------------------- --keep_best
def test_keep_best_keeps_the_pipeline_of_the_lowest_fid(tmp_path, monkeypatch):
    """FIDs 50, 30, 30, 45 at steps 3, 6, 9, 12: best/ is step 6's pipeline (an equal FID later does not replace it),
    with its figures in its card and its ddpmkit.json; the final pipeline stays where it is."""
    from diffusers import DDPMPipeline

    fids = iter([50.0, 30.0, 30.0, 45.0])
    monkeypatch.setattr(QualityDuringTraining, "_score", lambda self, pipe, beat: {
        "fid": next(fids), "kid": 0.01, "kid_std": 0.002, "precision": 0.5, "recall": 0.5})
    trainer, _ = _trainer(_config(tmp_path, max_steps=12, eval_every=3, keep_best=True, save_model_every=3))
    trainer.run()
    run = tmp_path / "run"
    best = runs.best_pipeline_dir(run)
    assert runs.read_meta(best)["step"] == 6 and runs.read_meta(best)["evaluation"]["fid"] == 30.0
    a, b = load_file(str(best / WEIGHTS)), load_file(str(run / "step_6" / WEIGHTS))
    assert all(torch.equal(a[k], b[k]) for k in a), "best/ holds the weights of step 6"
    final = load_file(str(run / WEIGHTS))
    assert runs.read_meta(run)["step"] == 12 and not all(torch.equal(a[k], final[k]) for k in a)
    card = (best / "README.md").read_text()
    assert "Kept by `--keep_best`: the lowest FID of the 2 evaluations so far." in card
    assert "| 6 | raw | 30.00 | 0.0100 ± 0.0020 | 8 | not known |" in card
    assert "The lowest FID so far: 30.00 at step 6." in (run / "README.md").read_text()
    DDPMPipeline.from_pretrained(best)  # a complete pipeline
    assert not list(run.glob(".tmp_*")) and not list(best.glob(".tmp_*"))


def test_keep_best_needs_eval_every_and_the_options_are_checked(tmp_path):
    for overrides, message in (({"keep_best": True, "eval_every": 0}, "--keep_best needs --eval_every"),
                               ({"eval_images": 3}, "--eval_images must be at least 4"),
                               ({"eval_scheduler": "fastest"}, "--eval_scheduler must be one of auto, ddpm"),
                               ({"eval_every": -1}, "--eval_every must be 0"),
                               ({"eval_steps": 0}, "--eval_steps must be at least 1")):
        with pytest.raises(UserError, match=message):
            _config(tmp_path, **overrides)


# ----------------------------------------------------------------------------- resume
def test_resume_keeps_the_history_and_the_best(tmp_path):
    """A run killed after step 12's evaluation resumes from its step-6 checkpoint: the evaluations logged after the
    checkpoint (and a line a kill cut short) go, the resumed steps are evaluated again to the same figures (the
    resume is exact), and best/ ends as the uninterrupted run's."""
    config = dict(max_steps=12, eval_every=3, checkpointing_steps=6, keep_best=True, use_ema=True)
    first, _ = _trainer(_config(tmp_path, **config))
    first.run()
    run = tmp_path / "run"
    uninterrupted, best = runs.read_eval_log(run), runs.read_meta(runs.best_pipeline_dir(run))["evaluation"]
    with runs.EvalLog(run).path.open("a") as f:
        f.write('{"step": 13, "fi')  # cut short by the kill
    second, hook = _trainer(_config(tmp_path, **config, resume_from_checkpoint="latest"))
    seen = {}
    second.callback = lambda info: seen.setdefault(info["step"], [r["step"] for r in runs.read_eval_log(run)])
    second.run()
    assert seen[7] == [3, 6], "on resume the history is the checkpoint's"
    resumed = runs.read_eval_log(run)
    assert [r["step"] for r in resumed] == [3, 6, 9, 12] and len(runs.EvalLog(run).path.read_text().splitlines()) == 4
    assert _without_clock(resumed) == _without_clock(uninterrupted)
    assert resumed[:2] == uninterrupted[:2], "the first two are the checkpoint's records, clock and all"
    assert hook.features.calls == [8] * 4, "steps 9 and 12, EMA and raw (the reference: from the cache)"
    assert _without_clock([runs.read_meta(runs.best_pipeline_dir(run))["evaluation"]]) == _without_clock([best])


# ----------------------------------------------------------------------------- the real Inception, from the CLI
def test_train_with_eval_every_on_the_real_inception(tmp_path, caplog):
    write_images(tmp_path / "images", n=8, size=8)
    caplog.set_level(logging.INFO, logger="ddpmkit")
    code = main(["train", "--dataset", str(tmp_path / "images"), "--image_size", "8", "--preset", "micro",
                 "--batch_size", "4", "--max_steps", "4", "--device", "cpu", "--num_sample_images", "2",
                 "--sample_steps", "2", "--eval_every", "4", "--eval_images", "8", "--eval_scheduler", "ddim",
                 "--eval_steps", "2", "--output_dir", str(tmp_path / "run")])
    assert code == 0
    (record,) = runs.read_eval_log(tmp_path / "run")
    assert record["step"] == 4 and record["images"] == 8 and record["fid"] > 0 and "raw_fid" not in record
    cached = list(FeatureCache().folder.glob("features-*-8px-8-*.npz"))
    assert cached, "the reference features are cached as ddpmkit eval caches them"
    assert any("evaluation reference: 8 training images, features computed" in m for m in caplog.messages)


# ----------------------------------------------------------------------------- several processes
@pytest.mark.slow
@pytest.mark.long  # left out of make test for its time (make test-long, CI)
def test_torchrun_two_processes_evaluate_once(tmp_path):
    write_images(tmp_path / "images", n=8, size=12)
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "ddpmkit", "train",
               "--dataset", str(tmp_path / "images"), "--image_size", "8", "--preset", "micro", "--max_steps", "6",
               "--batch_size", "2", "--num_sample_images", "2", "--sample_steps", "2", "--eval_every", "3",
               "--eval_images", "8", "--eval_scheduler", "ddim", "--eval_steps", "2", "--keep_best",
               "--output_dir", str(tmp_path / "run")]
    result = subprocess.run(command, env={**ENV, "DDPMKIT_CACHE": str(tmp_path / "cache")}, capture_output=True,
                            text=True, timeout=600, start_new_session=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in runs.read_eval_log(tmp_path / "run")] == [3, 6], "each evaluation once"
    assert result.stderr.count("evaluation took") == 2 and result.stderr.count("evaluation reference:") == 1
    state = runs.read_train_state(tmp_path / "run")
    assert state["num_processes"] == 2 and len(set(state["weights_checksum_per_process"])) == 1
    assert (runs.best_pipeline_dir(tmp_path / "run") / "model_index.json").exists()


HEARTBEAT_SCRIPT = textwrap.dedent("""
    import datetime, sys, time
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs
    from ddpmkit.errors import UserError
    from ddpmkit.train_eval import MainProcessWork

    TIMEOUT = 3  # seconds: the process group's timeout, far below torch's 30 minutes
    acc = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=TIMEOUT))])

    def long_work(beat):  # 6 s in all, 2 s between two heartbeats
        for _ in range(3):
            time.sleep(2)
            beat()
        return True

    started = time.monotonic()
    assert MainProcessWork(acc).run(long_work) is True  # every process learns the result
    print(f"rank {acc.process_index}: waited {time.monotonic() - started:.1f} s", flush=True)

    def failing(beat):
        beat()
        raise ValueError("broken on the main process")

    try:
        MainProcessWork(acc).run(failing)
    except (ValueError, UserError) as err:
        print(f"rank {acc.process_index}: {type(err).__name__}: {err}", flush=True)
    acc.wait_for_everyone()
    acc.end_training()
""")


@pytest.mark.slow
@pytest.mark.long  # left out of make test for its time (make test-long, CI)
def test_the_heartbeat_outlasts_the_process_group_timeout_and_carries_an_error(tmp_path):
    """Two processes, a gloo timeout of 3 s, 6 s of work on the main process: the other waits it out (one broadcast
    per piece of work, never one wait of 6 s), and an error on the main process ends the wait on the other."""
    script = tmp_path / "heartbeat.py"
    script.write_text(HEARTBEAT_SCRIPT)
    result = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(script)], env=ENV,
                            capture_output=True, text=True, timeout=300, start_new_session=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    # the two processes share one stdout: their lines may run together
    waited = [float(w) for w in re.findall(r"waited ([0-9.]+) s", result.stdout)]
    assert len(waited) == 2 and min(waited) > 5.5, result.stdout  # both outlasted the 3 s timeout
    assert "rank 0: ValueError: broken on the main process" in result.stdout
    assert "rank 1: UserError: the evaluation on the main process failed" in result.stdout


# ----------------------------------------------------------------------------- per-class figures (item 5)
def _per_class(counts: dict[str, int], dims: int, seed: int = 0) -> tuple[ImageSet, dict]:
    rng = np.random.default_rng(seed)
    labels = torch.cat([torch.full((n,), i) for i, n in enumerate(counts.values())])
    reference = ImageSet(torch.zeros(len(labels), 3, 2, 2, dtype=torch.uint8), labels, list(counts))
    real, fake = rng.normal(size=(len(labels), dims)), rng.normal(0.3, 1.0, size=(len(labels), dims))
    return reference, per_class_figures(reference, real.astype(np.float32), fake.astype(np.float32))


def test_a_class_gets_fid_only_from_as_many_images_as_feature_dimensions_and_kid_from_ten():
    _, figures = _per_class({"many": 20, "some": 12, "few": 3}, dims=16)
    assert figures["many"]["fid"] > 0 and figures["many"]["kid_mean"] is not None
    assert figures["some"]["fid"] is None and figures["some"]["kid_std"] > 0
    assert figures["few"]["fid"] is None and figures["few"]["kid_mean"] is None
    lines = [line for line in EvalResult(1.0, 0.0, 0.0, 1.0, 1.0, 35, 35, 1.0, per_class=figures).lines()
             if line.startswith("class")]
    many, some = figures["many"], figures["some"]
    assert lines == [
        f"class      many: FID {many['fid']:.2f}, KID {many['kid_mean']:.4f} ± {many['kid_std']:.4f} "
        "(20 vs 20 images)",
        f"class      some: KID {some['kid_mean']:.4f} ± {some['kid_std']:.4f} (12 vs 12 images; FID needs 16 a side)",
        "class      few: too few images for a figure (3 vs 3; KID needs 10 a side)"]


def test_the_demos_eval_prints_no_per_class_fid():
    """`make demo`'s eval (100 images since 2026-12-07, 150 before) over 11 classes, Inception features (2,048
    dimensions): no class has the images for a FID (two halves of the emoji data score FID 108 at 150 a side)."""
    counts = dict(zip("abcdefghijk", (40, 25, 20, 15, 12, 10, 9, 8, 5, 3, 3)))
    _, figures = _per_class(counts, dims=2048)
    assert all(c["fid"] is None for c in figures.values())
    assert [name for name, c in figures.items() if c["kid_mean"] is not None] == list("abcdef")
