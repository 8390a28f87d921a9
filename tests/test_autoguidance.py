"""Autoguidance (a weaker model of the same kind guides the model) and guidance in a limited interval, through the one
sampling loop: the formula, the model calls inside and outside the interval, the match checks, the CLI, the device."""
from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import make_micro_unet, save_plain_pipeline

from ddpmkit import devices
from ddpmkit.cli import main
from ddpmkit.errors import UserError
from ddpmkit.models import load_pipeline
from ddpmkit.model_guidance import GuidanceInterval, guided_steps
from ddpmkit.prediction import noise_level
from ddpmkit.sampling import model_fn, sample
from ddpmkit.schedulers import make_scheduler, set_timesteps


class Constant(torch.nn.Module):
    """A stand-in UNet whose output is a constant: the guidance arithmetic can be read off it. Counts its rows."""

    def __init__(self, value: float, num_class_embeds=None):
        super().__init__()
        self.value, self.rows = value, []
        self.config = SimpleNamespace(num_class_embeds=num_class_embeds)

    def forward(self, x, t, class_labels=None):
        self.rows.append(x.shape[0])
        return SimpleNamespace(sample=torch.full_like(x, self.value))


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("autoguide")
    return {"main": load_pipeline(save_plain_pipeline(root / "main", seed=0)),
            "bad": load_pipeline(save_plain_pipeline(root / "bad", seed=1)),
            "root": root}


def test_autoguidance_is_the_guide_lerped_towards_the_model():
    """out = guide + w (model - guide) (EDM2's generate_images.py); w = 1 is the model alone, in one call."""
    x, t = torch.zeros(2, 3, 4, 4), torch.tensor(10)
    main_net, guide = Constant(1.0), Constant(0.25)
    for w in (0.0, 1.0, 2.0, 3.5):
        out = model_fn(main_net, guide_unet=guide, guide_scale=w)(x, t)
        assert torch.allclose(out, torch.full_like(x, 0.25 + w * 0.75)), w
    guide.rows.clear()
    model_fn(main_net, guide_unet=guide, guide_scale=2.0)(x, t, False)  # outside the interval: the model alone
    assert guide.rows == []


def test_cfg_outside_the_interval_is_one_conditional_call():
    x, t, labels = torch.zeros(3, 3, 4, 4), torch.tensor(10), torch.tensor([0, 1, 0])
    net = Constant(0.5, num_class_embeds=3)
    predict = model_fn(net, class_labels=labels, cfg_scale=3.0)
    predict(x, t, True)
    predict(x, t, False)
    assert net.rows == [6, 3]  # a CFG pair (conditional and unconditional rows), then the conditional rows only


def test_a_guide_equal_to_the_model_gives_the_plain_images(pipes):
    """D_bad + w (D - D_bad) with D_bad = D is D: any scale gives exactly the unguided images."""
    plain = sample(pipes["main"], scheduler="ddim", steps=6, num_images=3, seed=0, progress=False, dtype="fp32")
    same = sample(pipes["main"], scheduler="ddim", steps=6, num_images=3, seed=0, progress=False, dtype="fp32",
                  autoguide=pipes["root"] / "main", autoguide_scale=3.0)
    assert torch.equal(plain.images, same.images)
    assert same.guide_calls == 6 and plain.guide_calls == 0


def test_autoguidance_changes_the_images_and_the_interval_limits_it(pipes):
    common = dict(scheduler="ddim", steps=10, num_images=2, seed=0, progress=False, dtype="fp32",
                  autoguide=pipes["bad"])
    plain = sample(pipes["main"], scheduler="ddim", steps=10, num_images=2, seed=0, progress=False, dtype="fp32")
    guided = sample(pipes["main"], autoguide_scale=2.0, **common)
    assert (guided.images - plain.images).abs().max() > 1e-3
    everywhere = sample(pipes["main"], autoguide_scale=2.0, guidance_interval="0,1e9", **common)
    assert torch.equal(everywhere.images, guided.images)  # an interval holding every step changes nothing
    nowhere = sample(pipes["main"], autoguide_scale=2.0, guidance_interval="1e8,1e9", **common)
    assert torch.equal(nowhere.images, plain.images) and nowhere.guide_calls == 0
    middle = sample(pipes["main"], autoguide_scale=2.0, guidance_interval="0.5,5", **common)
    assert 0 < middle.guide_calls < 10 and middle.settings["guidance_interval"] == "sigma 0.5..5"


