"""Scheduler registry: a name -> a diffusers scheduler built from the model's own scheduler config.

`from_config` keeps the noise schedule the model was trained with (betas, T, prediction_type);
only the sampling rule changes. Options (`karras`, `timestep_spacing`, `solver_order`) are passed
only to schedulers whose constructor accepts them, checked with `inspect.signature`. Each scheduler
has default settings, its measured best on the exact-score model (`resolve` applies them; an option
given explicitly wins). The samplers that step along a sigma array start at noise level
sigma <= SIGMA_MAX (docs/samplers.md says why and what it changes); ddpm, ddim and pndm keep the
model's full schedule.
"""
from __future__ import annotations

import inspect
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ddpmkit.errors import UserError

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# The largest noise level the sigma-array samplers start from: about the classic linear schedule's last sigma
# (sqrt((1 - ab) / ab) = 157 at t = 999), where x_t is still indistinguishable from noise. A squaredcos_cap_v2
# model ends at sigma 20,291 (betas capped at 0.999 in its last steps); Karras spacing from there crashes the
# multistep solvers and Heun's first step diverges. Linear models are below the cap, so they are unchanged.
SIGMA_MAX = 160.0


@dataclass(frozen=True)
class SchedulerSpec:
    class_name: str
    description: str
    default_steps: int
    fixed: dict = field(default_factory=dict)  # constructor arguments that define this sampler
    # What `--scheduler NAME` uses for the options not given (karras, timestep_spacing, solver_order): the measured
    # best on the exact-score model (docs/samplers.md). --no-karras, --timestep_spacing, --solver_order override.
    defaults: dict = field(default_factory=dict)
    # Start at sigma <= SIGMA_MAX. Only for samplers that step along their own sigma array; ddpm, ddim and pndm
    # step t -> t - T // steps, which a shorter schedule would break (and ddpm must equal DDPMPipeline).
    capped: bool = True


# Defaults: per scheduler, the fewest model calls whose samples match ddpm-1000 on the exact-score model on linear
# and squaredcos_cap_v2 schedules alike (spread at least 0.01 inside its bound), at that step count and at every
# larger one measured: the rule `auto` was chosen by. Measured by benchmarks/samplers_table.py; their figures ship
# in sampler_figures.json.
REGISTRY: dict[str, SchedulerSpec] = {
    "ddpm": SchedulerSpec("DDPMScheduler", "DDPM ancestral sampling (Ho et al. 2020): the training chain, the reference",
                          1000, capped=False),
    "ddim": SchedulerSpec("DDIMScheduler", "DDIM (Song et al. 2021): deterministic at eta=0; smooths fine detail "
                          "below hundreds of steps", 500, capped=False),
    "pndm": SchedulerSpec("PNDMScheduler", "PNDM / PLMS (Liu et al. 2022): pseudo linear multistep", 50,
                          {"skip_prk_steps": True}, capped=False),
    "dpm++": SchedulerSpec("DPMSolverMultistepScheduler", "DPM-Solver++ (Lu et al. 2022): multistep ODE solver", 25,
                           {"algorithm_type": "dpmsolver++"}, {"karras": True, "solver_order": 3}),
    "dpm++sde": SchedulerSpec("DPMSolverSDEScheduler", "DPM-Solver++ SDE (Lu et al. 2022): stochastic, 2 model calls "
                              "per step (needs torchsde)", 40, defaults={"karras": True}),
    "unipc": SchedulerSpec("UniPCMultistepScheduler", "UniPC (Zhao et al. 2023): predictor-corrector multistep", 25,
                           defaults={"karras": True, "solver_order": 3}),
    "euler": SchedulerSpec("EulerDiscreteScheduler", "Euler (Karras et al. 2022, Algorithm 2 without churn): first-"
                           "order ODE", 200, defaults={"karras": True}),
    "euler_a": SchedulerSpec("EulerAncestralDiscreteScheduler", "Euler ancestral: Euler steps with fresh noise each "
                             "step", 1000),
    "heun": SchedulerSpec("HeunDiscreteScheduler", "Heun (Karras et al. 2022, Algorithm 1): second order, 2 model "
                          "calls per step", 40, defaults={"karras": True}),
    "lms": SchedulerSpec("LMSDiscreteScheduler", "Linear multistep (k-diffusion's LMS)", 30, defaults={"karras": True}),
    "deis": SchedulerSpec("DEISMultistepScheduler", "DEIS (Zhang & Chen 2023): exponential integrator multistep", 15,
                          defaults={"karras": True, "solver_order": 3}),
}


