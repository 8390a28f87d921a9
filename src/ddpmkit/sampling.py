"""The one sampling loop: noise x_T -> (unet -> guidance -> scheduler.step) per timestep -> x_0.

Every scheduler, loss guidance and classifier-free guidance go through `denoise`. The scheduler sees
all images at once; only the UNet is called in micro-batches (`tuning.choose`: the fastest size on this
device, measured once), so the images do not depend on the micro-batch. With the DDPM scheduler and
`dtype="fp32"` it reproduces `DDPMPipeline.__call__` exactly for the same seed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from tqdm.auto import tqdm

from ddpmkit.config import check_seed
from ddpmkit.devices import announce, resolve_device
from ddpmkit.errors import UserError
from ddpmkit.images import bars_enabled
from ddpmkit.model_guidance import GuidanceInterval, guide_for_sampling, guided_steps, load_guide
from ddpmkit.models import class_names, pipeline_name, resolve_class_label, resolve_pipeline
from ddpmkit.prediction import clip_x0, predicted_x0, x0_clip_range
from ddpmkit.schedulers import (AUTO, SIGMA_MAX, keeps_sample, make_scheduler, num_levels, prepare_for_moves, resolve,
                                set_timesteps, settings_label, step_kwargs)
from ddpmkit.tuning import choose, unet_for_sampling

logger = logging.getLogger(__name__)


class Guidance(Protocol):
    """Moves x at one step; returns the moved x, the model output at the moved x and the loss (or None)."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step_index: int, num_steps: int,
                 predict: Callable[[torch.Tensor], torch.Tensor], scheduler) -> tuple[torch.Tensor, torch.Tensor, Any]:
        ...


