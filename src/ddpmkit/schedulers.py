"""Scheduler registry: a name -> a diffusers scheduler built from the model's own scheduler config.

`from_config` keeps the noise schedule the model was trained with (betas, T, prediction_type);
only the sampling rule changes. Options (`karras`, `timestep_spacing`, `solver_order`) are passed
only to schedulers whose constructor accepts them, checked with `inspect.signature`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import diffusers

from ddpmkit.errors import UserError

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class SchedulerSpec:
    class_name: str
    description: str
    default_steps: int
    fixed: dict = field(default_factory=dict)  # constructor arguments that define this sampler


REGISTRY: dict[str, SchedulerSpec] = {
    "ddpm": SchedulerSpec("DDPMScheduler", "DDPM ancestral sampling (Ho et al. 2020): the training chain, best at 1000 steps", 1000),
    "ddim": SchedulerSpec("DDIMScheduler", "DDIM (Song et al. 2021): deterministic at eta=0, good at 20-50 steps", 50),
    "pndm": SchedulerSpec("PNDMScheduler", "PNDM / PLMS (Liu et al. 2022): pseudo linear multistep", 50,
                          {"skip_prk_steps": True}),
    "dpm++": SchedulerSpec("DPMSolverMultistepScheduler", "DPM-Solver++ 2M (Lu et al. 2022): multistep ODE solver, good at 10-25 steps", 20,
                           {"algorithm_type": "dpmsolver++"}),
    "dpm++sde": SchedulerSpec("DPMSolverSDEScheduler", "DPM-Solver++ SDE (Lu et al. 2022): stochastic, 2 model calls per step (needs torchsde)", 20),
    "unipc": SchedulerSpec("UniPCMultistepScheduler", "UniPC (Zhao et al. 2023): predictor-corrector multistep, good at 10-20 steps", 20),
    "euler": SchedulerSpec("EulerDiscreteScheduler", "Euler (Karras et al. 2022, Algorithm 2 without churn): first-order ODE", 30),
    "euler_a": SchedulerSpec("EulerAncestralDiscreteScheduler", "Euler ancestral: Euler steps with fresh noise each step", 30),
    "heun": SchedulerSpec("HeunDiscreteScheduler", "Heun (Karras et al. 2022, Algorithm 1): second order, 2 model calls per step", 25),
    "lms": SchedulerSpec("LMSDiscreteScheduler", "Linear multistep (k-diffusion's LMS) on Karras-style sigmas", 30),
    "deis": SchedulerSpec("DEISMultistepScheduler", "DEIS (Zhang & Chen 2023): exponential integrator multistep", 20),
}


def scheduler_names() -> list[str]:
    return list(REGISTRY)


def is_available(name: str) -> bool:
    """False when the scheduler needs an optional package that is missing (dpm++sde needs torchsde)."""
    try:
        _scheduler_class(name)
        return True
    except UserError:
        return False


def _scheduler_class(name: str):
    if name not in REGISTRY:
        raise UserError(f"unknown scheduler {name!r}: use one of {', '.join(REGISTRY)} (see 'ddpmkit schedulers')")
    try:
        cls = getattr(diffusers, REGISTRY[name].class_name)
        inspect.signature(cls.__init__)  # diffusers' dummy object raises here when a backend is missing
        if name == "dpm++sde":
            import torchsde  # noqa: F401
    except ImportError:
        raise UserError(f"scheduler {name} needs the torchsde package: pip install torchsde") from None
    return cls


def default_steps(name: str) -> int:
    return REGISTRY[name].default_steps if name in REGISTRY else 50


def make_scheduler(name: str, config: dict, karras: bool | None = None, timestep_spacing: str | None = None,
                   solver_order: int | None = None, seed: int | None = None):
    """Scheduler `name` built with `from_config(config)` (the model's schedule) plus validated options."""
    cls = _scheduler_class(name)
    accepted = set(inspect.signature(cls.__init__).parameters)
    options = dict(REGISTRY[name].fixed)
    requested = {"use_karras_sigmas": karras, "timestep_spacing": timestep_spacing, "solver_order": solver_order}
    flags = {"use_karras_sigmas": "--karras", "timestep_spacing": "--timestep_spacing", "solver_order": "--solver_order"}
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
    return cls.from_config(base, **options)


def step_kwargs(scheduler, generator=None, eta: float | None = None) -> dict:
    """Extra `step()` arguments, passed only where `scheduler.step` accepts them (as diffusers' pipelines do)."""
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "generator" in accepted and generator is not None:
        kwargs["generator"] = generator
    if eta is not None:
        if "eta" not in accepted:
            if eta != 0:
                raise UserError(f"--eta applies to ddim only, not {type(scheduler).__name__}")
        else:
            kwargs["eta"] = eta
    return kwargs