# `scheduler="auto"` (the default of `ddpmkit sample` and `ddpmkit.sample`): the fewest model calls that both tables
# of docs/samplers.md support: samples that match ddpm at 1000 steps on the exact-score model, for linear and
# squaredcos_cap_v2 models alike (benchmarks/samplers_table.py), with an FID within 10% of ddpm-1000's on the bundled
# emoji32 (benchmarks/quality_per_step.py: 112.3 vs 110.8). Every deterministic sampler passes the first at 15-25
# calls but stays 20%+ above ddpm-1000 on the second (DEIS 15: 142.1), so auto is stochastic.
AUTO = "auto"
AUTO_CHOICE = {"scheduler": "dpm++sde", "steps": 40, "karras": True}  # 79 model calls vs ddpm's 1000

# diffusers' Brownian tree (dpm++sde, so `auto`) asks torchsde for an interval whose end is a float32 rounding past
# the tree's (128.33001708984375 vs 128.330002): harmless, but printed on every run
warnings.filterwarnings("ignore", message=r"Should have (tb|ta)<=t1", category=UserWarning, module="torchsde")


def scheduler_names() -> list[str]:
    return list(REGISTRY)


def is_available(name: str) -> bool:
    """False when the scheduler needs an optional package that is missing (dpm++sde needs torchsde)."""
    try:
        _scheduler_class(name)
        return True
    except UserError:
        return False


def resolve_auto(name: str, steps: int | None = None, **options) -> tuple[str, int | None, dict]:
    """'auto' -> the measured default (scheduler, steps, options); steps or options given explicitly still win."""
    if name != AUTO:
        return name, steps, options
    chosen = {k: v for k, v in AUTO_CHOICE.items() if k not in ("scheduler", "steps")}
    chosen.update({k: v for k, v in options.items() if v is not None})
    return AUTO_CHOICE["scheduler"], steps or AUTO_CHOICE["steps"], chosen


def resolve(name: str, steps: int | None = None, karras: bool | None = None, timestep_spacing: str | None = None,
            solver_order: int | None = None) -> tuple[str, int, dict]:
    """The settings a run uses: (scheduler, steps, options), for a name and what the user gave (None: not given).

    'auto' -> AUTO_CHOICE. Every option not given takes the scheduler's default (`REGISTRY[name].defaults`), and
    steps its `default_steps`. A timestep_spacing given without karras also drops a default Karras: Karras sigmas
    replace the spacing, so a spacing asked for on its own means the uniform steps it names.
    """
    given = {"karras": karras, "timestep_spacing": timestep_spacing, "solver_order": solver_order}
    name, steps, given = resolve_auto(name, steps, **given)
    if name not in REGISTRY:
        _scheduler_class(name)  # the one-line error naming the schedulers
    given = {k: v for k, v in given.items() if v is not None}
    defaults = dict(REGISTRY[name].defaults)
    if "timestep_spacing" in given and "karras" not in given:
        defaults.pop("karras", None)
    return name, steps or REGISTRY[name].default_steps, {**defaults, **given}


def _option_words(options: dict) -> list[str]:
    """['karras', 'linspace', 'order 3']: the options a setting names, in the tables' order."""
    return [word for word in ("karras" if options.get("karras") else "", options.get("timestep_spacing") or "",
                              f"order {options['solver_order']}" if options.get("solver_order") else "") if word]


def settings_label(name: str, options: dict, steps: int | None = None) -> str:
    """A setting as the tables name it: 'dpm++ karras order 3', with ', 25 steps' when steps are given."""
    return " ".join([name, *_option_words(options)]) + (f", {steps} steps" if steps else "")


def settings_words(steps: int, options: dict) -> str:
    """'25 steps, karras, order 3': a setting without its scheduler's name ('ddpmkit schedulers', --help)."""
    return ", ".join([f"{steps} steps", *_option_words(options)])


