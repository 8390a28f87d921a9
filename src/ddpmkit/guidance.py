"""Guidance: losses on the predicted x0 whose gradient moves x during sampling.

Loss guidance is the course's Unit 2 recipe, per step: predict the noise, form x0, take
`loss = loss_fn(x0) * scale`, move `x <- x - d loss / d x`, then step the scheduler once.
`LossGuidance` is a `sampling.Guidance`: the sampling loop never knows which loss it runs.

Losses are per image (shape (B,)): the gradient on image k is that of image k's own loss, so a result
does not depend on how many images share the batch. The course's `color_loss` is a mean over the
whole batch, so a course scale S used on a batch of B images equals scale S / B here.
Classifier-free guidance itself is `sampling.model_fn`; class names are model metadata (`models.class_names`).
"""
from __future__ import annotations

import importlib
import json
import logging
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ddpmkit import hub
from ddpmkit.errors import UserError
from ddpmkit.prediction import alpha_bar_and_vp_sample, predicted_x0
from ddpmkit.schedulers import move_factor

logger = logging.getLogger(__name__)

METHODS = ("shortcut", "full")
KINDS = ("color", "clip", "image", "custom")
DEFAULT_SCALES = {"color": 40.0, "clip": 8.0, "image": 20.0, "custom": 1.0}  # per image, at 32x32
# A scale is the push of the course's 40 DDIM steps: with N noise levels each step moves x by 40/N of it, so a scale
# means the same at 15 DEIS steps as at 1000 DDPM steps (docs/guidance.md has the figures per scheduler).
REFERENCE_STEPS = 40
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's image normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Scale schedules as a function of alpha_bar_t (the course plots these); the course's CLIP example uses sqrt_alpha_bar.
SCHEDULES: dict[str, Callable[[float], float]] = {
    "constant": lambda ab: 1.0,
    "alpha_bar": lambda ab: ab,
    "sqrt_alpha_bar": lambda ab: math.sqrt(ab),
    "sqrt_one_minus_alpha_bar": lambda ab: math.sqrt(max(1.0 - ab, 0.0)),
}


# --------------------------------------------------------------------------- losses: x0 (B, C, H, W) -> (B,)
def parse_color(color: str | Sequence[float]) -> tuple[float, ...]:
    """'#55FFAA', '55FFAA' or '0.1,0.9,0.5' (or a sequence) -> RGB in [0, 1]."""
    if not isinstance(color, str):
        values = tuple(float(c) for c in color)
    elif re.fullmatch(r"#?[0-9a-fA-F]{6}", color.strip()):
        hex_digits = color.strip().lstrip("#")
        values = tuple(int(hex_digits[i:i + 2], 16) / 255 for i in (0, 2, 4))
    else:
        try:
            values = tuple(float(c) for c in color.split(","))
        except ValueError:
            raise UserError(f"colour {color!r} is neither a hex colour like #55FFAA nor R,G,B in [0, 1] "
                            "like 0.1,0.9,0.5") from None
    if len(values) not in (1, 3) or not all(0.0 <= v <= 1.0 for v in values):
        raise UserError(f"colour {color!r} must be 3 values in [0, 1] (R,G,B) or a hex colour like #55FFAA")
    return values


def color_loss(images: torch.Tensor, target_color=(0.1, 0.9, 0.5)) -> torch.Tensor:
    """The course's color_loss, verbatim: mean |image - target| over the whole batch (for reference and tests)."""
    target = torch.tensor(target_color).to(images.device) * 2 - 1  # [-1,1]로 맞춤
    target = target[None, :, None, None]
    return torch.abs(images - target).mean()


class ColorLoss:
    """The course's color_loss per image: mean |x0 - target| over channels and pixels, target mapped to [-1, 1]."""

    def __init__(self, target: str | Sequence[float] = (0.1, 0.9, 0.5)):
        self.target = parse_color(target)
        self.name = "color"

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        target = torch.tensor(self.target, device=x0.device, dtype=x0.dtype) * 2 - 1
        if x0.shape[1] == 1 and target.numel() == 3:  # a grayscale model: aim at the colour's luma
            luma = torch.tensor([0.299, 0.587, 0.114], device=x0.device, dtype=x0.dtype)
            target = (target * luma).sum(0, keepdim=True)
        elif target.numel() != x0.shape[1]:
            raise UserError(f"colour guidance got {target.numel()} values for a {x0.shape[1]}-channel model")
        return (x0 - target[None, :, None, None]).abs().mean(dim=(1, 2, 3))


