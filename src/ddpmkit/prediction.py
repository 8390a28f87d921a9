"""What a model's output means: the predicted x0 of epsilon, v and x0 models under any scheduler, the noise level
sigma of a timestep, and the clipping of an epsilon model's x0 that DDPM's config asks for. Pure tensor arithmetic on
the scheduler's own schedule; used by the sampling loop, loss guidance and guidance intervals."""
from __future__ import annotations

import inspect
import math

import torch

from ddpmkit.errors import UserError


def alpha_bar_and_vp_sample(scheduler, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_bar of the current step and x in the variance-preserving scale x_t = sqrt(ab) x0 + sqrt(1-ab) eps.

    Sigma-based schedulers (Euler, Heun, LMS, DPM-SDE: init_noise_sigma > 1) keep x = x0 + sigma * eps,
    so ab = 1 / (1 + sigma^2) and x_vp = x / sqrt(1 + sigma^2) (the scaling of `scale_model_input`).
    The multistep solvers (DPM-Solver++, UniPC, DEIS) keep x in the VP scale but also carry the exact
    sigma of each step, which is what their (possibly fractional, Karras) timestep means.
    """
    if getattr(scheduler, "sigmas", None) is not None and hasattr(scheduler, "index_for_timestep"):
        index = scheduler.step_index if scheduler.step_index is not None else scheduler.index_for_timestep(t)
        sigma = scheduler.sigmas[index].to(x.device, torch.float32)
        alpha_bar = 1.0 / (1.0 + sigma**2)
        return alpha_bar, x * alpha_bar.sqrt() if float(scheduler.init_noise_sigma) > 1.0 else x
    alphas_cumprod = scheduler.alphas_cumprod.to(x.device, torch.float32)
    index = int(t.item()) if torch.is_tensor(t) else int(t)
    return alphas_cumprod[index], x


def predicted_x0(scheduler, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 predicted from the model output (DDPM eq. 15 for epsilon; v-prediction per Salimans & Ho 2022).

    Differentiable in `x` and `model_output`; the one place where ddpmkit forms pred_original_sample.
    """
    alpha_bar, x_vp = alpha_bar_and_vp_sample(scheduler, x, t)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return (x_vp - (1 - alpha_bar).sqrt() * model_output) / alpha_bar.sqrt()
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * x_vp - (1 - alpha_bar).sqrt() * model_output
    raise UserError(f"unsupported prediction_type {prediction_type!r} in the model's scheduler config")


def x0_clip_range(model_scheduler, scheduler) -> float | None:
    """The range to clip the predicted x0 to at each step, or None: the model's own `clip_sample_range` when it
    predicts epsilon, its config asks for clipping (DDPMScheduler's default) and `scheduler` does not clip itself.

    An epsilon model's x0 is (x - sqrt(1 - ab) eps) / sqrt(ab): at the high noise levels where the sigma samplers
    (DPM++, DEIS, UniPC, Euler, ...) start (sigma up to 80, 1 / sqrt(ab) = 80) a 1% error in eps is an error of 0.8
    in x0, and without DDPM's clipping those samplers turned a course-style model (epsilon, squaredcos_cap_v2) into
    saturated noise: 98% of the pixels at -1 or 1 where ddpm-1000 gave 3% (tests/test_sampling.py). v- and
    x0-prediction keep x0 bounded, and DDPM and DDIM clip as their config says, so they are left as they are."""
    config = model_scheduler.config
    if config.get("prediction_type") != "epsilon" or not config.get("clip_sample", False):
        return None
    if "clip_sample" in inspect.signature(type(scheduler).__init__).parameters:  # DDPM, DDIM clip as configured
        return None
    return float(config.get("clip_sample_range", 1.0))


def clip_x0(scheduler, model_output: torch.Tensor, x: torch.Tensor, t, limit: float) -> torch.Tensor:
    """An epsilon model's output whose predicted x0 (DDPM eq. 15) is clipped to [-limit, limit], as epsilon again."""
    alpha_bar, x_vp = alpha_bar_and_vp_sample(scheduler, x, t)  # once: predicted_x0 would look it up again
    x0 = ((x_vp - (1 - alpha_bar).sqrt() * model_output) / alpha_bar.sqrt()).clamp(-limit, limit)
    eps = (x_vp - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
    return eps.to(model_output.dtype)


def noise_level(scheduler, t) -> float:
    """EDM's sigma of timestep t: sqrt((1 - alpha_bar_t) / alpha_bar_t), from the scheduler's own schedule."""
    alpha_bar, _ = alpha_bar_and_vp_sample(scheduler, torch.ones(()), t)
    return math.sqrt(max(1.0 - float(alpha_bar), 0.0) / max(float(alpha_bar), 1e-30))
