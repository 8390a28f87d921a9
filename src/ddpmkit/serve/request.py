"""One job of the web app as a `Request`: its bounds, their checks, and the `ddpmkit sample` line it answers with.

Every control of the page is a `Request` field, the `sample` argument or `ddpmkit sample` flag of the same name.
The server checks every bound itself (`Request.check`: the page's limits are only a convenience), and each
result comes with the command that makes the same images bit for bit (`Request.command`). Nothing here needs
Gradio or a model.
"""
from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ddpmkit.config import DEFAULT_MODEL, MAX_SEED
from ddpmkit.errors import UserError
from ddpmkit.models import default_guidance
from ddpmkit.serve.catalog import clip_unavailable_reason

if TYPE_CHECKING:
    from ddpmkit.serve.catalog import ModelInfo

# The bounds the server enforces (the page's sliders show the same ones); docs/ui.md lists them.
MAX_STEPS = 1000  # ddpm's full chain; more would be the same timesteps again
MAX_IMAGES = 16  # one grid that a CPU makes in seconds to minutes
SCALE_RANGES = {  # per image, as `--guide KIND:ARG:SCALE` and `--cfg_scale` take them
    "color": (0.0, 1000.0),  # 40 moves a 32x32 image visibly at 15-50 steps; 64x64 needs ~4x (docs/guidance.md)
    "clip": (0.0, 100.0),
    "image": (0.0, 1000.0),
    "cfg": (0.0, 20.0),  # 1 plain conditional, 0 unconditional, 2-5 sharper classes
    "autoguide": (0.0, 10.0),  # 1 the model alone; EDM2's presets use 1.2-2.9
}
MAX_UPLOAD_MB = 5  # a reference image is resized to the model's 32-64 px: a few MB is plenty
MAX_PROMPT_CHARS = 200  # CLIP reads 77 tokens at most
METHODS = ("shortcut", "full")


