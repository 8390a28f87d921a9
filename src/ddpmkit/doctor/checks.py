"""The doctor's checks, one function each: a `Subject` in, a `Finding` out ("ok", "problem" with what to do, or
"skip" with why). Each threshold is a named constant with the measurement behind it (docs/doctor.md)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ddpmkit.doctor.subject import Subject

# (a) data: ddpmkit's batches are uint8 / 127.5 - 1, so a real batch reaches below 0 unless no pixel is darker than
# 122/255; a model trained on [0, 1] data (the course's Normalize([0.5], [0.5]) forgotten) samples in [0, 1]
RANGE_SLACK = 1e-4  # float rounding of the scaling
ZERO_ONE_LOW = -0.05  # a batch whose 0.5th percentile is above this never uses the lower half
# samples of a model trained on [0, 1] data are the data mapped by (x + 1) / 2: their quantiles fit the data's mapped
# ones (measured on micro 8x8: 0.05 against 0.49 for the data's own; a healthy model the other way round)
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
ZERO_ONE_FIT = 0.5  # the mapped quantiles fit at least this much better: trained on [0, 1]
NO_DATA_LOW = -0.2  # without data: samples whose 5th percentile is above this have nothing dark
# (b) one fixed batch: 16 images, fixed noise and timesteps, AdamW at the run's lr, the trainer's loss
OVERFIT_IMAGES = 16
OVERFIT_STEPS = 40
# the loss must fall at least this many times; measured on one batch of 16 (docs/doctor.md): healthy lrs (4e-4, 1e-3)
# x1.8-x3.2 on micro, x4.7-x16.8 on tiny at 32x32; too small ones (1e-5, 1e-6) x1.0-x1.2 on both
OVERFIT_FACTOR = 1.5
# (c) the prediction type the UNet's outputs fit best, at timesteps across the schedule
PROBE_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)  # of num_train_timesteps
PROBE_MARGIN = 0.5  # another target fits this much better than the scheduler's: the scheduler is wrong
# (d) EMA against raw weights: KID on a small count, with a fast sampler
EMA_IMAGES = 64
FAST_SAMPLER = ("ddim", 25)
EMA_WORSE = 1.5  # the EMA's KID above this many times the raw weights' (and beyond both spreads): not caught up
# (e) ddpm at full steps against the default sampler: pixel statistics of a few images
SAMPLER_IMAGES = 8
MODEL_GAP = 0.35  # ddpm's samples this far from the data's statistics: the model (measured: data halves 0.02-0.06)
SAMPLER_GAP = 0.25  # the default sampler this far from the data while ddpm is not: the sampler


@dataclass
class Finding:
    """One check's verdict: status "ok", "problem" or "skip", what was found, what to do, and what it cost."""

    check: str
    status: str
    text: str
    advice: str = ""
    seconds: float = 0.0

    def line(self) -> str:
        todo = f" -> {self.advice}" if self.advice else ""
        return f"{self.status}: {self.check}: {self.text}{todo} ({self.seconds:.1f} s)"


def ok(check: str, text: str) -> Finding:
    return Finding(check, "ok", text)


def problem(check: str, text: str, advice: str) -> Finding:
    return Finding(check, "problem", text, advice)


def skip(check: str, text: str) -> Finding:
    return Finding(check, "skip", text)


def _quantile(x: torch.Tensor, q: float) -> float:
    flat = x.detach().float().flatten()
    k = max(1, min(flat.numel(), int(round(q * flat.numel()))))
    return float(flat.kthvalue(k).values)


