"""The doctor's checks that sample the model: the EMA weights against the raw weights (KID on a small count, and
the EMA's decay at its step), and ddpm at full steps against the default sampler (pixel statistics of a few images
against the data's): a sampler problem or a model problem."""
from __future__ import annotations

from pathlib import Path

import torch

from ddpmkit.doctor.checks import (EMA_IMAGES, EMA_WORSE, FAST_SAMPLER, MODEL_GAP, SAMPLER_GAP, SAMPLER_IMAGES,
                                   Finding, ok, problem, skip)
from ddpmkit.doctor.subject import Subject
from ddpmkit.errors import UserError


# ---------------------------------------------------------------------- (d) EMA against the raw weights
def ema_decay(subject: Subject, step: int) -> float:
    """The decay diffusers' EMAModel applied at `step`, with the run's warm-up (`train_parts.make_ema`)."""
    from ddpmkit.train_parts import make_ema

    return float(make_ema(subject.config, subject.pipeline.unet).get_decay(step))


def check_ema(subject: Subject, report_dir: Path, features=None) -> Finding:
    """KID of EMA_IMAGES samples of the pipeline (the EMA weights) and of the newest checkpoint's raw weights, each
    against as many training images, with a fast sampler; and the EMA's decay at its step."""
    from ddpmkit.evaluation import FeatureCache, ImageSet, InceptionFeatures, cached_features, kid_from_features
    from ddpmkit.images import to_uint8_nchw

    c = subject.config
    if c is None or not c.use_ema:
        return skip("ema", "trained without --use_ema")
    if subject.pipeline is None:
        return skip("ema", "no pipeline saved yet")
    if subject.raw_pipeline() is None:
        return skip("ema", "no checkpoint holds the raw weights (--checkpointing_steps N keeps them)")
    data = subject.data()
    if data is None:
        return skip("ema", "needs the training data")
    try:
        extractor = features or InceptionFeatures(device=subject.device)
    except UserError as err:
        return skip("ema", str(err))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:EMA_IMAGES]
    reference = ImageSet(data.images[order].contiguous(), describe={"dataset": c.dataset, "image_size": c.image_size,
                                                                    "doctor": True})
    real, _ = cached_features(reference, extractor, FeatureCache(), progress=False)
    subset = max(2, min(len(reference), EMA_IMAGES) // 2)
    kids = {}
    for name, raw in (("ema", False), ("raw", True)):
        images = to_uint8_nchw(subject.samples(*FAST_SAMPLER, EMA_IMAGES, raw=raw))
        kids[name] = kid_from_features(real, extractor(images, progress=False), 100, subset)
    step = subject.step or subject.checkpoint_step or 0
    return _ema_verdict(kids, ema_decay(subject, step), step, subject.checkpoint_step, c.ema_max_decay)


def _ema_verdict(kids: dict, decay: float, step: int, raw_step: int | None, max_decay: float) -> Finding:
    (ema, ema_std), (raw, raw_std) = kids["ema"], kids["raw"]
    window = 1 / max(1 - decay, 1e-12)
    said = (f"the EMA weights (step {step}, decay {decay:.4f}: an average over the last ~{window:.0f} steps) score "
            f"KID {ema:.4f} ± {ema_std:.4f}, the raw weights (checkpoint of step {raw_step}) {raw:.4f} ± {raw_std:.4f}"
            f" ({EMA_IMAGES} images each, {FAST_SAMPLER[0]} {FAST_SAMPLER[1]} steps)")
    if ema - raw > 2 * (ema_std ** 2 + raw_std ** 2) ** 0.5 and ema > EMA_WORSE * max(raw, 0.0):
        return problem("ema", said + ": the EMA has not caught up with training",
                       f"train longer, or lower --ema_max_decay (now {max_decay:g}); a pipeline of the raw weights "
                       "samples better until then (train without --use_ema)")
    return ok("ema", said)


# ---------------------------------------------------------------------- (e) ddpm at full steps against the default
def pixel_statistics(images: torch.Tensor) -> dict[str, float]:
    """Mean, standard deviation and roughness (mean |difference| of neighbouring pixels) of images in [-1, 1]:
    noise is rough (about 0.9 for uniform noise), images are smooth (0.1-0.3 for emoji at 32x32)."""
    x = images.float()
    rough = ((x[..., 1:] - x[..., :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()) / 2
    return {"mean": float(x.mean()), "std": float(x.std()), "roughness": float(rough)}


def statistics_gap(a: dict, b: dict) -> float:
    """|difference| of the means + of the standard deviations + of the roughness (in [-1, 1] units)."""
    return sum(abs(a[k] - b[k]) for k in ("mean", "std", "roughness"))


def check_sampler(subject: Subject, report_dir: Path, scheduler: str = "auto") -> Finding:
    """SAMPLER_IMAGES images with ddpm at the model's full T steps and with `scheduler`, their pixel statistics
    against a training batch's: ddpm far from the data is the model; only the other far from it is the sampler."""
    from ddpmkit.images import labelled_rows

    if subject.pipeline is None:
        return skip("sampler", "no pipeline saved yet")
    steps = subject.pipeline.scheduler.config.num_train_timesteps
    reference = subject.samples("ddpm", steps, SAMPLER_IMAGES)
    try:
        other = subject.samples(scheduler, None, SAMPLER_IMAGES)
    except (NotImplementedError, ValueError, RuntimeError) as err:  # diffusers refuses what a scheduler cannot do
        return problem("sampler", f"{scheduler} cannot sample this model ({str(err).splitlines()[0][:120]}) while "
                       f"ddpm at {steps} steps can", "sample with --scheduler ddpm or ddim ('ddpmkit schedulers')")
    grid = labelled_rows([reference, other], [f"ddpm {steps}", scheduler], report_dir / "samplers.png", scale=2)
    batch = subject.batch()
    stats = {"ddpm": pixel_statistics(reference), scheduler: pixel_statistics(other)}
    shown = "; ".join(f"{k} mean {v['mean']:.2f} std {v['std']:.2f} roughness {v['roughness']:.2f}"
                      for k, v in stats.items())
    if batch is None:
        gap = statistics_gap(stats["ddpm"], stats[scheduler])
        if gap > SAMPLER_GAP:
            return problem("sampler", f"ddpm at {steps} steps and {scheduler} disagree (gap {gap:.2f}: {shown}; "
                           f"{grid})", "give --dataset to tell a sampler problem from a model problem")
        return ok("sampler", f"ddpm at {steps} steps and {scheduler} agree (gap {gap:.2f}: {shown}; {grid})")
    data = pixel_statistics(batch)
    shown += f"; data mean {data['mean']:.2f} std {data['std']:.2f} roughness {data['roughness']:.2f}"
    gaps = {name: statistics_gap(s, data) for name, s in stats.items()}
    said = f"gap to the data: ddpm at {steps} steps {gaps['ddpm']:.2f}, {scheduler} {gaps[scheduler]:.2f} ({shown}; {grid})"
    if gaps["ddpm"] > MODEL_GAP:
        return problem("sampler", said + ": even ddpm at full steps samples unlike the data, so the model is at fault, "
                       "not the sampler", "see the data, overfit and config checks; train longer")
    if gaps[scheduler] > SAMPLER_GAP and gaps[scheduler] > 2 * gaps["ddpm"]:
        return problem("sampler", said + f": ddpm samples like the data and {scheduler} does not, so the sampler is at "
                       "fault", f"sample with --scheduler ddpm, or {scheduler} with more --steps")
    return ok("sampler", said)