@dataclass(frozen=True)
class Request:
    """One job: the app's controls, each the `sample` argument or `ddpmkit sample` flag of the same name."""

    model: str = DEFAULT_MODEL
    scheduler: str = "auto"
    steps: int = 15
    num_images: int = 8
    seed: int = 0
    class_label: str | None = None  # a class name (or index) of a class-conditioned model
    cfg_scale: float = 1.0
    color: str | None = None  # '#RRGGBB'; scale 0 leaves colour guidance off
    color_scale: float = 0.0
    clip_prompt: str = ""
    clip_scale: float = 8.0
    reference: str | None = None  # an uploaded image file
    image_scale: float = 20.0
    guidance_method: str = "shortcut"
    guidance_every: int = 1
    autoguide: str = ""  # a model on offer that guides the model (autoguidance); '' is off
    autoguide_scale: float = 2.0
    guidance_interval: str = ""  # 'LO,HI' noise levels (or 't:LO,HI') where CFG / autoguidance apply; '' everywhere

    def check(self, models: dict[str, ModelInfo], schedulers: list[str], clip: bool) -> Request:
        """This request with its values normalised, or a UserError naming the first value out of bounds."""
        if self.model not in models:
            raise UserError(f"unknown model {self.model!r}: pick one of {', '.join(models)}")
        if self.scheduler not in schedulers:
            raise UserError(f"unknown scheduler {self.scheduler!r}: use one of {', '.join(schedulers)}")
        steps = _integer("steps", self.steps, 1, MAX_STEPS)
        num_images = _integer("images", self.num_images, 1, MAX_IMAGES)
        seed = _integer("seed", self.seed, 0, MAX_SEED)
        every = _integer("guide every K steps", self.guidance_every, 1, MAX_STEPS)
        if self.guidance_method not in METHODS:
            raise UserError(f"guidance method must be one of {', '.join(METHODS)} (got {self.guidance_method!r})")
        scales = {name: _number(f"{name} scale", getattr(self, f"{name}_scale"), *SCALE_RANGES[name])
                  for name in ("color", "clip", "image", "cfg")}
        class_label, cfg_scale = self._class(models[self.model], scales["cfg"])
        autoguide, autoguide_scale, interval = self._model_guidance(models, cfg_scale)
        color = normalise_color(self.color) if scales["color"] > 0 else None
        if scales["color"] > 0 and color is None:
            raise UserError("pick a colour for colour guidance, or set its scale to 0")
        prompt = self._prompt(scales["clip"], clip)
        reference = self.reference if self.reference and scales["image"] > 0 else None
        if reference is not None:
            check_upload(reference)
        return replace(self, steps=steps, num_images=num_images, seed=seed, guidance_every=every,
                       class_label=class_label, cfg_scale=cfg_scale, color=color, color_scale=scales["color"],
                       clip_prompt=prompt, clip_scale=scales["clip"], reference=reference,
                       image_scale=scales["image"], autoguide=autoguide, autoguide_scale=autoguide_scale,
                       guidance_interval=interval)

    def _model_guidance(self, models: dict[str, ModelInfo], cfg_scale: float) -> tuple[str, float, str]:
        """(guide, its scale, the interval) checked: the guide is a model on offer, CFG and autoguidance are not
        both on, and the interval reads as `--guidance_interval` does (it needs CFG or autoguidance)."""
        from ddpmkit.model_guidance import GuidanceInterval

        guide = (self.autoguide or "").strip()
        scale = _number("autoguide scale", self.autoguide_scale, *SCALE_RANGES["autoguide"])
        if guide and guide not in models:
            raise UserError(f"unknown guide {guide!r}: pick one of {', '.join(models)}")
        if guide and cfg_scale != 1.0:
            raise UserError("autoguidance and CFG both guide the model's output: set the CFG scale to 1 or the guide "
                            "to none")
        interval = GuidanceInterval.parse((self.guidance_interval or "").strip() or None)
        if interval is not None and not guide and cfg_scale == 1.0:
            raise UserError("the guidance interval applies to CFG or autoguidance: set one of them, or clear it")
        return guide, scale if guide else 2.0, (self.guidance_interval or "").strip() if interval else ""

    def _class(self, info: ModelInfo, cfg_scale: float) -> tuple[str | None, float]:
        """(class label, CFG scale): a class of the model (its first when none is given), or (None, 1) for an
        unconditional model, which ignores the class controls (the page hides them)."""
        if not info.classes:
            return None, 1.0
        label = str(self.class_label if self.class_label not in (None, "") else info.classes[0])
        if label not in info.classes:
            raise UserError(f"unknown class {label!r} for {info.label}: use one of {', '.join(info.classes)}")
        return label, cfg_scale

    def _prompt(self, clip_scale: float, clip: bool) -> str:
        """The CLIP prompt with its spaces collapsed ('' when CLIP guidance is off at scale 0)."""
        prompt = " ".join((self.clip_prompt or "").split())
        if prompt and clip_scale > 0:
            if not clip:
                raise UserError(f"CLIP guidance is off: {clip_unavailable_reason()}")
            if len(prompt) > MAX_PROMPT_CHARS:
                raise UserError(f"the CLIP prompt has {len(prompt)} characters: at most {MAX_PROMPT_CHARS}")
        return prompt if clip_scale > 0 else ""

    def guide_specs(self, reference_name: str | None = None) -> list[str]:
        """The `--guide KIND:ARG:SCALE` values of this (checked) request."""
        specs = []
        if self.color:
            specs.append(f"color:{self.color}:{number_text(self.color_scale)}")
        if self.clip_prompt:
            specs.append(f"clip:{self.clip_prompt}:{number_text(self.clip_scale)}")
        if self.reference:
            specs.append(f"image:{reference_name or self.reference}:{number_text(self.image_scale)}")
        return specs

    def command(self, model_arg: str, threads: int | None, reference_name: str | None = None,
                device: str | None = None) -> str:
        """The `ddpmkit sample` command that makes this request's images bit for bit (same machine).

        `--dtype fp32` fixes the arithmetic (one UNet call for all images, contiguous float32); the thread
        count is part of it because it changes float rounding in the CPU kernels. `device` is given only when
        the app samples elsewhere than `ddpmkit sample` would by default (`ddpmkit serve --device cpu` on a GPU).
        """
        argv = ["ddpmkit", "sample", "--model", model_arg, "--scheduler", self.scheduler, "--steps", str(self.steps),
                "--num_images", str(self.num_images), "--seed", str(self.seed), "--dtype", "fp32"]
        if device is not None:
            argv += ["--device", device]
        if self.class_label is not None:
            argv += ["--class_label", self.class_label, "--cfg_scale", number_text(self.cfg_scale)]
        if self.autoguide:
            argv += ["--autoguide", self.autoguide, "--autoguide_scale", number_text(self.autoguide_scale)]
        elif default_guidance(model_arg):  # the command line would add the model's default guidance: say none
            argv += ["--autoguide", "none"]
        if self.guidance_interval:
            argv += ["--guidance_interval", self.guidance_interval]
        for spec in self.guide_specs(reference_name):
            argv += ["--guide", spec]
        if self.guide_specs():
            if self.guidance_method != "shortcut":
                argv += ["--guidance_method", self.guidance_method]
            if self.guidance_every != 1:
                argv += ["--guidance_every", str(self.guidance_every)]
        argv += ["--out", "samples.png", "--save_individual"]
        prefix = f"OMP_NUM_THREADS={threads} " if threads else ""
        return prefix + shlex.join(argv)