@pytest.mark.parametrize("name", ["ddim", "euler", "dpm++", "heun"])
def test_the_interval_is_read_in_noise_levels_of_each_scheduler(pipes, name):
    """sigma = sqrt((1 - ab) / ab) of each step, whether the scheduler steps timesteps or a sigma array."""
    sched = make_scheduler(name, pipes["main"].scheduler.config)
    set_timesteps(sched, 8)
    interval = GuidanceInterval(1.0, 10.0)
    flags = guided_steps(sched, interval)
    alphas_cumprod = pipes["main"].scheduler.alphas_cumprod.double()
    for flag, t in zip(flags, sched.timesteps):
        t = float(t)  # the sigma of a (possibly fractional) timestep, interpolated in log sigma as diffusers does
        lo, hi = math.floor(t), min(math.ceil(t), len(alphas_cumprod) - 1)
        sig = lambda i: math.sqrt((1 - float(alphas_cumprod[i])) / float(alphas_cumprod[i]))  # noqa: E731
        sigma = math.exp(math.log(sig(lo)) + (t - lo) * (math.log(sig(hi)) - math.log(sig(lo)))) if hi != lo else sig(lo)
        if abs(sigma - 1.0) > 0.05 and abs(sigma - 10.0) > 0.5:  # away from the edges, where rounding decides
            assert flag == (1.0 < sigma <= 10.0), (t, sigma, flag)
    assert any(flags) and not all(flags)
    timestep = GuidanceInterval.parse("t:200,700")
    assert guided_steps(sched, timestep) == [200 <= float(t) <= 700 for t in sched.timesteps]
    assert noise_level(sched, sched.timesteps[-1]) < noise_level(sched, sched.timesteps[0])