# What the benchmarks measured, shipped beside this module: each scheduler's defaults on the exact-score model
# (benchmarks/samplers_table.py) and FID per setting on the bundled model (benchmarks/quality_per_step.py).
FIGURES_FILE = Path(__file__).with_name("sampler_figures.json")
QUALITY_FILE = Path(__file__).with_name("quality_per_step.json")


def measured_figures() -> dict:
    """{"exact_score": ..., "real_model": ...} as shipped; None for a file not there (or not readable)."""
    out = {}
    for key, path in (("exact_score", FIGURES_FILE), ("real_model", QUALITY_FILE)):
        try:
            out[key] = json.loads(path.read_text())
        except (OSError, ValueError):
            out[key] = None
    return out


def figures_lines(name: str) -> list[str]:
    """What was measured of scheduler `name` at its defaults ('auto': the auto row), one line per table, as
    'ddpmkit schedulers' prints it: the exact-score model (samplers_table) and FID on the bundled model."""
    figures = measured_figures()
    real = figures["real_model"]
    lines = []
    if name != AUTO:
        _, steps, options = resolve(name)
        exact = (figures["exact_score"] or {}).get("schedulers", {})
        lines.append(_exact_score_line(exact.get(name), steps, options))
    if real:
        where = (f"FID on {real['model']} at {real['num_images']} images (benchmarks/quality_per_step.py): "
                 if name == AUTO else f"FID on {real['model']}: ")
        lines.append(where + _real_model_line(real, name))
    return lines


def _exact_score_line(entry: dict | None, steps: int, options: dict) -> str:
    """This scheduler's defaults on the exact-score model (benchmarks/samplers_table.py)."""
    if not entry:
        return "exact-score model: not measured"
    if entry["steps"] != steps or entry["options"] != options:
        return "exact-score model: measured at other settings (rerun 'make samplers-table')"
    lin, cos = entry["linear"], entry["squaredcos_cap_v2"]
    verdict = "matches ddpm-1000" if entry["matches"] else "outside ddpm-1000's bounds"
    if entry.get("reference"):
        verdict = "the reference"
    return (f"exact-score model, linear / cosine: spread {lin['spread']:.3f} / {cos['spread']:.3f}, mode TV "
            f"{lin['mode_tv']:.3f} / {cos['mode_tv']:.3f}, SWD {lin['swd']:.4f} / {cos['swd']:.4f}, "
            f"{entry['nfe']} model calls: {verdict}")


def _real_model_line(real: dict, name: str) -> str:
    """FID of each measured row of scheduler `name` ('auto': the auto row) on the bundled model."""
    rows, seen = [], set()
    for r in real["rows"]:  # the auto row is also its scheduler's row at the same settings: shown once
        setting = (r["steps"], json.dumps(r["options"], sort_keys=True))
        if (r["row"] == "auto" if name == AUTO else r["scheduler"] == name) and setting not in seen:
            rows.append(r)
            seen.add(setting)
    if not rows:
        return "not measured"
    return "; ".join(f"{r['fid']:.1f} at {settings_words(r['steps'], r['options'])} ({r['nfe']} calls)" for r in rows)


def _scheduler_class(name: str):
    if name not in REGISTRY:
        raise UserError(f"unknown scheduler {name!r}: use one of {', '.join(REGISTRY)} (see 'ddpmkit schedulers')")
    try:
        import diffusers

        cls = getattr(diffusers, REGISTRY[name].class_name)
        inspect.signature(cls.__init__)  # diffusers' dummy object raises here when a backend is missing
        if name == "dpm++sde":
            import torchsde  # noqa: F401
    except ImportError:
        raise UserError(f"scheduler {name} needs the torchsde package: pip install torchsde") from None
    return cls


def default_steps(name: str) -> int:
    """The steps `name` runs when none are given ('auto': AUTO_CHOICE's)."""
    return resolve(name)[1]


def _betas(config: dict) -> torch.Tensor:
    """The training betas of a scheduler config (any beta_schedule, trained_betas, zero-SNR rescaling)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(config).betas


def _truncated(config: dict, keep: int) -> dict:
    """The schedule's first `keep` timesteps: same betas, so t means the same noise level to the model."""
    # trained_betas already holds any zero-SNR rescaling: do not rescale the cut schedule again
    return {**config, "num_train_timesteps": keep, "trained_betas": _betas(config)[:keep].tolist(),
            "rescale_betas_zero_snr": False}


