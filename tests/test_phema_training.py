"""Post-hoc EMA in training (--posthoc_ema), on the micro preset at 8x8: each snapshot a run writes holds its EMA
profiles at that step exactly; the EMA reconstructed from the snapshots equals an EMA tracked directly on the same
training trajectory (a tracked length to float rounding, lengths between and beyond within a stated bound); a
stopped and resumed run writes the uninterrupted run's snapshots bit for bit; `ddpmkit ema` writes a pipeline that
plain diffusers loads and samples; `ddpmkit eval --sigma_rel` evaluates each length alike; mistakes are one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_images

from ddpmkit import phema, runs
from ddpmkit.cli import main
from ddpmkit.errors import UserError
from ddpmkit.trainer import TrainingHook

EVERY = 4  # --posthoc_ema_every
STEPS = 24
DIRECT = (0.05, 0.07, 0.10, 0.15)  # lengths tracked directly on the trajectory, beside the run's 0.05 and 0.10


def _config(output_dir, **overrides):
    from ddpmkit.config import TrainConfig

    base = dict(preset="micro", image_size=8, batch_size=4, max_steps=STEPS, lr=2e-3, device="cpu", seed=0,
                num_sample_images=2, sample_steps=2, output_dir=str(output_dir), posthoc_ema=True,
                posthoc_ema_every=EVERY)
    return TrainConfig(**{**base, **overrides}).validate()


def _data():
    from ddpmkit.data import ImageData

    return ImageData(torch.randint(0, 256, (12, 3, 8, 8), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8))


class DirectEMA(TrainingHook):
    """Test-only: EMAs at `DIRECT` updated after the same optimizer steps, kept at every step."""

    def __init__(self, unet, accelerator):
        model = accelerator.unwrap_model(unet)
        self.names = [name for name, _ in model.named_parameters()]
        self.ema = phema.PowerFunctionEMA(model.parameters(), DIRECT)
        self.at: dict[int, dict[float, dict[str, torch.Tensor]]] = {}

    def after_step(self, trainer) -> None:
        self.ema.update()
        self.at[self.ema.step] = {s: {n: t.clone() for n, t in zip(self.names, average)}
                                  for s, average in zip(DIRECT, self.ema.averages)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One run with --posthoc_ema (0.05, 0.10, a snapshot every 4 steps) and the test's direct EMAs beside it."""
    from ddpmkit import trainer

    run = tmp_path_factory.mktemp("phema") / "run"
    direct = []
    original = trainer.build_hooks

    def build_hooks(config, unet, accelerator):
        direct.append(DirectEMA(unet, accelerator))
        return [*original(config, unet, accelerator), direct[-1]]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "build_hooks", build_hooks)
        trainer.train(_config(run), data=_data())
    return run, direct[0]


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in pipe.unet.named_parameters()}


def _distance(a: dict, b: dict) -> float:
    return float(sum(((a[n].double() - b[n].double()) ** 2).sum() for n in a) ** 0.5)


def test_each_snapshot_is_the_profiles_at_its_step(trained):
    run, direct = trained
    found = runs.phema_snapshots(run)
    assert [step for step, _ in found] == list(range(EVERY, STEPS + 1, EVERY))
    for step, path in found:
        tensors = runs.read_phema_tensors(path)
        assert len(tensors) == 2 * len(direct.names)
        for sigma in (0.05, 0.10):
            for name in direct.names:  # the same arithmetic on the same weights: bit for bit
                assert torch.equal(tensors[f"sigma_rel={sigma:g}/{name}"], direct.at[step][sigma][name]), (step, name)
        metadata = runs.read_phema_metadata(path)
        assert metadata["step"] == str(step) and json.loads(metadata["sigma_rels"]) == [0.05, 0.1]