def number_text(value: float) -> str:
    """A float as the shortest text that reads back as the same float ('40' for 40.0, '0.1' for 0.1)."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(float(value))


def _integer(name: str, value, low: int, high: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a whole number from {low} to {high} (got {value!r})") from None
    if not number.is_integer() or not low <= number <= high:
        raise UserError(f"{name} must be a whole number from {low} to {high} (got {value!r})")
    return int(number)


def _number(name: str, value, low: float, high: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number from {low:g} to {high:g} (got {value!r})") from None
    if not math.isfinite(number) or not low <= number <= high:
        raise UserError(f"{name} must be from {low:g} to {high:g} (got {value!r})")
    return number


def normalise_color(value) -> str | None:
    """'#bb2266', 'BB2266', 'rgb(187, 34, 102)' or 'rgba(...)' (colour pickers' forms) -> '#BB2266'; '' -> None."""
    text = str(value or "").strip()
    if not text:
        return None
    if re.fullmatch(r"#?[0-9a-fA-F]{6}", text):
        return "#" + text.lstrip("#").upper()
    match = re.fullmatch(r"rgba?\(\s*([\d.]+)\s*,\s*([\d.]+)\s*,\s*([\d.]+)\s*(?:,\s*[\d.]+\s*)?\)", text)
    if match and all(0 <= float(v) <= 255 for v in match.groups()):
        return "#" + "".join(f"{round(float(v)):02X}" for v in match.groups())
    raise UserError(f"colour {text!r} is not a colour like #BB2266")


def check_upload(path: str | Path) -> None:
    """An uploaded reference image: at most MAX_UPLOAD_MB, and an image that decodes safely (no bombs)."""
    from ddpmkit.data import ImageRefused, decode_image

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        raise UserError("the uploaded reference image is gone: upload it again") from None
    if size > MAX_UPLOAD_MB * 2**20:
        raise UserError(f"the reference image is {size / 2**20:.1f} MB: upload one of at most {MAX_UPLOAD_MB} MB")
    try:
        decode_image(path, 8)  # header checks (pixel limit) before decoding; then a full decode
    except ImageRefused as err:
        raise UserError(f"the reference image was refused: {err}") from None
    except Exception:  # anything Pillow cannot read, whatever it raises: one message
        raise UserError("the reference image cannot be read: upload a png, jpg or webp file") from None