# ---------------------------------------------------------------------- (a) data
def check_data(subject: Subject, report_dir: Path) -> Finding:
    """The data as the model sees them (range, channels, size; a grid of a real batch), and the samples' range."""
    from ddpmkit.images import save_grid

    batch, notes = subject.batch(), []
    if batch is None and subject.data_error:
        return problem("data", f"cannot read the training data ({subject.data_error})", "fix the dataset flags")
    if batch is not None:
        lo, hi = float(batch.min()), float(batch.max())
        if lo < -1 - RANGE_SLACK or hi > 1 + RANGE_SLACK:
            return problem("data", f"a training batch spans [{lo:.2f}, {hi:.2f}], outside [-1, 1]",
                           "scale the images to [-1, 1] (uint8 / 127.5 - 1)")
        if _quantile(batch, 0.005) >= ZERO_ONE_LOW:
            return problem("data", f"a training batch spans [{lo:.2f}, {hi:.2f}]: nothing below 0, as data in [0, 1] "
                           "would be", "scale the images to [-1, 1] (the course's Normalize([0.5], [0.5])), or "
                           "check that the images are not all bright")
        grid = save_grid(batch[:64], report_dir / "batch.png", scale=2)
        notes.append(f"a batch of {batch.shape[0]} spans [{lo:.2f}, {hi:.2f}] (mean {float(batch.mean()):.2f}); "
                     f"grid of it in {grid}")
        found = _shape_problem(subject, batch)
        if found is not None:
            return found
    if subject.pipeline is not None:
        found = _samples_range(subject, batch, notes)
        if found is not None:
            return found
    if not notes:
        return skip("data", "no training data known and no pipeline: give --dataset")
    return ok("data", "; ".join(notes))


def _shape_problem(subject: Subject, batch: torch.Tensor) -> Finding | None:
    """Channels and size of a batch against the UNet that takes it (the saved one, or the one a run would build)."""
    unet = subject.pipeline.unet.config if subject.pipeline is not None else subject.fresh_unet().config
    size = unet.sample_size if isinstance(unet.sample_size, int) else unet.sample_size[0]
    _, channels, height, width = batch.shape
    if channels != unet.in_channels:
        return problem("data", f"the batches have {channels} channels and the UNet takes {unet.in_channels}",
                       f"train with --channels {unet.in_channels} (or a UNet with in_channels={channels})")
    if (height, width) != (size, size):
        return problem("data", f"the batches are {height}x{width} and the UNet samples at {size}x{size}",
                       f"train and sample at one size: --image_size {size}, or set the UNet's sample_size")
    return None


def _samples_range(subject: Subject, batch: torch.Tensor | None, notes: list[str]) -> Finding | None:
    """A model trained on [0, 1] data samples (x + 1) / 2 of the data: its samples' quantiles against the data's,
    as they are and mapped to [0, 1]; without data, whether the samples have anything dark at all."""
    steps = subject.pipeline.scheduler.config.num_train_timesteps
    samples = subject.samples("ddpm", steps, SAMPLER_IMAGES)
    q = torch.quantile(samples.float().flatten(), torch.tensor(QUANTILES))
    notes.append(f"{samples.shape[0]} samples (ddpm, {steps} steps): 5-95th percentiles {q[0]:.2f} to {q[-1]:.2f}")
    advice = ("train again with the images scaled to [-1, 1] (the course's transforms.Normalize([0.5], [0.5]); "
              "ddpmkit's batches do it)")
    if batch is None:
        if q[0] >= NO_DATA_LOW:
            return problem("data", f"the samples' 5th percentile is {q[0]:.2f}: nothing dark, as from a model trained "
                           "on images in [0, 1]", advice + "; give --dataset to compare with the data")
        return None
    qd = torch.quantile(batch.float().flatten(), torch.tensor(QUANTILES))
    as_is, mapped = float((q - qd).abs().mean()), float((q - (qd + 1) / 2).abs().mean())
    if mapped < ZERO_ONE_FIT * as_is:
        return problem("data", f"the samples' percentiles (5-95th: {q[0]:.2f} to {q[-1]:.2f}) fit the data's mapped "
                       f"to [0, 1] (off by {mapped:.2f}) and not the data's (off by {as_is:.2f}): the model was "
                       "trained on images in [0, 1], not [-1, 1]", advice)
    return None