@dataclass(frozen=True)
class SamplerSettings:
    """How to sample, as `sample` takes it: a registry name and its options (None: the scheduler's own default).

    What `ddpmkit eval`, the web app and the benchmarks pass around instead of nine loose arguments;
    `sample(model, **settings.kwargs())` runs it."""

    scheduler: str = AUTO
    steps: int | None = None
    karras: bool | None = None
    timestep_spacing: str | None = None
    solver_order: int | None = None
    eta: float | None = None
    dtype: str = "auto"
    batch_size: int | None = None  # images per UNet call (None: the fastest measured); the images do not depend on it
    autoguide: str | None = None  # a weaker model of the same kind to guide with (autoguidance), and its weight
    autoguide_scale: float = 2.0
    guidance_interval: str | None = None  # 'LO,HI' noise levels (or 't:LO,HI') where CFG / autoguidance apply

    def kwargs(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SampleOutput:
    """Images in [-1, 1] on the CPU, and what happened on the way."""

    images: torch.Tensor
    nfe: int  # evaluations of the model per image (the steps' calls)
    timesteps: list[float] = field(default_factory=list)
    trajectory: list[dict] = field(default_factory=list)  # {"step", "t", "sample", "pred_original_sample"}
    guidance_losses: list[list] = field(default_factory=list)  # [[one record per guided step]]
    # what ran, after 'auto' and the scheduler's defaults: {"scheduler", "steps", "karras", "timestep_spacing", ...}
    settings: dict = field(default_factory=dict)
    # calls of the second network per image: the unconditional half of CFG (batched with the conditional one) or the
    # autoguidance guide; only inside the guidance interval
    guide_calls: int = 0


def model_fn(unet, class_labels: torch.Tensor | None = None, cfg_scale: float = 1.0, batch_size: int | None = None,
             channels_last: bool = False, guide_unet=None, guide_scale: float = 1.0) -> Callable:
    """x (already scaled by `scale_model_input`), t, guided -> model output, with CFG or autoguidance.

    CFG (Ho & Salimans 2022): out = uncond + w * (cond - uncond), both halves in one batched call.
    w = 1 is plain conditional sampling and w = 0 unconditional; both skip the second half.
    Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself"): the guide is a
    weaker model of the same kind, out = guide + w * (main - guide), with the same class labels (EDM2's
    `generate_images.py`: the guide's output lerped towards the main one's by w). `guided=False` (a step outside
    the guidance interval) is one call of the main model. The UNets run in their own dtype on `batch_size` rows at
    a time (a CFG pair counts two); the output is in x's dtype. Without gradients: `torch.inference_mode`.
    """
    null_label = (getattr(unet.config, "num_class_embeds", None) or 1) - 1
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def call(model, model_input: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        rows = batch_size or model_input.shape[0]
        dtype = getattr(model, "dtype", None) or model_input.dtype  # None: an analytic stand-in, in x's dtype
        inputs = model_input.to(dtype).contiguous(memory_format=memory_format)
        with torch.inference_mode(not torch.is_grad_enabled()):
            outputs = [model(inputs[i:i + rows], t, class_labels=None if labels is None else labels[i:i + rows]).sample
                       for i in range(0, inputs.shape[0], rows)]
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return out.to(model_input.dtype)

    def predict(model_input: torch.Tensor, t: torch.Tensor, guided: bool = True) -> torch.Tensor:
        labels = None if class_labels is None else class_labels.to(model_input.device)
        if guide_unet is not None:
            main = call(unet, model_input, t, labels)
            if not guided or guide_scale == 1.0:
                return main
            bad = call(guide_unet, model_input, t, labels)
            return bad + guide_scale * (main - bad)
        if labels is None or cfg_scale == 1.0 or (not guided and cfg_scale != 0.0):
            return call(unet, model_input, t, labels)
        null = torch.full_like(labels, null_label)
        if cfg_scale == 0.0:
            return call(unet, model_input, t, null)
        both = call(unet, torch.cat([model_input, model_input]), t, torch.cat([labels, null]))
        cond, uncond = both.chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    return predict


@torch.no_grad()
def denoise(unet, scheduler, x: torch.Tensor, generator: torch.Generator | None = None, eta: float | None = None,
            guidance: Guidance | None = None, class_labels: torch.Tensor | None = None, cfg_scale: float = 1.0,
            trajectory_every: int = 0, callback: Callable[[dict], None] | None = None,
            progress: bool = False, batch_size: int | None = None, channels_last: bool = False, guide_unet=None,
            guide_scale: float = 1.0, interval: GuidanceInterval | None = None,
            clip_range: float | None = None) -> tuple[torch.Tensor, list[dict], list]:
    """Run the reverse process from x = x_T over `scheduler.timesteps` (set_timesteps already called).

    Per step: scale_model_input -> unet (+ CFG or autoguidance inside `interval`) (-> loss guidance moves x) ->
    scheduler.step(...).prev_sample. `callback` gets {"step", "num_steps", "t", "sample", "pred_original_sample",
    "model_output", "loss"}. `batch_size`: images per UNet call (None: all); the scheduler steps the whole batch.
    `clip_range`: clip the predicted x0 of an epsilon model to it (`x0_clip_range`).
    """
    predict_raw = model_fn(unet, class_labels, cfg_scale, batch_size, channels_last, guide_unet, guide_scale)
    extra = step_kwargs(scheduler, generator, eta)
    timesteps = scheduler.timesteps
    inside = guided_steps(scheduler, interval)
    trajectory, losses = [], []
    levels, level = num_levels(scheduler), 0  # guidance moves x once per noise level (two-stage samplers: 2 calls)

    for i, t in enumerate(tqdm(timesteps, disable=not bars_enabled(progress), desc="sampling", leave=False)):
        def predict(sample: torch.Tensor) -> torch.Tensor:
            out = predict_raw(scheduler.scale_model_input(sample, t), t, inside[i])
            return out if clip_range is None else clip_x0(scheduler, out, sample, t, clip_range)

        loss = None
        if guidance is not None and keeps_sample(scheduler):
            with torch.enable_grad():
                x, model_output, loss = guidance(x, t, level, levels, predict, scheduler)
            level += 1
            if loss is not None:
                losses.append(loss)
        else:
            model_output = predict(x)
        need_x0 = callback is not None or (trajectory_every and (i % trajectory_every == 0 or i == len(timesteps) - 1))
        x0 = predicted_x0(scheduler, model_output, x, t) if need_x0 else None
        x = scheduler.step(model_output, t, x, **extra).prev_sample
        if trajectory_every and (i % trajectory_every == 0 or i == len(timesteps) - 1):
            trajectory.append({"step": i, "t": float(t), "sample": x.float().cpu(), "pred_original_sample": x0.float().cpu()})
        if callback is not None:
            callback({"step": i, "num_steps": len(timesteps), "t": t, "sample": x, "pred_original_sample": x0,
                      "model_output": model_output, "loss": loss})
    return x, trajectory, losses


def sample(model, scheduler: str = AUTO, steps: int | None = None, num_images: int = 16, batch_size: int | None = None,
           seed: int | None = None, generator: torch.Generator | None = None, eta: float | None = None,
           karras: bool | None = None, timestep_spacing: str | None = None, solver_order: int | None = None,
           sigma_max: float | None = SIGMA_MAX, guidance: Guidance | None = None, class_labels=None,
           cfg_scale: float = 1.0, autoguide=None, autoguide_scale: float = 2.0,
           guidance_interval: GuidanceInterval | str | None = None, trajectory_every: int = 0,
           callback: Callable[[dict], None] | None = None, device: str | torch.device | None = None,
           progress: bool = True, dtype: str = "auto", channels_last: bool | None = None) -> SampleOutput:
    """Generate `num_images` images from `model` with scheduler `scheduler` (a registry name) in `steps` steps.

    `scheduler="auto"` is the measured default (`schedulers.AUTO_CHOICE`, docs/samplers.md); any other name runs
    with its own measured defaults (`REGISTRY[name].defaults`, `default_steps`) for whatever of `steps`, `karras`,
    `timestep_spacing`, `solver_order` is None ('ddpmkit schedulers' lists them). "ddpm" with `seed` reproduces
    DDPMPipeline. `class_labels`: one or one per image, indices or the names saved with the model. `seed`:
    `torch.Generator("cpu").manual_seed(seed)` used as DDPMPipeline uses its generator. `sigma_max` caps the
    starting noise level of the sigma-array samplers (all but ddpm, ddim, pndm; None: the full schedule).
    Guidance: `cfg_scale` (classifier-free, class-conditioned models), or `autoguide` (a weaker model of the same
    kind: a pipeline, folder, run checkpoint `step_N` or bundled name) at `autoguide_scale`; either only inside
    `guidance_interval` ('LO,HI' noise levels, 't:LO,HI' timesteps); `guidance`: a loss on x0 (guidance.py).
    `device`: None keeps a model that is on a GPU there and puts one on the CPU on `devices.default_device()`.
    Speed (docs/performance.md): `dtype` auto|fp32|bf16|fp16 is the UNet's (auto: bf16 only where native
    and measured faster); `batch_size` images per UNet call and `channels_last` default to the fastest
    measured on this device (`tuning.choose`). `dtype="fp32"` is DDPMPipeline's arithmetic bit for bit.
    """
    pipe = resolve_pipeline(model)
    unet = pipe.unet
    unet.to(_sampling_device(unet, device))
    device = unet.device
    if num_images < 1:
        raise UserError(f"--num_images must be at least 1 (got {num_images})")
    interval = GuidanceInterval.parse(guidance_interval)
    guide_unet = load_guide(pipe, autoguide, autoguide_scale, cfg_scale, interval, device)
    sched, settings, generator = _scheduler_for(pipe, scheduler, steps, karras, timestep_spacing, solver_order,
                                                sigma_max, seed, generator, eta)
    labels = _class_label_tensor(pipe, class_labels, num_images)
    rows = 2 if (labels is not None and cfg_scale not in (0.0, 1.0)) or guide_unet is not None else 1
    with _eval_mode(unet):
        # a micro-batch counts UNet rows: a CFG image is two (conditional and unconditional)
        speed = choose(unet, num_images * rows, dtype, batch_size and batch_size * rows, channels_last)
        announce(device, "sampling")
        logger.info("UNet calls: %s", speed.describe())
        set_timesteps(sched, settings["steps"], device=device)
        if guidance is not None and (changed := prepare_for_moves(sched)):
            logger.info(changed)
        timesteps = [float(t) for t in sched.timesteps]
        extra_calls = sum(guided_steps(sched, interval)) if rows == 2 else 0
        x = initial_noise(unet, sched, num_images, generator)
        with unet_for_sampling(unet, speed.dtype, speed.channels_last, speed.graphs) as model_unet, \
                guide_for_sampling(guide_unet, speed) as guide_model:
            x, trajectory, losses = denoise(model_unet, sched, x, generator=generator, eta=eta, guidance=guidance,
                                            class_labels=labels, cfg_scale=cfg_scale,
                                            trajectory_every=trajectory_every, callback=callback, progress=progress,
                                            batch_size=speed.batch_size, channels_last=speed.channels_last,
                                            guide_unet=guide_model, guide_scale=autoguide_scale, interval=interval,
                                            clip_range=x0_clip_range(pipe.scheduler, sched))
    result = x.float().cpu().clamp(-1, 1)
    if not torch.isfinite(result).all():
        logger.warning("some samples are not finite: the model or the scheduler settings diverged")
    _record_guidance(settings, interval, autoguide if guide_unet is not None else None, autoguide_scale)
    return SampleOutput(result, len(timesteps), timesteps, trajectory, [losses], settings, extra_calls)


def _record_guidance(settings: dict, interval, autoguide, autoguide_scale: float) -> None:
    """What guided the run, in its settings: the interval, and the guide (its folder or name) and scale."""
    if interval is not None:
        settings["guidance_interval"] = interval.describe()
    if autoguide is not None:
        settings.update(autoguide=str(pipeline_name(autoguide) or autoguide),
                        autoguide_scale=autoguide_scale)


def initial_noise(unet, scheduler, num_images: int, generator: torch.Generator | None) -> torch.Tensor:
    """x_T as DDPMPipeline draws it (in the UNet's dtype, on its device), scaled by the scheduler's
    init_noise_sigma; the scheduler then runs in at least float32."""
    from diffusers.utils.torch_utils import randn_tensor

    size = unet.config.sample_size
    shape_hw = (size, size) if isinstance(size, int) else tuple(size)
    x = randn_tensor((num_images, unet.config.in_channels, *shape_hw), generator=generator, device=unet.device,
                     dtype=unet.dtype) * scheduler.init_noise_sigma
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _sampling_device(unet, device) -> torch.device:
    """`device` when given (checked by the one device rule); else a GPU the model is already on, else the default."""
    if device is not None or unet.device.type == "cpu":
        return resolve_device(device)
    return unet.device


def _scheduler_for(pipe, scheduler: str, steps, karras, timestep_spacing, solver_order, sigma_max, seed,
                   generator, eta) -> tuple[object, dict, torch.Generator | None]:
    """The scheduler a run uses, built from the model's config, its settings {"scheduler", "steps", ...} (logged),
    and the generator of its noise (`generator`, else one seeded with `seed`, else None)."""
    if steps is not None and steps < 1:
        raise UserError(f"--steps must be at least 1 (got {steps})")
    check_seed(seed)  # dpm++sde seeds its Brownian tree through numpy
    asked = scheduler
    scheduler, steps, options = resolve(scheduler, steps, karras=karras, timestep_spacing=timestep_spacing,
                                        solver_order=solver_order)
    sched = make_scheduler(scheduler, pipe.scheduler.config, **options, seed=seed, steps=steps, sigma_max=sigma_max)
    limit = sched.config.num_train_timesteps
    if steps > limit:
        why = ("the model's training steps" if limit == pipe.scheduler.config.num_train_timesteps
               else f"the model's training steps at noise levels up to sigma_max {sigma_max:g}")
        raise UserError(f"--steps {steps} is more than the {limit} timesteps {scheduler} can use ({why})")
    if generator is None:
        generator = torch.Generator("cpu").manual_seed(seed) if seed is not None else None
    step_kwargs(sched, generator, eta)  # a step option the scheduler does not take fails before anything runs
    settings = {"scheduler": scheduler, "steps": steps, **options}
    logger.info("scheduler %s%s, %d steps", "auto: " if asked == AUTO else "", settings_label(scheduler, settings),
                steps)
    return sched, settings, generator


@contextlib.contextmanager
def _eval_mode(unet):
    """The UNet in eval mode for the duration (dropout off), then back as it was (a model being trained)."""
    was_training = unet.training
    unet.eval()
    try:
        yield unet
    finally:
        unet.train(was_training)


def _class_label_tensor(pipe, class_labels, num_images: int) -> torch.Tensor | None:
    """Class indices, or class names as saved with the model (ddpmkit.json), as the CLI's --class_label takes them."""
    unet = pipe.unet
    if class_labels is None:
        if unet.config.num_class_embeds:
            logger.info("class-conditioned model without --class_label: sampling unconditionally (null class)")
            return torch.full((num_images,), unet.config.num_class_embeds - 1, dtype=torch.long)
        return None
    if not unet.config.num_class_embeds:
        raise UserError("--class_label given, but this model is not class-conditioned")
    items = [class_labels] if isinstance(class_labels, str) else class_labels
    if isinstance(items, (list, tuple)) and any(isinstance(c, str) for c in items):
        names = class_names(source) if (source := pipeline_name(pipe)) else None  # none for a pipeline built in memory
        class_labels = [resolve_class_label(c, names, unet.config.num_class_embeds - 1) for c in items]
    labels = torch.as_tensor(class_labels, dtype=torch.long).flatten()
    if labels.numel() == 1:
        labels = labels.repeat(num_images)
    if labels.numel() != num_images:
        raise UserError(f"got {labels.numel()} class labels for {num_images} images")
    num_classes = unet.config.num_class_embeds - 1
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(f"class labels must be in 0..{num_classes - 1}")
    return labels