def test_reconstruction_at_a_tracked_length_is_the_ema_tracked_directly(trained):
    run, direct = trained
    for step in (STEPS, 12):
        for sigma in (0.05, 0.10):
            pipe, info = phema.ema_pipeline(run, sigma, step=step)
            assert info["step"] == step and info["fit_error"] < 1e-6
            rebuilt, wanted = _weights(pipe), direct.at[step][sigma]
            for name in direct.names:
                torch.testing.assert_close(rebuilt[name], wanted[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sigma, bound", [(0.07, 0.03), (0.15, 0.10)])
def test_reconstruction_between_and_beyond_the_tracked_lengths(trained, sigma, bound):
    """Six snapshots of 24 steps: the reconstructed 0.07 is within 3% of how far apart the two tracked EMAs are
    from the 0.07 tracked directly (measured: 1.3%), 0.15 within 10% (measured: 6.4%); the fit_error the run
    reports (2.1% and 5.5% of the weighting) is of the same size. Not float rounding: the weighting is a
    least-squares fit of power functions, which tightens with more snapshots (16: 0.4% at 0.07, docs/ema.md)."""
    run, direct = trained
    pipe, info = phema.ema_pipeline(run, sigma)
    rebuilt, at = _weights(pipe), direct.at[STEPS]
    spread = _distance(at[0.05], at[0.10])
    error = _distance(rebuilt, at[sigma])
    assert error < bound * spread, (error / spread, info["fit_error"])
    assert 0.005 < info["fit_error"] < 2 * bound
    nearest = min(_distance(rebuilt, at[s]) for s in (0.05, 0.10))
    assert nearest > 5 * error  # not just one of the tracked ones


def test_a_resumed_run_writes_the_uninterrupted_runs_snapshots_bit_for_bit(trained, tmp_path):
    """Stopped after step 14 (checkpoints at 6 and 12), then resumed to step 24 from the checkpoint of step 12: the
    profiles continue exactly. The snapshot of step 14 (written after the checkpoint) and a write a kill cut short
    are removed when the resumed run starts, and step 16 onwards written again."""
    from ddpmkit.trainer import train

    uninterrupted, _ = trained
    run = tmp_path / "run"
    train(_config(run, max_steps=14, checkpointing_steps=6), data=_data())
    assert [step for step, _ in runs.phema_snapshots(run)] == [4, 8, 12, 14]
    killed = runs.phema_dir(run) / ".tmp_step_0000016.safetensors"
    killed.write_bytes(b"half a file")
    assert [step for step, _ in runs.phema_snapshots(run)] == [4, 8, 12, 14]  # a cut write is never listed

    train(_config(run, checkpointing_steps=6, resume_from_checkpoint="latest"), data=_data())
    assert not killed.exists()
    resumed, expected = runs.phema_snapshots(run), runs.phema_snapshots(uninterrupted)
    assert [s for s, _ in resumed] == [s for s, _ in expected] == list(range(EVERY, STEPS + 1, EVERY))
    for (step, mine), (_, theirs) in zip(resumed, expected):
        a, b = runs.read_phema_tensors(mine), runs.read_phema_tensors(theirs)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step

    with pytest.raises(UserError, match="same --posthoc_ema_sigma_rels"):  # another length cannot continue
        train(_config(run, max_steps=30, checkpointing_steps=6, resume_from_checkpoint="latest",
                      posthoc_ema_sigma_rels="0.05"), data=_data())


def test_a_failed_snapshot_write_keeps_the_others_and_says_so_in_one_line(tmp_path, monkeypatch):
    """A full disk at the second snapshot: the run stops with one line, the first snapshot is intact and no partial
    file is left; an older run's snapshot in the folder was removed when this new run began."""
    import errno

    import safetensors.torch

    from ddpmkit.trainer import train

    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if filename.endswith("step_0000008.safetensors"):
            open(filename, "wb").write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    stale = runs.phema_dir(tmp_path / "run") / "step_0000099.safetensors"  # of an older run in the same folder
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    with pytest.raises(UserError) as err:
        train(_config(tmp_path / "run", max_steps=10), data=_data())
    message = str(err.value)
    assert "could not save the post-hoc EMA snapshot of step 8" in message and "free some disk space" in message
    assert "\n" not in message
    assert [p.name for p in sorted(runs.phema_dir(tmp_path / "run").iterdir())] == ["step_0000004.safetensors"]


def test_ddpmkit_ema_writes_a_pipeline_plain_diffusers_loads_and_samples(trained, tmp_path):
    from diffusers import DDPMPipeline

    run, direct = trained
    out = tmp_path / "ema_0.07"
    assert main(["-q", "ema", str(run), "--sigma_rel", "0.07", "--out", str(out)]) == 0
    pipe = DDPMPipeline.from_pretrained(out)
    expected, info = phema.ema_pipeline(run, 0.07)
    loaded = _weights(pipe)
    assert all(torch.equal(loaded[n], t) for n, t in _weights(expected).items())
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all() and images.std() > 0.01
    meta = runs.read_meta(out)
    assert meta["posthoc_ema"] == {k: v for k, v in info.items() if k not in ("model", "train_config")}
    assert meta["posthoc_ema"]["snapshot_steps"] == list(range(EVERY, STEPS + 1, EVERY))
    assert meta["step"] == STEPS and pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    card = (out / "README.md").read_text()
    assert "## Post-hoc EMA" in card and f"--sigma_rel 0.07 --step {STEPS}" in card
    # at an earlier step, into the same folder again: replaced whole
    assert main(["-q", "ema", str(run), "--sigma_rel", "0.07", "--step", "12", "--out", str(out)]) == 0
    assert runs.read_meta(out)["posthoc_ema"]["snapshot_steps"] == [4, 8, 12]


def test_ddpmkit_ema_does_not_replace_a_pipeline_it_did_not_make(trained, tmp_path, capsys):
    """--out on another model's folder (a typo, a tab-completed name) is refused before the reconstruction; that
    folder stays as it was (it was replaced, silently)."""
    from conftest import save_plain_pipeline

    run, _ = trained
    other = save_plain_pipeline(tmp_path / "other")
    before = {p: p.read_bytes() for p in other.rglob("*") if p.is_file()}
    assert main(["-q", "ema", str(run), "--sigma_rel", "0.07", "--out", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a pipeline that 'ddpmkit ema' did not make" in err, err
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == before


class PixelFeatures:
    """A cheap stand-in for the Inception: a fixed random projection of the pixels."""

    identity = {"network": "pixels-phema-test", "sha256": "0" * 64, "resize": "none", "dims": 8}

    def __init__(self, *args, **kwargs):
        self.projection = torch.randn(3 * 64, 8, generator=torch.Generator().manual_seed(0))

    def __call__(self, images, progress=True, desc="features"):
        return (images.float().flatten(1) / 255 @ self.projection).numpy()


def test_eval_sigma_rel_evaluates_each_length_alike_and_names_the_best(trained, tmp_path, monkeypatch, capsys):
    from ddpmkit.evaluation import model as evaluation_model
    from ddpmkit.evaluation import weights_sha256

    run, _ = trained
    write_images(tmp_path / "images", n=12, size=8)
    monkeypatch.setattr(evaluation_model, "InceptionFeatures", PixelFeatures)
    out = tmp_path / "sweep.json"
    code = main(["-q", "eval", "--model", str(run), "--sigma_rel", "0.05,0.07,0.15", "--dataset",
                 str(tmp_path / "images"), "--num_images", "12", "--scheduler", "ddim", "--steps", "3",
                 "--cache_dir", str(tmp_path / "cache"), "--out", str(out)])
    printed = capsys.readouterr().out.splitlines()
    assert code == 0, printed
    saved = json.loads(out.read_text())
    fids = {r["sigma_rel"]: r["fid"] for r in saved["results"]}
    assert list(fids) == [0.05, 0.07, 0.15] and len(set(fids.values())) == 3  # three different models
    assert saved["best_sigma_rel"] == min(fids, key=fids.get) and saved["step"] == STEPS
    for sigma, line in zip(fids, printed[:3]):
        assert line.startswith(f"sigma_rel {sigma:<6g} FID {fids[sigma]:8.3f}")
    assert printed[-2].startswith(f"best       sigma_rel {saved['best_sigma_rel']:g} ")
    for r in saved["results"]:  # each evaluated as `ddpmkit ema` makes it, with the same sampler and seed
        made = r["settings"]["model"]
        assert made["name"] == str(run) and made["posthoc_ema"]["sigma_rel"] == r["sigma_rel"]
        assert made["weights_sha256"] == weights_sha256(phema.ema_pipeline(run, r["sigma_rel"])[0].unet)
        assert (made["seed"], made["steps"], made["num_images"]) == (0, 3, 12)


@pytest.mark.parametrize("argv, says", [
    (["ema", "{empty}", "--sigma_rel", "0.07", "--out", "{tmp}/x"], "has no post-hoc EMA snapshots"),
    (["ema", "emoji32", "--sigma_rel", "0.07", "--out", "{tmp}/x"], "emoji32 is a bundled pipeline, not a run: give"),
    (["ema", "{run}", "--sigma_rel", "0.3", "--out", "{tmp}/x"], "between 0 and 0.28 (got 0.3)"),
    (["ema", "{run}", "--sigma_rel", "0", "--out", "{tmp}/x"], "between 0 and 0.28 (got 0)"),
    (["ema", "{run}", "--sigma_rel", "0.07", "--step", "2", "--out", "{tmp}/x"], "use a step from 4 to 24"),
    (["ema", "{run}", "--sigma_rel", "0.07", "--out", "{run}"], "is the run folder"),
    (["eval", "--sigma_rel", "0.05,0.1", "--dataset", "emoji"], "--sigma_rel needs --model RUN"),
    (["eval", "--images", "{tmp}", "--sigma_rel", "0.05"], "--sigma_rel needs --model RUN"),
    (["eval", "--model", "{run}", "--sigma_rel", "0.05,x"], "lengths separated by commas"),
    (["eval", "--model", "{empty}", "--dataset", "emoji", "--sigma_rel", "0.05"], "has no post-hoc EMA snapshots"),
    (["train", "--posthoc_ema", "--posthoc_ema_sigma_rels", "0.05,0.5"], "each length must be between 0 and"),
    (["train", "--posthoc_ema", "--posthoc_ema_every", "0"], "--posthoc_ema_every must be at least 1"),
    (["train", "--posthoc_ema_every", "100"], "need --posthoc_ema"),
])
def test_mistakes_are_one_line(trained, tmp_path, capsys, argv, says):
    run, _ = trained
    (tmp_path / "empty").mkdir()
    argv = [a.format(run=run, tmp=tmp_path, empty=tmp_path / "empty") for a in argv]
    assert main(["-q", *argv, *(["--output_dir", str(tmp_path / "t")] if argv[0] == "train" else [])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ddpmkit: error: ") and says in err, err
    assert not (tmp_path / "x").exists()


def test_resuming_a_run_without_post_hoc_ema_with_it_is_one_line(tmp_path):
    from ddpmkit.trainer import train

    train(_config(tmp_path / "run", max_steps=4, checkpointing_steps=2, posthoc_ema=False, posthoc_ema_every=None),
          data=_data())
    with pytest.raises(UserError, match="saved by a run without --posthoc_ema, so it has no EMA profiles"):
        train(_config(tmp_path / "run", max_steps=6, resume_from_checkpoint="latest"), data=_data())