# ---------------------------------------------------------------------- (b) overfit one batch
def check_overfit(subject: Subject, report_dir: Path) -> Finding:
    """A few dozen AdamW steps on one fixed batch (fixed noise and timesteps, the trainer's loss target, the run's
    lr and weight decay, no warm-up) must lower the loss OVERFIT_FACTOR times."""
    from ddpmkit.trainer import loss_target

    batch = subject.batch()
    if batch is None:
        return skip("overfit", "needs training data (--dataset, or a run's config)")
    c = subject.config
    lr = c.learning_rate()
    x0 = batch[:OVERFIT_IMAGES].to(subject.device)
    scheduler = subject.noise_scheduler()
    unet = subject.fresh_unet().to(subject.device).train()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=g).to(x0)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=g).to(x0.device)
    noisy, target = scheduler.add_noise(x0, noise, timesteps), loss_target(scheduler, x0, noise, timesteps)
    labels = _null_labels(unet, x0.shape[0], x0.device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=c.adam_weight_decay)
    losses = []
    for _ in range(OVERFIT_STEPS):
        loss = F.mse_loss(unet(noisy, timesteps, class_labels=labels, return_dict=False)[0].float(), target.float())
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if c.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), c.max_grad_norm)
        optimizer.step()
    return _overfit_verdict(losses, lr, x0.shape[0], bool(c.init_from))


def _overfit_verdict(losses: list[float], lr: float, images: int, finetune: bool = False) -> Finding:
    first, last = losses[0], min(losses[-3:])
    what = f"{len(losses)} AdamW steps at lr {lr:.1e} on one fixed batch of {images}"
    if not math.isfinite(losses[-1]) or last > first:
        end = losses[-1] if not math.isfinite(losses[-1]) else last
        return problem("overfit", f"the loss went from {first:.4f} to {end:.4g} in {what}: the learning rate "
                       "diverges", f"lower --lr (try {lr / 10:.0e}) or add --lr_warmup_steps")
    factor = first / max(last, 1e-12)
    if finetune:  # trained weights at a fine-tune's small lr fall slowly: only a rise says something
        return ok("overfit", f"the loss fell from {first:.4f} to {last:.4f} (x{factor:.1f}) in {what}, from the "
                  "pretrained weights (a fine-tune: only a rising loss is a problem)")
    if factor < OVERFIT_FACTOR:
        advice = ("raise --lr (the course trains at 4e-4)" if lr < 1e-4 else
                  "check the UNet config (--preset, --unet_config) and that the batch is the images (the grid)")
        return problem("overfit", f"the loss fell only from {first:.4f} to {last:.4f} (x{factor:.1f}, a healthy "
                       f"model falls x{OVERFIT_FACTOR:g} or more) in {what}: the model cannot learn", advice)
    return ok("overfit", f"the loss fell from {first:.4f} to {last:.4f} (x{factor:.1f}, at least "
              f"x{OVERFIT_FACTOR:g} wanted) in {what}")


def _null_labels(unet, n: int, device) -> torch.Tensor | None:
    """A class-conditioned UNet needs labels: the null (unconditional) class for all."""
    classes = unet.config.num_class_embeds
    return torch.full((n,), classes - 1, dtype=torch.long, device=device) if classes else None


