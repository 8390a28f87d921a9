"""What guides the model's output inside the sampling loop, and where: classifier-free guidance's and
autoguidance's interval of noise levels (Kynkaanniemi et al. 2024), the autoguidance guide checked against the model
it guides (Karras et al. 2024), and a model's stored default guidance. `sampling.model_fn` combines the calls."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from ddpmkit.errors import UserError
from ddpmkit.models import default_guidance, resolve_pipeline
from ddpmkit.prediction import noise_level
from ddpmkit.tuning import unet_for_sampling


@dataclass(frozen=True)
class GuidanceInterval:
    """Where CFG or autoguidance applies: noise levels lo < sigma <= hi (EDM's sigma = sqrt((1 - ab) / ab)), or
    timesteps lo <= t <= hi (`unit="t"`). Outside it each step is one call of the model, unguided (Kynkaenniemi et
    al. 2024, "Applying Guidance in a Limited Interval Improves Sample and Distribution Quality")."""

    lo: float = 0.0
    hi: float = math.inf
    unit: str = "sigma"

    @classmethod
    def parse(cls, text: "str | GuidanceInterval | None") -> "GuidanceInterval | None":
        """'0.28,5.42' (noise levels sigma), 'sigma:0.28,5.42' or 't:200,700' (timesteps); None or '' -> None; an
        interval passes through."""
        if isinstance(text, GuidanceInterval):
            return text
        if text is None or not str(text).strip():
            return None
        unit, sep, numbers = str(text).strip().partition(":")
        if not sep:
            unit, numbers = "sigma", unit
        try:
            lo, hi = (float(v) for v in numbers.split(","))
        except ValueError:
            lo = hi = math.nan
        if unit not in ("sigma", "t") or not 0 <= lo < hi:
            raise UserError(f"--guidance_interval {text!r} must be LO,HI with 0 <= LO < HI: noise levels sigma "
                            "(e.g. 0.28,5.42) or timesteps prefixed with t: (e.g. t:200,700)")
        return cls(lo, hi, unit)

    def contains(self, sigma: float, t: float) -> bool:
        if self.unit == "t":
            return self.lo <= t <= self.hi
        return self.lo < sigma <= self.hi

    def describe(self) -> str:
        return f"{self.unit} {self.lo:g}..{self.hi:g}"


def guided_steps(scheduler, interval: GuidanceInterval | None) -> list[bool]:
    """For each entry of `scheduler.timesteps`: whether CFG / autoguidance applies there (all, without an interval)."""
    if interval is None:
        return [True] * len(scheduler.timesteps)
    flags = []
    for i, t in enumerate(scheduler.timesteps):
        step_index = getattr(scheduler, "_step_index", None)
        if hasattr(scheduler, "_step_index"):  # sigma-array schedulers look their sigma up by step index
            scheduler._step_index = i
        try:
            flags.append(interval.contains(noise_level(scheduler, t), float(t)))
        finally:
            if hasattr(scheduler, "_step_index"):
                scheduler._step_index = step_index
    return flags


NO_GUIDE = "none"  # --autoguide none: sample without the model's default guidance


def model_guidance(model, cfg_scale: float | None = None, autoguide=None, autoguide_scale: float | None = None,
                   guidance_interval: str | None = None) -> tuple[dict, str | None]:
    """The autoguidance to sample `model` with, as `sample`'s keyword arguments (autoguide, autoguide_scale,
    guidance_interval), and a line saying so when it is the model's stored default, else None.

    What was asked for wins (None: not asked for). When nothing was (no CFG scale, no guide, no interval), a model
    that stores a default guidance (`models.default_guidance`, e.g. the bundled emoji32) gets it; `autoguide="none"`
    turns it off. What `ddpmkit sample`, `ddpmkit eval` and the web app use; `sample()` does only what it is told."""
    off = isinstance(autoguide, str) and autoguide.strip().lower() == NO_GUIDE
    check_scales(cfg_scale, autoguide_scale)  # before the line announcing a default guidance
    if off and autoguide_scale is not None:
        raise UserError("--autoguide_scale applies to autoguidance, which --autoguide none turns off: drop one of them")
    asked = dict(autoguide=None if off else autoguide, guidance_interval=guidance_interval,
                 autoguide_scale=2.0 if autoguide_scale is None else autoguide_scale)
    if off or autoguide is not None or guidance_interval is not None or cfg_scale is not None or \
            not isinstance(model, str):
        return asked, None
    default = default_guidance(model)
    if not default:
        return asked, None
    chosen = dict(autoguide=default["autoguide"], guidance_interval=default.get("guidance_interval"),
                  autoguide_scale=float(default.get("autoguide_scale", 2.0)) if autoguide_scale is None
                  else autoguide_scale)
    interval = f" in {chosen['guidance_interval']}" if chosen["guidance_interval"] else ""
    why = f" ({default['why']})" if default.get("why") else ""
    return chosen, (f"{model}'s default guidance: autoguidance by {chosen['autoguide']} at scale "
                    f"{chosen['autoguide_scale']:g}{interval}{why}; --autoguide none samples without it")


def check_scales(cfg_scale: float | None, autoguide_scale: float | None) -> None:
    """A CFG scale is a finite number, an autoguidance scale a finite number >= 0 (None: not given)."""
    if autoguide_scale is not None and not (math.isfinite(autoguide_scale) and autoguide_scale >= 0):
        raise UserError(f"--autoguide_scale must be a number >= 0 (got {autoguide_scale})")
    if cfg_scale is not None and not math.isfinite(cfg_scale):
        raise UserError(f"--cfg_scale must be a finite number (got {cfg_scale})")


def load_guide(pipe, autoguide, autoguide_scale: float, cfg_scale: float, interval, device):
    """The autoguidance guide's UNet on `device` (None without one), checked against the model it guides."""
    check_scales(cfg_scale, autoguide_scale)
    if autoguide is None:
        if interval is not None and cfg_scale == 1.0:
            raise UserError("--guidance_interval applies to --cfg_scale or --autoguide: give one of them")
        return None
    if cfg_scale != 1.0:
        raise UserError("--autoguide and --cfg_scale both guide the model's output: use one of them")
    guide = resolve_pipeline(autoguide)
    check_guide(pipe, guide)
    guide.unet.eval()
    return guide.unet.to(device)