def capped_timesteps(config: dict, sigma_max: float) -> int:
    """How many timesteps have sigma_t = sqrt((1 - ab_t) / ab_t) <= sigma_max (all of them when none is above)."""
    alphas_cumprod = torch.cumprod(1 - _betas(config).double(), 0)
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
    keep = int((sigmas <= sigma_max).sum())
    if keep < 2:
        raise UserError(f"sigma_max {sigma_max} is below the model's smallest noise levels ({float(sigmas[1]):.3g})")
    return keep


def _trailing_safe(num_train_timesteps: int, steps: int) -> int:
    """The largest T' <= T for which diffusers' trailing spacing, np.arange(T', 0, -T'/steps), has `steps` values.

    When T / steps is inexact the float arange can yield one value more, whose timestep is -1 (alphas_cumprod[-1],
    the noisiest level, as the last step): diffusers 0.42 does this for T = 1000, steps = 61.
    """
    keep = num_train_timesteps
    while keep > steps and len(np.arange(keep, 0, -keep / steps)) != steps:
        keep -= 1
    return keep


def make_scheduler(name: str, config: dict, karras: bool | None = None, timestep_spacing: str | None = None,
                   solver_order: int | None = None, seed: int | None = None, steps: int | None = None,
                   sigma_max: float | None = SIGMA_MAX):
    """Scheduler `name` built with `from_config(config)` (the model's schedule) plus validated options.

    Exactly the options given (`resolve` fills in the registry's defaults first; `sample` does). The sigma-array
    samplers (all but ddpm, ddim, pndm) start at sigma <= `sigma_max` (None: the full schedule, as diffusers
    does). With `steps`, the schedule is also cut so that trailing spacing gives exactly `steps` timesteps.
    """
    cls = _scheduler_class(name)
    accepted = set(inspect.signature(cls.__init__).parameters)
    options = dict(REGISTRY[name].fixed)
    requested = {"use_karras_sigmas": karras, "timestep_spacing": timestep_spacing, "solver_order": solver_order}
    flags = {"use_karras_sigmas": "--karras" if karras else "--no-karras", "timestep_spacing": "--timestep_spacing",
             "solver_order": "--solver_order"}
    for key, value in requested.items():
        if value is None:
            continue
        if key not in accepted:
            raise UserError(f"{flags[key]} does not apply to scheduler {name}")
        options[key] = value
    if timestep_spacing is not None and timestep_spacing not in TIMESTEP_SPACINGS:
        raise UserError(f"--timestep_spacing must be one of {', '.join(TIMESTEP_SPACINGS)} (got {timestep_spacing!r})")
    if solver_order is not None and solver_order not in (1, 2, 3):
        raise UserError(f"--solver_order must be 1, 2 or 3 (got {solver_order})")
    if "noise_sampler_seed" in accepted and seed is not None:
        options["noise_sampler_seed"] = seed
    base = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    karras_on = options.get("use_karras_sigmas", base.get("use_karras_sigmas"))
    if karras_on and timestep_spacing is None and "timestep_spacing" in accepted:
        # Karras sigmas span the model's whole noise range (k-diffusion's sigma_min..sigma_max). Euler, Heun, LMS and
        # DPM-SDE take that range from their spaced timesteps, and the model's leading spacing would start them
        # T // steps or more below the top: at sigma 15 instead of 128 for 30 steps on a cosine model. linspace
        # spans t = 0..T-1; the multistep solvers ignore the spacing under Karras.
        options["timestep_spacing"] = "linspace"
    total = base.get("num_train_timesteps", 1000)
    class_spacing = inspect.signature(cls.__init__).parameters.get("timestep_spacing")
    spacing = options.get("timestep_spacing", base.get("timestep_spacing", class_spacing and class_spacing.default))
    # leading spacing stops T // steps below the top on its own; Karras, trailing and linspace start at T - 1
    reaches_top = karras_on or spacing != "leading"
    capped = REGISTRY[name].capped and sigma_max is not None and reaches_top
    keep = capped_timesteps(base, sigma_max) if capped else total
    if steps is not None and spacing == "trailing":
        keep = _trailing_safe(keep, steps)
    if keep < total:
        base = _truncated(base, keep)
    return cls.from_config(base, **options)