# ---------------------------------------------------------------------- (c) the saved scheduler and the UNet
def check_config(subject: Subject, report_dir: Path) -> Finding:
    """The saved scheduler's prediction type, schedule and T, and the UNet's size and channels, against the training
    config; and which target the UNet's outputs actually fit (eps, x0 or v) on a noised real batch."""
    c = subject.config
    if subject.pipeline is None:
        if c is None:
            return skip("config", "nothing to compare")
        unet = subject.fresh_unet()
        sched = subject.noise_scheduler().config
        return ok("config", f"a new {unet.config.sample_size}x{unet.config.sample_size} UNet with "
                  f"{unet.config.in_channels} channels, {sched.beta_schedule} schedule, T={sched.num_train_timesteps},"
                  f" predicting {sched.prediction_type}")
    sched, unet = subject.pipeline.scheduler.config, subject.pipeline.unet.config
    saved, where = subject.saved_config, "the training config"
    expected = {"prediction_type": saved.get("prediction_type") or ("epsilon" if not saved.get("init_from") else None),
                "beta_schedule": None if saved.get("init_from") else saved.get("beta_schedule"),
                "num_train_timesteps": None if saved.get("init_from") else saved.get("num_train_timesteps")}
    fitted = _fitted_prediction(subject)
    for name, value in expected.items():
        if saved and value is not None and sched.get(name) != value:
            fit = f", and the UNet's outputs fit {fitted[0]} best ({fitted[1]})" if fitted else ""
            return problem("config", f"the saved scheduler has {name} {sched.get(name)!r} but the model trained with "
                           f"{value!r} ({where}){fit}", f'set "{name}": "{value}" in scheduler/scheduler_config.json')
    if fitted and fitted[0] != sched.prediction_type and fitted[2]:
        return problem("config", f"the scheduler says {sched.prediction_type} but the UNet's outputs fit {fitted[0]} "
                       f"({fitted[1]})", f'set "prediction_type": "{fitted[0]}" in scheduler/scheduler_config.json')
    size = unet.sample_size if isinstance(unet.sample_size, int) else unet.sample_size[0]
    if saved.get("image_size") and size != saved["image_size"] or saved.get("channels") and \
            unet.in_channels != saved["channels"]:
        return problem("config", f"the UNet is {size}x{size} with {unet.in_channels} channels but the model trained "
                       f"at {saved.get('image_size')} with {saved.get('channels')}",
                       "set sample_size and in_channels in unet/config.json to the training's")
    fit = f"; its outputs fit {fitted[0]} best ({fitted[1]})" if fitted else ""
    return ok("config", f"{sched.prediction_type}, {sched.beta_schedule} schedule, T={sched.num_train_timesteps}, "
              f"{size}x{size} with {unet.in_channels} channels{' as ' + where + ' says' if saved else ''}{fit}")


def _fitted_prediction(subject: Subject) -> tuple[str, str, bool] | None:
    """(the target the UNet's outputs fit best, the MSEs, whether it beats the scheduler's by PROBE_MARGIN) on a
    noised real batch at PROBE_FRACTIONS of the schedule; None without data."""
    from ddpmkit.trainer import loss_target

    batch = subject.batch(flips=False)  # a run without flips (or a config that does not say) never saw a flipped one
    if batch is None or subject.pipeline is None:
        return None
    pipe = subject.pipeline
    x0 = batch[:OVERFIT_IMAGES].to(pipe.unet.device, pipe.unet.dtype)
    g = torch.Generator().manual_seed(1)
    errors = {"epsilon": 0.0, "sample": 0.0, "v_prediction": 0.0}
    for fraction in PROBE_FRACTIONS:
        t = torch.full((x0.shape[0],), int(fraction * pipe.scheduler.config.num_train_timesteps), device=x0.device)
        noise = torch.randn(x0.shape, generator=g).to(x0)
        with torch.no_grad():
            out = pipe.unet(pipe.scheduler.add_noise(x0, noise, t), t, class_labels=_null_labels(pipe.unet, len(t),
                            x0.device), return_dict=False)[0].float()
        for name in errors:
            target = loss_target(_with_prediction(pipe.scheduler, name), x0, noise, t)
            errors[name] += float(F.mse_loss(out, target.float())) / len(PROBE_FRACTIONS)
    best = min(errors, key=errors.get)
    own = errors.get(pipe.scheduler.config.prediction_type, math.inf)
    text = ", ".join(f"MSE {errors[n]:.3f} as {n}" for n in sorted(errors, key=errors.get))
    return best, text, errors[best] < PROBE_MARGIN * own


def _with_prediction(scheduler, prediction_type: str):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config({**scheduler.config, "prediction_type": prediction_type})