def load_image_tensor(path: str | Path, size: int, channels: int = 3) -> torch.Tensor:
    """An image file -> float (1, C, size, size) in [-1, 1], resized like the training data."""
    from PIL import UnidentifiedImageError

    from ddpmkit.data import decode_image

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"reference image {path} does not exist: check the path")
    try:
        array = decode_image(path, size, channels)
    except (UnidentifiedImageError, OSError, ValueError):
        raise UserError(f"cannot read {path} as an image: use a png, jpg or webp file") from None
    return torch.from_numpy(array.copy()).float().div(127.5).sub(1.0)[None]


class ImageLoss:
    """Pixel MSE to a reference image, optionally both downsampled to `size` (then only layout and colour count)."""

    def __init__(self, reference: str | Path | torch.Tensor, size: int | None = None):
        self.reference, self.size = reference, size
        self.name = "image"
        self._cache: dict = {}

    def _target(self, x0: torch.Tensor) -> torch.Tensor:
        key = (tuple(x0.shape[1:]), x0.device, x0.dtype)
        if key not in self._cache:
            channels, height = x0.shape[1], x0.shape[2]
            if torch.is_tensor(self.reference):
                ref = self.reference.to(x0.device, x0.dtype)
                ref = ref[None] if ref.ndim == 3 else ref
                ref = F.interpolate(ref, size=x0.shape[2:], mode="bilinear", antialias=True, align_corners=False) \
                    if ref.shape[2:] != x0.shape[2:] else ref
            else:
                ref = load_image_tensor(self.reference, height, channels).to(x0.device, x0.dtype)
            self._cache[key] = self._downsample(ref)
        return self._cache[key]

    def _downsample(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is None or self.size >= x.shape[-1]:
            return x
        return F.interpolate(x, size=(self.size, self.size), mode="area")

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        return (self._downsample(x0) - self._target(x0)).pow(2).mean(dim=(1, 2, 3))


def load_callable(spec: str) -> Callable:
    """'module:function' (module importable from the current folder too) -> the function."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"custom loss {spec!r} must be module:function (e.g. mylosses:redness)")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"cannot import module {module_name!r} for the custom loss ({err}): put {module_name}.py "
                        "in the current folder or on PYTHONPATH") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"module {module_name} has no function {attr!r} for the custom loss")
    return fn


class CustomLoss:
    """Any callable f(x0) -> per-image (B,) losses or a scalar; a scalar is evaluated image by image."""

    def __init__(self, fn: Callable | str):
        self.fn = load_callable(fn) if isinstance(fn, str) else fn
        self.name = getattr(self.fn, "__name__", "custom")
        self._per_image: bool | None = None  # learnt on the first call: does fn already return one value per image?

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        if self._per_image is None:  # the first call: a mistake in the function is one line, at the first step
            value = self._first_call(x0)
        elif self._per_image:
            value = torch.as_tensor(self.fn(x0))
        if self._per_image is not False:
            if value.ndim == 1 and value.shape[0] == x0.shape[0]:
                self._per_image = True
                return value
            if value.numel() != 1:
                raise UserError(f"custom loss {self.name} returned shape {tuple(value.shape)}: return a scalar or "
                                "one value per image")
            self._per_image = False
            if x0.shape[0] == 1:
                return value.reshape(1)
        return torch.stack([torch.as_tensor(self.fn(x0[i:i + 1])).reshape(()) for i in range(x0.shape[0])])

    def _first_call(self, x0: torch.Tensor) -> torch.Tensor:
        how = "it must take one tensor x0 (B, C, H, W) in [-1, 1] and return a torch tensor computed from it"
        try:
            value = self.fn(x0)
        except Exception as err:  # noqa: BLE001 - the user's function: any mistake in it
            raise UserError(f"custom loss {self.name} failed ({type(err).__name__}: {str(err)[:120]}): {how}") from None
        if not torch.is_tensor(value) or (x0.requires_grad and not value.requires_grad):
            what = "a value without a gradient (detached, .item() or numpy)" if torch.is_tensor(value) or \
                hasattr(value, "__array__") or isinstance(value, (int, float)) else f"a {type(value).__name__}"
            raise UserError(f"custom loss {self.name} returned {what}: {how}, with torch operations only")
        return value


class ClipLoss:
    """CLIP guidance: squared great-circle distance between n_cuts augmented crops of x0 and a text embedding.

    As the course (after Crowson's CLIP-guided diffusion): random resized crop to CLIP's input size, a small
    random affine, a horizontal flip, CLIP's mean/std; the distance is averaged over the cuts, per image.
    The cuts of step i are drawn from a generator seeded with (seed, i), the same for every image of every
    batch, so an image's result does not depend on its batch. `model` is a Hub id, a folder or a CLIPModel;
    give `text_embedding` (D,) to skip the tokenizer.
    """

    def __init__(self, prompt: str | None = None, model=DEFAULT_CLIP_MODEL, n_cuts: int = 4, seed: int = 0,
                 tokenizer=None, text_embedding: torch.Tensor | None = None, crop_scale=(0.5, 1.0),
                 max_degrees: float = 5.0):
        if n_cuts < 1:
            raise UserError(f"--n_cuts must be at least 1 (got {n_cuts})")
        if prompt is None and text_embedding is None:
            raise UserError("CLIP guidance needs a text prompt, e.g. --guide 'clip:a red rose:8'")
        self.prompt, self.n_cuts, self.seed = prompt, n_cuts, seed
        self.crop_scale, self.max_degrees = crop_scale, max_degrees
        self.name = "clip"
        self.model, self.tokenizer = (model, tokenizer) if not isinstance(model, (str, Path)) else load_clip(model)
        if text_embedding is None and self.tokenizer is None:
            raise UserError("CLIP guidance with a CLIPModel object needs its tokenizer (or a text_embedding)")
        self.model.eval().requires_grad_(False)
        self.text_embedding = text_embedding
        self.generator = torch.Generator().manual_seed(seed)

    def begin_step(self, step_index: int) -> None:
        """Reseed the cut generator from (seed, step): the same cuts for every batch at this step."""
        self.generator.manual_seed(self.seed * 100_003 + step_index)

    def _text(self, device) -> torch.Tensor:
        if self.text_embedding is None:
            tokens = self.tokenizer([self.prompt], padding=True, return_tensors="pt")
            with torch.no_grad():
                self.text_embedding = _features(self.model.to(device).get_text_features(**tokens.to(device)))[0]
        return self.text_embedding.to(device)

    def cuts(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (n_cuts * B, 3, S, S) CLIP-normalised cuts, with torch ops only."""
        size = self.model.config.vision_config.image_size
        b, _, h, w = images.shape
        images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        mean = torch.tensor(CLIP_MEAN, device=images.device, dtype=images.dtype)[None, :, None, None]
        std = torch.tensor(CLIP_STD, device=images.device, dtype=images.dtype)[None, :, None, None]
        out = []
        for _ in range(self.n_cuts):
            r = torch.rand(6, generator=self.generator).tolist()
            area = self.crop_scale[0] + (self.crop_scale[1] - self.crop_scale[0]) * r[0]  # RandomResizedCrop
            ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * r[1])
            ch = max(1, min(h, round(math.sqrt(area * h * w / ratio))))
            cw = max(1, min(w, round(math.sqrt(area * h * w * ratio))))
            top, left = int(r[2] * (h - ch + 1)), int(r[3] * (w - cw + 1))
            cut = F.interpolate(images[:, :, top:top + ch, left:left + cw], size=(size, size), mode="bilinear",
                                align_corners=False)
            angle = math.radians((2 * r[4] - 1) * self.max_degrees)  # RandomAffine(degrees=5)
            flip = -1.0 if r[5] < 0.5 else 1.0  # RandomHorizontalFlip
            theta = torch.tensor([[math.cos(angle) * flip, -math.sin(angle), 0.0],
                                  [math.sin(angle) * flip, math.cos(angle), 0.0]], device=images.device,
                                 dtype=images.dtype)
            grid = F.affine_grid(theta.expand(b, 2, 3), list(cut.shape), align_corners=False)
            cut = F.grid_sample(cut, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
            out.append((cut - mean) / std)
        return torch.cat(out)

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        model = self.model.to(x0.device)
        cuts = self.cuts((x0.float() + 1) / 2)
        image_embeds = F.normalize(_features(model.get_image_features(pixel_values=cuts)), dim=-1)
        text = F.normalize(self._text(x0.device).float(), dim=-1)
        dists = (image_embeds - text).norm(dim=-1).div(2).arcsin().pow(2).mul(2)  # squared great-circle distance
        return dists.view(self.n_cuts, x0.shape[0]).mean(0)


def _features(output) -> torch.Tensor:
    """transformers 4 returns the projected features; transformers 5 a model output with them in pooler_output."""
    return output if torch.is_tensor(output) else output.pooler_output


def load_clip(name: str | Path = DEFAULT_CLIP_MODEL):
    """CLIPModel and its tokenizer from a local folder or the Hugging Face cache (downloading only when allowed)."""
    from transformers import AutoTokenizer, CLIPModel

    unreachable = None  # why the Hub cannot be reached (no network): then the cache is all there is
    for local_only in (True, False):
        try:
            model = CLIPModel.from_pretrained(str(name), local_files_only=local_only)
            tokenizer = AutoTokenizer.from_pretrained(str(name), local_files_only=local_only)
            return model, tokenizer
        except (OSError, ValueError):
            if Path(str(name)).expanduser().exists():
                break
            from huggingface_hub import constants

            if constants.HF_HUB_OFFLINE or (unreachable := hub.hub_unreachable()):
                break
    reach = f" (the Hub cannot be reached: {unreachable})" if unreachable else ""
    raise UserError(f"no CLIP weights for {name}{reach}: run 'hf download {name}' once with network access, or pass "
                    "--clip_model a local folder saved with CLIPModel.save_pretrained (and its tokenizer)")


# --------------------------------------------------------------------------- the guidance object
@dataclass
class Guide:
    """One loss with its scale; `loss(x0)` returns one value per image."""

    loss: Callable[[torch.Tensor], torch.Tensor]
    scale: float
    name: str = ""

    def __post_init__(self):
        self.name = self.name or getattr(self.loss, "name", None) or getattr(self.loss, "__name__", "loss")
        if not math.isfinite(self.scale):
            raise UserError(f"guidance scale of {self.name} must be a finite number (got {self.scale})")


class LossGuidance:
    """Loss guidance on the predicted x0 (the course's Unit 2): x <- x - s(t) * sum_k scale_k * d loss_k(x0) / dx.

    x is taken in the variance-preserving scale (sigma-based schedulers keep x = x0 + sigma eps: it is
    x / sqrt(1 + sigma^2) there), so the same scale moves the image as much with `euler` as with `ddim`.

    `shortcut` (the course's): the noise prediction is made without gradients and x0 is a function of x
    alone; the step reuses that prediction (one UNet call). `full`: the gradient flows through the UNet,
    and the noise is predicted again at the moved x (two UNet calls and one backward pass).
    """

    def __init__(self, guides: Sequence[Guide] | Guide, method: str = "shortcut", every: int = 1,
                 schedule: str = "constant"):
        self.guides = [guides] if isinstance(guides, Guide) else list(guides)
        if not self.guides:
            raise UserError("loss guidance needs at least one loss (--guide KIND:ARG[:SCALE])")
        if method not in METHODS:
            raise UserError(f"--guidance_method must be one of {', '.join(METHODS)} (got {method!r})")
        if every < 1:
            raise UserError(f"--guidance_every must be at least 1 (got {every})")
        if schedule not in SCHEDULES:
            raise UserError(f"--guidance_schedule must be one of {', '.join(SCHEDULES)} (got {schedule!r})")
        self.method, self.every, self.schedule = method, every, schedule

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step_index: int, num_steps: int,
                 predict: Callable[[torch.Tensor], torch.Tensor], scheduler):
        # alpha_bar_t, and c with x_vp = c * x: 1 for DDPM-style schedulers, sqrt(alpha_bar) for the Euler family
        alpha_bar, c = (float(v) for v in alpha_bar_and_vp_sample(scheduler, torch.ones((), device=x.device), t))
        factor = SCHEDULES[self.schedule](alpha_bar)
        # the scale is the push of 40 DDIM steps, spread over this run's steps (twice that for an SDE sampler)
        per_step = REFERENCE_STEPS / num_steps * move_factor(scheduler)
        if step_index % self.every or all(g.scale * factor == 0 for g in self.guides):
            with torch.no_grad():
                return x, predict(x), None
        for guide in self.guides:
            if hasattr(guide.loss, "begin_step"):
                guide.loss.begin_step(step_index)
        # the move is made on x_vp = sqrt(ab) x0 + sqrt(1-ab) eps, so a scale means the same for every scheduler
        x_vp = (x.detach().float() * c).requires_grad_(True)
        x_in = (x_vp / c).to(x.dtype)
        if self.method == "shortcut":
            with torch.no_grad():
                model_output = predict(x)
        else:
            model_output = predict(x_in)
        x0 = predicted_x0(scheduler, model_output, x_in, t).float()
        terms = [guide.loss(x0) for guide in self.guides]
        total = sum(guide.scale * factor * term for guide, term in zip(self.guides, terms))  # (B,)
        grad = torch.autograd.grad(total.sum() * per_step, x_vp)[0]  # image k's gradient: image k's loss only
        moved = ((x_vp.detach() - grad) / c).to(x.dtype)
        if self.method == "full":
            with torch.no_grad():
                model_output = predict(moved)
        record = {"step": step_index, "t": float(t), "scale_factor": factor, "step_weight": per_step,
                  "loss": total.detach().float().cpu().tolist(),
                  "terms": {g.name: term.detach().float().cpu().tolist() for g, term in zip(self.guides, terms)}}
        self._log(record, step_index, num_steps)
        return moved, model_output.detach(), record

    def _log(self, record: dict, step_index: int, num_steps: int) -> None:
        mean = sum(record["loss"]) / len(record["loss"])
        shown = step_index % max(1, num_steps // 10) == 0 or step_index >= num_steps - self.every
        logger.log(logging.INFO if shown else logging.DEBUG, "guidance step %d/%d (t=%g): loss %.4f (mean of %d "
                   "images)", step_index + 1, num_steps, record["t"], mean, len(record["loss"]))


def losses_per_step(guidance_losses: list[list[dict]]) -> list[dict]:
    """`SampleOutput.guidance_losses` (per micro-batch, per step) -> one record per step over all images."""
    merged: dict[int, dict] = {}
    for batch in guidance_losses:
        for record in batch:
            into = merged.setdefault(record["step"], {"step": record["step"], "t": record["t"], "loss": [],
                                                      "terms": {}})
            into["loss"] += record["loss"]
            for name, values in record["terms"].items():
                into["terms"].setdefault(name, []).extend(values)
    return [merged[k] for k in sorted(merged)]


def write_guidance_log(path, guidance_losses: list[list[dict]], spec: dict) -> tuple[float, float] | None:
    """The per-step losses (`losses_per_step`) as JSON beside the images, with `spec` (the flags that made them);
    returns the mean loss per image at the first and the last guided step (None: no guided step)."""
    steps = losses_per_step(guidance_losses)
    Path(path).write_text(json.dumps({**spec, "steps": steps}, indent=1) + "\n")
    if not steps:
        return None
    first, last = (sum(s["loss"]) / len(s["loss"]) for s in (steps[0], steps[-1]))
    return first, last


# --------------------------------------------------------------------------- the CLI syntax: KIND:ARG[:SCALE]
def split_guide(spec: str) -> tuple[str, str, float | None]:
    """'color:#BB2266:40' -> ('color', '#BB2266', 40.0); a last ':part' that is not a number belongs to ARG."""
    kind, sep, rest = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS or not sep or not rest.strip():
        raise UserError(f"--guide {spec!r} is not KIND:ARG[:SCALE] with KIND one of {', '.join(KINDS)} "
                        "(e.g. color:#BB2266:40)")
    arg, sep, last = rest.rpartition(":")
    try:
        scale = float(last) if sep else None
    except ValueError:
        scale = None
    if scale is None:
        arg = rest
    if not arg.strip():
        raise UserError(f"--guide {spec!r} has an empty ARG: e.g. color:#BB2266:40")
    return kind, arg, scale


def parse_guide(spec: str, clip_model=DEFAULT_CLIP_MODEL, n_cuts: int = 4, seed: int = 0,
                image_size: int | None = None) -> Guide:
    """One `--guide KIND:ARG[:SCALE]` -> a Guide (`image:PATH@16` matches at 16x16 only)."""
    kind, arg, scale = split_guide(spec)
    scale = DEFAULT_SCALES[kind] if scale is None else scale
    if kind == "color":
        return Guide(ColorLoss(arg), scale, "color")
    if kind == "clip":
        return Guide(ClipLoss(arg, clip_model, n_cuts=n_cuts, seed=seed), scale, "clip")
    if kind == "image":
        path, _, size = arg.rpartition("@") if re.search(r"@\d+$", arg) else (arg, "", "")
        return Guide(ImageLoss(path, int(size) if size else None), scale, "image")
    return Guide(CustomLoss(arg), scale, arg.partition(":")[2])


def build_guidance(specs: Sequence[str] = (), losses: Sequence[str] = (), method: str = "shortcut", every: int = 1,
                   schedule: str = "constant", clip_model=DEFAULT_CLIP_MODEL, n_cuts: int = 4,
                   seed: int = 0) -> LossGuidance | None:
    """The CLI's --guide and --loss flags -> a LossGuidance (None when no loss is asked for)."""
    guides = [parse_guide(s, clip_model, n_cuts, seed) for s in specs]
    guides += [parse_guide(f"custom:{s}", clip_model, n_cuts, seed) for s in losses]
    return LossGuidance(guides, method, every, schedule) if guides else None