def set_timesteps(scheduler, steps: int, device=None) -> None:
    """`scheduler.set_timesteps(steps)`, with multistep Karras timesteps made exact (the fractional t of each sigma).

    DPM-Solver++, UniPC and DEIS cast their Karras timesteps to integers (floor for squaredcos_cap_v2), so the
    model is told another noise level than x has, and near t = 0 several steps share one timestep (IndexError
    at 50 steps on a cosine model). The UNet embeds fractional t as well; t(sigma) inverts diffusers'
    log-sigma interpolation, as Euler and Heun already do.
    """
    scheduler.set_timesteps(steps, device=device)
    sigmas = getattr(scheduler, "sigmas", None)
    timesteps = scheduler.timesteps
    if (getattr(scheduler.config, "use_karras_sigmas", False) and sigmas is not None
            and not timesteps.is_floating_point() and len(sigmas) == len(timesteps) + 1):
        alphas_cumprod = scheduler.alphas_cumprod.double()
        log_sigmas = (((1 - alphas_cumprod) / alphas_cumprod).sqrt()).log().numpy()
        exact = np.interp(np.log(sigmas[:-1].double().numpy()), log_sigmas, np.arange(len(log_sigmas)))
        scheduler.timesteps = torch.as_tensor(exact, dtype=torch.float32, device=timesteps.device)
    if float(scheduler.timesteps.min()) < 0:
        raise UserError(f"{type(scheduler).__name__} made a negative timestep for {steps} steps: use another --steps")


def keeps_sample(scheduler) -> bool:
    """Whether the next `step()` call continues from the x it is given (so that loss guidance may move it).

    Two-stage samplers (heun, dpm++sde) end a step with a second call that restarts from the x stored by the first;
    PNDM's second call does the same. A move made before such a call would be thrown away: guidance moves x once
    per noise level, at the call that keeps it."""
    if getattr(scheduler, "state_in_first_order", True) is False:
        return False
    return not (type(scheduler).__name__ == "PNDMScheduler" and getattr(scheduler, "counter", 0) == 1
                and len(getattr(scheduler, "ets", [])) == 1)


def num_levels(scheduler) -> int:
    """The noise levels a run visits (its steps): heun's and dpm++sde's two calls per step count once."""
    return int(getattr(scheduler, "num_inference_steps", None) or len(scheduler.timesteps))


# Samplers that add fresh noise at every step (the reverse SDE, not the probability-flow ODE). The SDE's drift holds
# the score term twice (Song et al. 2021, eq. 6 vs eq. 13), so it pulls a moved x back toward the model's images twice
# as fast: measured on emoji32, a colour scale at their defaults did half of what it did with the ODE samplers.
STOCHASTIC = ("DDPMScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverSDEScheduler")


def move_factor(scheduler) -> float:
    """How much a loss-guidance move is scaled so that a scale means the same as with an ODE sampler: 2 for SDE
    samplers (ddpm, euler_a, dpm++sde), else 1."""
    return 2.0 if type(scheduler).__name__ in STOCHASTIC else 1.0


def prepare_for_moves(scheduler) -> str | None:
    """Set a scheduler up for loss guidance, which moves x before each step; returns what changed (or None).

    UniPC's corrector recomputes each step's x from the previous step's x, which undoes the move (measured on
    emoji32: colour guidance had almost no effect): it runs predictor-only (UniP, `disable_corrector`) instead."""
    if hasattr(scheduler, "disable_corrector") and type(scheduler).__name__ == "UniPCMultistepScheduler":
        scheduler.disable_corrector = list(range(num_levels(scheduler) + 1))
        return "unipc: corrector off while loss guidance moves x (it would undo the move)"
    return None


def step_kwargs(scheduler, generator=None, eta: float | None = None) -> dict:
    """Extra `step()` arguments, passed only where `scheduler.step` accepts them (as diffusers' pipelines do)."""
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if eta is not None and not 0 <= eta <= 1:
        raise UserError(f"--eta must be between 0 (deterministic DDIM) and 1 (DDPM-like noise) (got {eta})")
    if "generator" in accepted and generator is not None:
        kwargs["generator"] = generator
    if eta is not None:
        if "eta" not in accepted:
            if eta != 0:
                raise UserError(f"--eta applies to ddim only, not {type(scheduler).__name__}")
        else:
            kwargs["eta"] = eta
    return kwargs