def test_a_guide_of_another_kind_is_one_clear_line(pipes, tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler

    other_size = save_plain_pipeline(tmp_path / "size16", sample_size=16)
    other_schedule = save_plain_pipeline(tmp_path / "linear", beta_schedule="linear")
    other_prediction = save_plain_pipeline(tmp_path / "v", prediction_type="v_prediction")
    classes = tmp_path / "classes"
    DDPMPipeline(unet=make_micro_unet(8, num_class_embeds=3), scheduler=DDPMScheduler(
        beta_schedule="squaredcos_cap_v2")).save_pretrained(classes)
    for guide, words in ((other_size, "image size 16 (the guide) vs 8"), (other_schedule, "another noise schedule"),
                         (other_prediction, "prediction type v_prediction (the guide) vs epsilon"),
                         (classes, "classes 3 class embeddings (the guide) vs unconditional")):
        with pytest.raises(UserError) as err:
            sample(pipes["main"], scheduler="ddim", steps=2, num_images=1, progress=False, autoguide=guide)
        assert words in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("kwargs, words", [
    (dict(autoguide="emoji32", cfg_scale=3.0), "use one of them"),
    (dict(guidance_interval="0.3,5"), "applies to --cfg_scale or --autoguide"),
    (dict(autoguide="self", guidance_interval="5,1"), "LO,HI with 0 <= LO < HI"),
    (dict(autoguide="self", guidance_interval="x:1,2"), "LO,HI"),
    (dict(autoguide="self", autoguide_scale=-1.0), "--autoguide_scale must be"),
    (dict(autoguide="self", autoguide_scale=float("nan")), "--autoguide_scale must be"),
    (dict(cfg_scale=float("nan")), r"--cfg_scale must be a finite number \(got nan\)"),
    (dict(cfg_scale=float("inf")), r"--cfg_scale must be a finite number \(got inf\)"),
])
def test_guidance_mistakes_are_one_line(pipes, kwargs, words):
    if kwargs.get("autoguide") == "self":
        kwargs = {**kwargs, "autoguide": pipes["main"]}
    with pytest.raises(UserError, match=words):
        sample(pipes["main"], scheduler="ddim", steps=2, num_images=1, progress=False, **kwargs)


def test_cli_autoguide_with_an_interval(pipes, tmp_path, capsys, caplog):
    out = tmp_path / "ag.png"
    code = main(["-q", "sample", "--model", str(pipes["root"] / "main"), "--scheduler", "ddim", "--steps", "4",
                 "--num_images", "2", "--autoguide", str(pipes["root"] / "bad"), "--autoguide_scale", "2.5",
                 "--guidance_interval", "0.2,50", "--out", str(out)])
    assert code == 0 and out.exists()
    with caplog.at_level(logging.INFO, logger="ddpmkit"):  # --compare's rows count the guide's calls too
        assert main(["sample", "--model", str(pipes["root"] / "main"), "--compare", "ddim:4,euler:3", "--num_images",
                     "2", "--autoguide", str(pipes["root"] / "bad"), "--guidance_interval", "0.2,50", "--out",
                     str(out)]) == 0
    rows = [r.getMessage() for r in caplog.records if r.getMessage().endswith("calls)")]
    assert rows == ["ddim, 4 steps (4 + 3 calls)", "euler karras, 3 steps (3 + 1 calls)"], rows  # in 0.2-50 only
    code = main(["sample", "--model", str(pipes["root"] / "main"), "--steps", "2", "--autoguide",
                 str(tmp_path / "missing"), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("ddpmkit: error:"), err


@pytest.mark.parametrize("argv, words", [
    (["--autoguide", "none", "--autoguide_scale", "3"], "--autoguide_scale applies to autoguidance, which --autoguide "
                                                        "none turns off"),
    (["--autoguide_scale", "-2"], "--autoguide_scale must be a number >= 0 (got -2.0)"),
    (["--cfg_scale", "nan", "--class_label", "1"], "--cfg_scale must be a finite number (got nan)"),
])
def test_cli_guidance_values_are_checked_before_the_default_guidance_is_announced(tmp_path, capsys, argv, words):
    """On emoji32 (which has a default guidance) a bad value is the one line, not after the default's INFO line; a
    scale with guidance off is refused (it was ignored), NaN CFG too (it drew black images)."""
    code = main(["sample", "--model", "emoji32", "--steps", "2", "--num_images", "2", *argv,
                 "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and words in err[0], err
    assert not (tmp_path / "x.png").exists()


def test_sampling_goes_to_the_gpu_by_default_when_there_is_one(monkeypatch):
    """The one device rule: a model on the CPU is sampled on CUDA when a GPU is visible (faked here: nothing moves),
    a model already on a device stays there, and --device overrides."""
    from ddpmkit.sampling import _sampling_device

    unet = make_micro_unet(8)
    assert _sampling_device(unet, None) == torch.device("cpu")
    monkeypatch.setattr(devices, "cuda_available", lambda: True)
    assert _sampling_device(unet, None) == torch.device("cuda")
    assert _sampling_device(unet, "cpu") == torch.device("cpu")
    monkeypatch.setattr(devices, "cuda_available", lambda: False)
    monkeypatch.setattr(devices, "mps_available", lambda: True)
    assert devices.default_device() == torch.device("mps")
    with pytest.raises(UserError, match="no CUDA GPU is visible"):
        devices.resolve_device("cuda")


def test_a_models_default_guidance_is_used_when_none_is_asked_for(pipes, tmp_path, caplog):
    """A model whose ddpmkit.json stores a default guidance (as the bundled emoji32 may) samples with it from
    `ddpmkit sample` and `ddpmkit eval` when no guidance is asked for; what is asked for wins; 'none' turns it off."""
    import shutil

    import numpy as np
    from PIL import Image

    from ddpmkit import runs
    from ddpmkit.model_guidance import model_guidance

    model = tmp_path / "model"
    shutil.copytree(pipes["root"] / "main", model)
    guide = str(pipes["root"] / "bad")
    runs.write_meta(model, {"default_guidance": {"autoguide": guide, "autoguide_scale": 2.5,
                                                 "guidance_interval": "0.2,50", "why": "FID -20%"}})
    chosen, note = model_guidance(str(model))
    assert chosen == {"autoguide": guide, "autoguide_scale": 2.5, "guidance_interval": "0.2,50"}
    assert note.startswith(f"{model}'s default guidance: autoguidance by {guide} at scale 2.5 in 0.2,50 (FID -20%)")
    assert model_guidance(str(model), autoguide_scale=3.0)[0]["autoguide_scale"] == 3.0  # a scale given wins
    assert model_guidance(str(model), autoguide="none") == ({"autoguide": None, "autoguide_scale": 2.0,
                                                             "guidance_interval": None}, None)
    assert model_guidance(str(model), cfg_scale=3.0)[1] is None  # CFG asked for: no autoguidance added
    assert model_guidance(str(model), cfg_scale=1.0)[1] is None  # --cfg_scale 1 given: plain conditional, as asked
    assert model_guidance(str(pipes["root"] / "main"))[1] is None  # no default stored: plain

    def images(*flags):
        out = tmp_path / f"{len(list(tmp_path.glob('*.png')))}.png"
        assert main(["sample", "--model", str(model), "--scheduler", "ddim", "--steps", "4", "--num_images", "2",
                     "--seed", "0", "--dtype", "fp32", "--save_individual", *flags, "--out", str(out)]) == 0
        return torch.stack([torch.from_numpy(np.asarray(Image.open(p))) for p in sorted(out.with_suffix("").glob("*.png"))])

    with caplog.at_level("INFO", logger="ddpmkit"):
        default = images()
    assert any("default guidance: autoguidance by" in r.getMessage() for r in caplog.records)
    explicit = images("--autoguide", guide, "--autoguide_scale", "2.5", "--guidance_interval", "0.2,50")
    plain = images("--autoguide", "none")
    assert torch.equal(default, explicit) and not torch.equal(default, plain)
