"""Every registered scheduler is a sampler run by the one loop (`ddpmkit.sample` / `denoise`).

Two models: an analytic one (the exact noise predictor for data that is a single image, so every
correct sampler must land on that image), and the micro UNet (real network code, random weights).
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from conftest import make_micro_unet, save_plain_pipeline
from ddpmkit.cli import main
from ddpmkit.errors import UserError
from ddpmkit.sampling import denoise, sample
from ddpmkit.schedulers import AUTO_CHOICE, FIGURES_FILE, REGISTRY, make_scheduler, resolve, scheduler_names

NAMES = scheduler_names()
STEPS = 6


def expected_calls(name: str, steps: int) -> int:
    """UNet calls per image for `steps` steps: what each method costs (Heun and DPM-SDE evaluate twice per step
    except the last; PNDM's PLMS warm-up adds one call)."""
    return {"heun": 2 * steps - 1, "dpm++sde": 2 * steps - 1, "pndm": steps + 1}.get(name, steps)


class PointMassDenoiser(torch.nn.Module):
    """The exact epsilon-predictor when all data is one image x0: eps = (x_t - sqrt(ab_t) x0) / sqrt(1 - ab_t).

    Behaves like UNet2DModel for the sampling loop (forward(sample, timestep).sample, .config, .dtype, .device).
    A fractional t (sigma-based schedulers) is read through log-sigma interpolation, the inverse of diffusers'
    `_sigma_to_t`, so the model sees exactly the noise level the scheduler means.
    """

    def __init__(self, x0: torch.Tensor, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.register_buffer("x0", x0)
        self.register_buffer("log_sigmas", (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).log().double())
        self.config = SimpleNamespace(sample_size=x0.shape[-1], in_channels=x0.shape[0], out_channels=x0.shape[0],
                                      num_class_embeds=None)
        self.calls = 0

    @property
    def dtype(self):
        return self.x0.dtype

    @property
    def device(self):
        return self.x0.device

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        self.calls += 1
        t = torch.as_tensor(timestep, dtype=torch.float64).reshape(())
        last = len(self.log_sigmas) - 1
        lo = t.floor().clamp(0, last).long()
        hi = (lo + 1).clamp(max=last)
        w = t - lo
        sigma = ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()
        alpha_bar = 1 / (1 + sigma**2)
        eps = (sample.double() - alpha_bar.sqrt() * self.x0) / (1 - alpha_bar).sqrt()
        return SimpleNamespace(sample=eps.to(sample.dtype))


class CountingUNet(torch.nn.Module):
    """Wraps a UNet2DModel and counts forward calls."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.calls = 0
        self.modes = set()  # unet.training seen by the calls

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self):
        return self.unet.dtype

    @property
    def device(self):
        return self.unet.device

    def forward(self, *args, **kwargs):
        self.calls += 1
        self.modes.add(self.unet.training)
        return self.unet(*args, **kwargs)



@pytest.fixture(scope="module")
def training_scheduler():
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


@pytest.fixture(scope="module")
def target_image():
    g = torch.Generator().manual_seed(7)
    return torch.rand(3, 8, 8, generator=g) * 1.6 - 0.8  # inside [-0.8, 0.8]: no clipping involved


@pytest.fixture
def point_mass_pipe(training_scheduler, target_image):
    model = PointMassDenoiser(target_image, training_scheduler.alphas_cumprod)
    return SimpleNamespace(unet=model, scheduler=training_scheduler)


@pytest.fixture(scope="module")
def micro_pipe(training_scheduler):
    return SimpleNamespace(unet=CountingUNet(make_micro_unet(8)), scheduler=training_scheduler)


def test_registry_has_the_course_samplers():
    assert NAMES == ["ddpm", "ddim", "pndm", "dpm++", "dpm++sde", "unipc", "euler", "euler_a", "heun", "lms", "deis"]


# These two stop at timestep 0 instead of noise level 0: x = sqrt(ab_0) x0 + sqrt(1 - ab_0) eps, eps the initial noise.
ENDS_AT_T0 = ("pndm", "deis")


@pytest.mark.parametrize("name", NAMES)
def test_every_scheduler_recovers_the_data_with_the_exact_denoiser(name, point_mass_pipe, target_image,
                                                                    training_scheduler):
    out = sample(point_mass_pipe, scheduler=name, steps=10, num_images=2, seed=0, progress=False)
    assert out.images.shape == (2, 3, 8, 8)
    assert torch.isfinite(out.images).all()
    assert point_mass_pipe.unet.calls == out.nfe == expected_calls(name, 10)
    expected = target_image.expand(2, -1, -1, -1)
    if name in ENDS_AT_T0:  # the exact denoiser keeps eps fixed along the (deterministic) trajectory
        alphas_cumprod = training_scheduler.alphas_cumprod
        x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        ab_first, ab_0 = alphas_cumprod[int(out.timesteps[0])], alphas_cumprod[0]
        eps = (x_T - ab_first.sqrt() * target_image) / (1 - ab_first).sqrt()
        expected = ab_0.sqrt() * target_image + (1 - ab_0).sqrt() * eps
        assert (out.images - target_image).abs().max() > 5e-3  # the residual noise is really there
    error = (out.images - expected).abs().max().item()
    assert error < 1e-4, f"{name}: max |x - expected| = {error}"


def test_ddpm_full_1000_step_chain_recovers_the_data(point_mass_pipe, target_image):
    out = sample(point_mass_pipe, scheduler="ddpm", steps=1000, num_images=1, seed=3, progress=False)
    assert point_mass_pipe.unet.calls == 1000
    assert (out.images - target_image).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_every_scheduler_on_the_micro_unet_is_seeded_and_counts_its_calls(name, micro_pipe, training_scheduler):
    unet = micro_pipe.unet
    scheduler = make_scheduler(name, training_scheduler.config)
    scheduler.set_timesteps(STEPS)
    assert len(scheduler.timesteps) == expected_calls(name, STEPS)

    unet.calls, unet.modes = 0, set()
    unet.train()
    # fp32 by name with a given micro-batch: nothing measured, so every call counted is a sampling call
    first = sample(micro_pipe, scheduler=name, steps=STEPS, num_images=4, batch_size=2, seed=0, progress=False,
                   dtype="fp32")
    assert unet.calls == 2 * len(scheduler.timesteps)  # two micro-batches of 2 per step
    assert first.nfe == len(scheduler.timesteps) and len(first.timesteps) == first.nfe
    assert first.images.shape == (4, 3, 8, 8) and torch.isfinite(first.images).all()
    again = sample(micro_pipe, scheduler=name, steps=STEPS, num_images=4, batch_size=2, seed=0, progress=False,
                   dtype="fp32")
    assert torch.equal(first.images, again.images)
    other = sample(micro_pipe, scheduler=name, steps=STEPS, num_images=4, batch_size=2, seed=1, progress=False,
                   dtype="fp32")
    assert (first.images - other.images).abs().max() > 1e-2
    assert unet.modes == {False} and unet.training  # eval while sampling, the caller's mode restored after


def test_ddim_eta_0_is_a_deterministic_map_from_x_T(micro_pipe, training_scheduler):
    unet = micro_pipe.unet.unet
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(eta, generator_seed):
        scheduler = make_scheduler("ddim", training_scheduler.config)
        scheduler.set_timesteps(10)
        x, _, _ = denoise(unet, scheduler, x_T.clone(), generator=torch.Generator().manual_seed(generator_seed),
                          eta=eta)
        return x

    assert torch.equal(run(0.0, 1), run(0.0, 2))  # no noise is drawn: the generator does not matter
    assert (run(1.0, 1) - run(1.0, 2)).abs().max() > 1e-2  # eta 1 adds fresh noise each step


def _figures(name: str, matches: bool = True) -> dict:
    """A scheduler's entry of sampler_figures.json at its current defaults (made-up figures)."""
    _, steps, options = resolve(name)
    per_schedule = {"spread": 0.98, "mode_tv": 0.017, "swd": 0.0097, "center": 0.0045}
    return {"steps": steps, "options": options, "nfe": steps, "matches": matches, "reference": name == "ddpm",
            "linear": per_schedule, "squaredcos_cap_v2": per_schedule}


def test_schedulers_command_prints_each_ones_defaults_and_figures(capsys, monkeypatch):
    from ddpmkit import schedulers

    exact = {"schedulers": {name: _figures(name, matches=name != "ddim") for name in NAMES}}
    exact["schedulers"]["heun"] = {**exact["schedulers"]["heun"], "steps": 25}  # measured before a change
    real = {"model": "emoji32", "num_images": 1000, "rows": [
        {"row": "auto", "scheduler": "deis", "steps": 15, "options": {"karras": True, "solver_order": 3}, "nfe": 15,
         "fid": 21.5},
        {"row": "ddim-10", "scheduler": "ddim", "steps": 10, "options": {}, "nfe": 10, "fid": 60.25},
        # the auto row's setting measured again under its scheduler's name (as the shipped table has): shown once
        {"row": "deis", "scheduler": "deis", "steps": 15, "options": {"solver_order": 3, "karras": True}, "nfe": 15,
         "fid": 21.5}]}
    monkeypatch.setattr(schedulers, "measured_figures", lambda: {"exact_score": exact, "real_model": real})
    assert main(["schedulers"]) == 0
    lines = capsys.readouterr().out.rstrip().splitlines()
    heads = [line for line in lines if not line.startswith(" ")]
    assert [line.split()[0] for line in heads] == ["auto", *NAMES]
    auto, steps, _ = resolve("auto")
    assert heads[0].startswith(f"auto      {auto}, {steps} steps") and "21.5 at 15 steps" in lines[1]
    for head, name in zip(heads[1:], NAMES):
        _, steps, options = resolve(name)
        assert head.split()[1:3] == [str(steps), "steps" + ("," if options else "")]
        assert ("karras" in head) == bool(options.get("karras")) and "not installed" not in head
        description, exact_line, real_line = (line.strip() for line in lines[lines.index(head) + 1:][:3])
        assert description == REGISTRY[name].description
        if name == "heun":
            assert "measured at other settings" in exact_line
            continue
        assert exact_line.startswith("exact-score model, linear / cosine: spread 0.980 / 0.980"), exact_line
        assert exact_line.endswith({"ddpm": "the reference", "ddim": "outside ddpm-1000's bounds"}.get(
            name, "matches ddpm-1000"))
        assert real_line == ("FID on emoji32: 60.2 at 10 steps (10 calls)" if name == "ddim" else
                             "FID on emoji32: 21.5 at 15 steps, karras, order 3 (15 calls)" if name == "deis" else
                             "FID on emoji32: not measured")


@pytest.mark.skipif(not FIGURES_FILE.is_file(), reason="run 'make samplers-table' (writes ddpmkit/sampler_figures.json)")
def test_shipped_figures_are_of_the_current_defaults_and_match_ddpm_1000():
    """The figures 'ddpmkit schedulers' prints were measured at the registry's defaults, and each matched."""
    figures = json.loads(FIGURES_FILE.read_text())["schedulers"]
    assert set(figures) == set(NAMES)
    for name, entry in figures.items():
        _, steps, options = resolve(name)
        assert (entry["steps"], entry["options"]) == (steps, options), f"{name}: rerun make samplers-table"
        assert entry["matches"], name


def test_defaults_fill_what_is_not_given_and_flags_reach_the_plain_settings():
    name, steps, options = resolve("dpm++")
    spec = REGISTRY["dpm++"]
    assert (name, steps, options) == ("dpm++", spec.default_steps, spec.defaults) and options["karras"]
    assert resolve("dpm++", 40)[1:] == (40, spec.defaults)  # --steps alone keeps the options
    assert resolve("dpm++", karras=False)[2] == {**spec.defaults, "karras": False}  # --no-karras
    plain = resolve("dpm++", timestep_spacing="trailing")[2]  # a spacing alone: uniform steps, so no Karras
    assert "karras" not in plain and plain["timestep_spacing"] == "trailing"
    both = resolve("dpm++", karras=True, timestep_spacing="trailing")[2]
    assert both["karras"] and both["timestep_spacing"] == "trailing"
    assert resolve("ddpm") == ("ddpm", 1000, {})
    auto = {k: v for k, v in AUTO_CHOICE.items() if k not in ("scheduler", "steps")}
    assert resolve("auto") == (AUTO_CHOICE["scheduler"], AUTO_CHOICE["steps"], auto)  # auto as it was
    with pytest.raises(UserError, match="unknown scheduler"):
        resolve("nope")


def test_sample_at_a_schedulers_defaults_is_the_explicit_setting(point_mass_pipe):
    for name in ("dpm++", "heun", "ddim"):
        _, steps, options = resolve(name)
        alone = sample(point_mass_pipe, scheduler=name, num_images=2, seed=0, progress=False)
        explicit = sample(point_mass_pipe, scheduler=name, steps=steps, num_images=2, seed=0, progress=False,
                          **options)
        assert torch.equal(alone.images, explicit.images) and alone.settings == {"scheduler": name, "steps": steps,
                                                                                 **options}
    plain = sample(point_mass_pipe, scheduler="dpm++", steps=8, karras=False, num_images=2, seed=0, progress=False)
    scheduler = make_scheduler("dpm++", point_mass_pipe.scheduler.config, solver_order=REGISTRY["dpm++"].defaults.get(
        "solver_order"))
    scheduler.set_timesteps(8)
    assert plain.timesteps == [float(t) for t in scheduler.timesteps]  # --no-karras: the model's uniform spacing


def test_sample_help_names_every_schedulers_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = capsys.readouterr().out
    for name in ["auto", *NAMES]:
        scheduler, steps, options = resolve(name)
        line = next(line for line in text.splitlines() if line.startswith(f"  {name} "))
        assert f"{steps} steps" in line and ("karras" in line) == bool(options.get("karras")), line


@pytest.fixture(scope="module")
def plain_folder(tmp_path_factory):
    return save_plain_pipeline(tmp_path_factory.mktemp("sched") / "pipe")


def _grid(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_compare_writes_one_labelled_row_per_scheduler(plain_folder, tmp_path):
    common = ["-q", "sample", "--model", str(plain_folder), "--num_images", "2", "--seed", "0", "--scale", "1"]
    three, one, alone = tmp_path / "three.png", tmp_path / "one.png", tmp_path / "ddim.png"
    assert main(common + ["--compare", "ddpm:20,ddim:10,dpm++:5", "--out", str(three)]) == 0
    assert main(common + ["--compare", "ddim:10", "--out", str(one)]) == 0
    assert main(common + ["--scheduler", "ddim", "--steps", "10", "--out", str(alone)]) == 0
    three, one, alone = _grid(three), _grid(one), _grid(alone)
    row_h = alone.shape[0]  # 2 images of 8 px with 2 px padding: one row
    assert one.shape[0] == row_h and three.shape[0] == 3 * row_h
    label_w = three.shape[1] - alone.shape[1]
    assert label_w > 20  # room for the text labels
    for r in range(3):  # each row has its label drawn (dark pixels left of the images)
        assert (three[r * row_h:(r + 1) * row_h, :label_w] < 128).any()
    # the ddim row is the same images as sampling ddim alone with the same seed
    np.testing.assert_array_equal(three[row_h:2 * row_h, label_w:], alone)


@pytest.mark.parametrize("flags, message", [
    (["--scheduler", "ddim", "--karras"], "--karras does not apply to scheduler ddim"),
    (["--scheduler", "euler", "--solver_order", "2"], "--solver_order does not apply to scheduler euler"),
    (["--scheduler", "dpm++", "--solver_order", "5"], "--solver_order must be 1, 2 or 3"),
    (["--scheduler", "euler", "--eta", "0.5"], "--eta applies to ddim only"),
    (["--scheduler", "ddim", "--timestep_spacing", "sideways"], "invalid choice"),
    (["--scheduler", "nope"], "invalid choice"),
])
def test_sampler_options_that_do_not_apply_are_user_errors(flags, message, plain_folder, tmp_path, capsys):
    code = main(["sample", "--model", str(plain_folder), "--num_images", "1", "--steps", "2",
                 "--out", str(tmp_path / "x.png"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("flags", [
    ["--scheduler", "euler", "--karras", "--timestep_spacing", "trailing"],
    ["--scheduler", "dpm++", "--solver_order", "3", "--karras"],
    ["--scheduler", "ddim", "--eta", "0.5", "--timestep_spacing", "trailing"],
])
def test_sampler_options_that_apply_are_accepted(flags, plain_folder, tmp_path):
    assert main(["-q", "sample", "--model", str(plain_folder), "--num_images", "1", "--steps", "3",
                 "--out", str(tmp_path / "x.png"), *flags]) == 0
    assert Image.open(tmp_path / "x.png").size == (24, 24)  # (8 + 2*2) * scale 2