def check_guide(pipe, guide) -> None:
    """Autoguidance needs a guide of the same kind: size, channels, classes, prediction type and noise schedule."""
    mine, theirs = pipe.unet.config, guide.unet.config

    def classes(config) -> str:  # num_class_embeds counts the null class of CFG training
        return f"{config.num_class_embeds} class embeddings" if config.num_class_embeds else "unconditional"

    checks = [("image size", mine.sample_size, theirs.sample_size),
              ("channels", (mine.in_channels, mine.out_channels), (theirs.in_channels, theirs.out_channels)),
              ("classes", classes(mine), classes(theirs)),
              ("prediction type", pipe.scheduler.config.prediction_type, guide.scheduler.config.prediction_type),
              ("training timesteps", pipe.scheduler.config.num_train_timesteps,
               guide.scheduler.config.num_train_timesteps)]
    for what, a, b in checks:
        if a != b:
            raise UserError(f"the --autoguide model does not match the model: {what} {b} (the guide) vs {a} (a "
                            "guide must be a weaker model of the same kind: an earlier checkpoint of the same run, or "
                            "a smaller model trained the same way)")
    if not torch.allclose(pipe.scheduler.alphas_cumprod.double(), guide.scheduler.alphas_cumprod.double()):
        raise UserError("the --autoguide model does not match the model: another noise schedule (a guide must be "
                        "trained with the same beta_schedule)")


@contextlib.contextmanager
def guide_for_sampling(guide_unet, speed):
    """The guide in the sampling dtype and memory format, as the main UNet (None passes through)."""
    if guide_unet is None:
        yield None
        return
    with unet_for_sampling(guide_unet, speed.dtype, speed.channels_last, speed.graphs) as model:
        yield model
