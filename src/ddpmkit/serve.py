"""`ddpmkit serve`: a Gradio app for sampling and guidance, a thin view over `sampling.sample` as cli.py is.

Every control is a `Request` field, and a `Request` is one `sample` call (`Studio.run`). The server checks
every bound itself (`Request.check`: the page's limits are only a convenience) and answers each result with
the `ddpmkit sample` command that makes the same images bit for bit (`Request.command`). One job runs at a
time (the UNet already uses every core); the others wait in Gradio's queue and see their place in it.
Gradio is imported only by `build_app` and `serve`: the rest works, and is tested, without it.
"""
from __future__ import annotations

import gc
import logging
import math
import os
import queue
import re
import shlex
import shutil
import signal
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from ddpmkit.config import DEFAULT_MODEL
from ddpmkit.errors import UserError

logger = logging.getLogger(__name__)

# The bounds the server enforces (the page's sliders show the same ones); docs/ui.md lists them.
MAX_STEPS = 1000  # ddpm's full chain; more would be the same timesteps again
MAX_IMAGES = 16  # one grid that a CPU makes in seconds to minutes
MAX_SEED = 2**32 - 1
SCALE_RANGES = {  # per image, as `--guide KIND:ARG:SCALE` and `--cfg_scale` take them
    "color": (0.0, 1000.0),  # 40 moves a 32x32 image visibly at 15-50 steps; 64x64 needs ~4x (docs/guidance.md)
    "clip": (0.0, 100.0),
    "image": (0.0, 1000.0),
    "cfg": (0.0, 20.0),  # 1 plain conditional, 0 unconditional, 2-5 sharper classes
}
MAX_UPLOAD_MB = 5  # a reference image is resized to the model's 32-64 px: a few MB is plenty
MAX_PROMPT_CHARS = 200  # CLIP reads 77 tokens at most
METHODS = ("shortcut", "full")
EXAMPLE_COLORS = (("#BB2266", 40.0), ("#44CCAA", 40.0))  # the course's two colours, at the default colour scale
PREVIEWS = 8  # live previews of the predicted x0 per job (plus the last step)
QUEUE_SIZE = 64  # waiting jobs; beyond it a request is told the queue is full


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

    def check(self, models: dict[str, "ModelInfo"], schedulers: list[str], clip: bool) -> "Request":
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
        info = models[self.model]
        class_label, cfg_scale = None, 1.0
        if info.classes:  # an unconditional model ignores the class controls (the page hides them)
            class_label = str(self.class_label if self.class_label not in (None, "") else info.classes[0])
            if class_label not in info.classes:
                raise UserError(f"unknown class {class_label!r} for {info.label}: use one of {', '.join(info.classes)}")
            cfg_scale = scales["cfg"]
        color = normalise_color(self.color) if scales["color"] > 0 else None
        if scales["color"] > 0 and color is None:
            raise UserError("pick a colour for colour guidance, or set its scale to 0")
        prompt = " ".join((self.clip_prompt or "").split())
        if prompt and scales["clip"] > 0:
            if not clip:
                raise UserError(f"CLIP guidance is off: {clip_unavailable_reason()}")
            if len(prompt) > MAX_PROMPT_CHARS:
                raise UserError(f"the CLIP prompt has {len(prompt)} characters: at most {MAX_PROMPT_CHARS}")
        reference = self.reference if self.reference and scales["image"] > 0 else None
        if reference is not None:
            check_upload(reference)
        return replace(self, steps=steps, num_images=num_images, seed=seed, guidance_every=every,
                       class_label=class_label, cfg_scale=cfg_scale, color=color, color_scale=scales["color"],
                       clip_prompt=prompt if scales["clip"] > 0 else "", clip_scale=scales["clip"],
                       reference=reference, image_scale=scales["image"])

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

    def command(self, model_arg: str, threads: int | None, reference_name: str | None = None) -> str:
        """The `ddpmkit sample` command that makes this request's images bit for bit (same machine).

        `--dtype fp32` fixes the arithmetic (one UNet call for all images, contiguous float32); the thread
        count is part of it because it changes float rounding in the CPU kernels.
        """
        argv = ["ddpmkit", "sample", "--model", model_arg, "--scheduler", self.scheduler, "--steps", str(self.steps),
                "--num_images", str(self.num_images), "--seed", str(self.seed), "--dtype", "fp32"]
        if self.class_label is not None:
            argv += ["--class_label", self.class_label, "--cfg_scale", number_text(self.cfg_scale)]
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


# ---------------------------------------------------------------------------- models and CLIP
@dataclass(frozen=True)
class ModelInfo:
    """One entry of the model picker: what `--model` takes, and what the page shows of it."""

    value: str  # the `--model` argument: a bundled name, an absolute folder, or a Hub id
    label: str
    classes: tuple[str, ...] = ()  # class names (or indices) of a class-conditioned model
    image_size: int | None = None


def find_models(model: str | None = None, models_dir: str | os.PathLike | None = None) -> tuple[dict, str]:
    """The model picker ({value: ModelInfo}: the bundled models, the pipeline folders under models_dir, and
    `model`) and the model shown first: `model`, else the bundled DEFAULT_MODEL, else the first one found."""
    from ddpmkit.models import bundled_models, local_models

    values: list[tuple[str, str]] = [(name, f"{name} (bundled)") for name in bundled_models()]
    if models_dir is not None:
        root = Path(models_dir).expanduser()
        for folder in local_models(root):
            try:
                shown = str(folder.relative_to(root)) if folder != root else folder.name
            except ValueError:
                shown = str(folder)
            values.append((str(folder.resolve()), shown))
    if model is not None:
        path = Path(str(model)).expanduser()
        value = str(path.resolve()) if path.exists() and str(model) not in bundled_models() else str(model)
        if value not in dict(values):
            values.insert(0, (value, path.name if path.is_dir() else str(model)))
        first = value
    elif DEFAULT_MODEL in bundled_models():
        first = DEFAULT_MODEL
    elif values:
        first = values[0][0]
    else:
        where = f" and --models_dir {models_dir} has no pipeline folders" if models_dir is not None else ""
        raise UserError(f"the bundled model {DEFAULT_MODEL} is not installed in this copy of ddpmkit{where}: give "
                        "--model FOLDER (a pipeline made by 'ddpmkit train') or --models_dir DIR (a folder of them)")
    return {value: ModelInfo(value, label) for value, label in values}, first


def clip_unavailable_reason() -> str | None:
    """None when the default CLIP's weights are in the local Hugging Face cache, else why CLIP guidance is off."""
    from huggingface_hub import try_to_load_from_cache

    from ddpmkit.guidance import DEFAULT_CLIP_MODEL

    try:
        found = [try_to_load_from_cache(DEFAULT_CLIP_MODEL, name) for name in
                 ("config.json", "tokenizer_config.json", "model.safetensors", "pytorch_model.bin")]
    except Exception:  # an unreadable cache: as good as none
        found = [None] * 4
    have = [isinstance(f, str) for f in found]
    if have[0] and have[1] and (have[2] or have[3]):
        return None
    return (f"no CLIP weights ({DEFAULT_CLIP_MODEL}) in the local Hugging Face cache: run "
            f"'hf download {DEFAULT_CLIP_MODEL}' once with network access, then restart ddpmkit serve")


# ---------------------------------------------------------------------------- running jobs
class Stopped(Exception):
    """A job stopped before its end: its page closed, or the server is stopping."""


@dataclass
class Result:
    """What one job made: the images in [-1, 1], their files, and the command that makes them again."""

    images: object  # torch.Tensor (B, C, H, W)
    folder: Path
    grid: Path
    singles: list[Path]
    downloads: list[Path]
    command: str
    summary: str
    seconds: float = 0.0


class Studio:
    """The models on offer, their loaded pipelines and CLIP, and `run`: one Request -> one `sample` call."""

    def __init__(self, model: str | None = None, models_dir: str | os.PathLike | None = None,
                 output_dir: str | os.PathLike | None = None, max_loaded: int = 2):
        from ddpmkit.schedulers import is_available, scheduler_names

        self.models, self.default_model = find_models(model, models_dir)
        self.schedulers = ["auto", *[n for n in scheduler_names() if is_available(n)]]
        self.clip_reason = clip_unavailable_reason()
        self.output_dir = Path(output_dir or tempfile.mkdtemp(prefix="ddpmkit-serve-"))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.max_loaded = max_loaded
        self.stopping = threading.Event()  # set by `close`: running jobs end at their next step
        self._loaded: OrderedDict = OrderedDict()  # value -> pipeline, least recently used first
        self._load_lock = threading.Lock()
        self._run_lock = threading.Lock()  # one `sample` at a time, even while an abandoned job winds down
        self._clip = None
        self.describe(self.default_model)  # a model that cannot be loaded fails now, in one line

    def pipeline(self, value: str):
        from ddpmkit.models import load_pipeline

        with self._load_lock:
            if value not in self._loaded:
                self._loaded[value] = load_pipeline(value)
                while len(self._loaded) > self.max_loaded:
                    self._loaded.popitem(last=False)
            self._loaded.move_to_end(value)
            return self._loaded[value]

    def describe(self, value: str) -> ModelInfo:
        """The picker entry of `value` with its classes and image size (loads the model once)."""
        from ddpmkit.guidance import class_names

        info = self.models[value]
        if info.image_size is None:
            unet = self.pipeline(value).unet
            num_classes = (unet.config.num_class_embeds or 1) - 1
            names = list(class_names(value) or [])[:num_classes] if num_classes > 0 else []
            classes = tuple(names + [str(i) for i in range(len(names), max(num_classes, 0))])
            size = unet.config.sample_size
            info = replace(info, classes=classes, image_size=size if isinstance(size, int) else size[0])
            self.models[value] = info
        return info

    def check(self, request: Request) -> Request:
        if request.model in self.models:
            self.describe(request.model)
        return request.check(self.models, self.schedulers, self.clip_reason is None)

    def _clip_model(self):
        from ddpmkit.guidance import DEFAULT_CLIP_MODEL, load_clip

        with self._load_lock:
            if self._clip is None:
                self._clip = load_clip(DEFAULT_CLIP_MODEL)
            return self._clip

    def guidance(self, request: Request, reference: Path | None):
        """The LossGuidance of a checked request, parsed from the `--guide` values of its command as the CLI
        parses them (`build_guidance`), with CLIP loaded once instead of per job."""
        from ddpmkit.guidance import ClipLoss, Guide, LossGuidance, parse_guide, split_guide

        guides = []
        for spec in request.guide_specs(str(reference) if reference else None):
            kind, prompt, scale = split_guide(spec)
            if kind == "clip":
                model, tokenizer = self._clip_model()
                guides.append(Guide(ClipLoss(prompt, model, n_cuts=4, seed=request.seed, tokenizer=tokenizer),
                                    scale, "clip"))
            else:
                guides.append(parse_guide(spec))
        return LossGuidance(guides, request.guidance_method, request.guidance_every) if guides else None

    def run(self, request: Request, on_step: Callable[[dict], None] | None = None,
            cancelled: threading.Event | None = None) -> Result:
        """Check `request`, sample it, write its files (as its command would) and return them.

        `on_step` gets sampling's per-step dict; the job stops with `Stopped` at the next step once
        `cancelled` (or the studio's `stopping`) is set.
        """
        import torch

        from ddpmkit.guidance import resolve_class_label
        from ddpmkit.images import save_grid, save_individual
        from ddpmkit.sampling import sample

        request = self.check(request)
        info = self.models[request.model]
        folder = Path(tempfile.mkdtemp(prefix="job-", dir=self.output_dir))
        reference = None
        if request.reference:
            suffix = re.sub(r"[^a-z0-9.]", "", Path(request.reference).suffix.lower()) or ".png"
            reference = folder / f"reference{suffix}"
            shutil.copyfile(request.reference, reference)
        guidance = self.guidance(request, reference)
        labels = None
        if request.class_label is not None:
            labels = resolve_class_label(request.class_label, info.classes, len(info.classes))

        def callback(state: dict) -> None:
            if self.stopping.is_set() or (cancelled is not None and cancelled.is_set()):
                raise Stopped("stopped")
            if on_step is not None:
                on_step(state)

        pipe = self.pipeline(request.model)
        start = time.perf_counter()
        with self._run_lock:
            out = sample(pipe, scheduler=request.scheduler, steps=request.steps, num_images=request.num_images,
                         seed=request.seed, guidance=guidance, class_labels=labels, cfg_scale=request.cfg_scale,
                         callback=callback, progress=False, dtype="fp32")
        seconds = time.perf_counter() - start
        grid = save_grid(out.images, folder / "samples.png", scale=2)  # what `--out samples.png` writes
        singles = save_individual(out.images, folder / "samples")  # and `--save_individual`
        threads = torch.get_num_threads() if pipe.unet.device.type == "cpu" else None
        command = request.command(request.model, threads, reference.name if reference else None)
        summary = (f"{request.num_images} image(s) from {info.label}: {request.scheduler}, {request.steps} steps, "
                   f"{out.nfe} UNet calls per image, {seconds:.1f} s")
        if reference is not None:
            summary += f"; the command reads {reference.name} (in the downloads) from the folder it runs in"
        downloads = [grid, *singles, *([reference] if reference else [])]
        return Result(out.images, folder, grid, singles, downloads, command, summary, seconds)

    def close(self) -> None:
        """Stop running jobs (at their next step) and delete the files of this session."""
        self.stopping.set()
        with self._run_lock:  # the job in progress, if any, has ended
            shutil.rmtree(self.output_dir, ignore_errors=True)


def preview_image(x0, width: int = 256):
    """The predicted x0 of a step as a PIL grid about `width` pixels wide (nearest-neighbour enlarged)."""
    from ddpmkit.images import make_grid

    images = x0.detach().float().cpu().clamp(-1, 1)
    columns = max(1, math.ceil(math.sqrt(images.shape[0])))
    scale = max(1, width // (columns * (images.shape[-1] + 2) + 2))
    return make_grid(images, scale=scale)


def run_in_thread(studio: Studio, request: Request, every: int):
    """Run `request` in a worker thread; yield ("step", state) every step (x0 every `every` steps), then
    ("done", Result). Closing the generator (the page went away) stops the job at its next step."""
    events: queue.Queue = queue.Queue()
    cancelled = threading.Event()
    shown = [b""]  # the last preview's pixels

    def on_step(state: dict) -> None:
        step, total = state["step"], state["num_steps"]
        x0 = state["pred_original_sample"]
        preview = preview_image(x0) if x0 is not None and (step % every == 0 or step == total - 1) else None
        if preview is not None and preview.tobytes() == shown[0]:
            # the same picture again (x0 has settled): Gradio would rewrite its cached copy while a
            # page may still be reading it
            preview = None
        elif preview is not None:
            shown[0] = preview.tobytes()
        events.put(("step", {"step": step, "num_steps": total, "preview": preview}))

    def work() -> None:
        try:
            events.put(("done", studio.run(request, on_step, cancelled)))
        except BaseException as err:  # handed to the page's thread, which says what happened
            events.put(("error", err))

    thread = threading.Thread(target=work, name="ddpmkit-job", daemon=True)
    thread.start()
    try:
        while True:
            kind, payload = events.get()
            yield kind, payload
            if kind in ("done", "error"):
                return
    finally:
        cancelled.set()


# ---------------------------------------------------------------------------- the page
CSS = ".pixelated img, .pixelated canvas { image-rendering: pixelated; }"


NO_GRADIO = "ddpmkit serve needs Gradio: pip install 'ddpmkit[ui]' (or pip install gradio)"


def _has_gradio() -> bool:
    """Gradio is installed (found without importing it: the import takes seconds)."""
    import importlib.util

    try:
        return importlib.util.find_spec("gradio") is not None
    except (ImportError, ValueError):  # sys.modules["gradio"] is None: blocked
        return False


def _gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported
    try:
        import gradio as gr
    except ImportError:
        raise UserError(NO_GRADIO) from None
    return gr


def build_app(studio: Studio):
    """The Gradio Blocks of `studio`: controls on the left, previews and results on the right."""
    gr = _gradio()
    from ddpmkit.schedulers import default_steps, resolve, settings_label

    auto_name, auto_steps, auto_options = resolve("auto")
    auto_label = settings_label(auto_name, auto_options, auto_steps)

    first = studio.describe(studio.default_model)
    clip_off = studio.clip_reason
    with gr.Blocks(title="ddpmkit", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown("## ddpmkit: sample and guide a diffusion model\nEvery control is a `ddpmkit sample` flag; "
                    "the command under the images makes the same images again.")
        with gr.Row():
            with gr.Column(scale=2, min_width=300):
                gr.Markdown("### Sample")
                model = gr.Dropdown([(m.label, m.value) for m in studio.models.values()], value=first.value,
                                    label="model", info="the bundled model and the pipelines under --models_dir")
                scheduler = gr.Dropdown(studio.schedulers, value="auto", label="scheduler",
                                        info=f"auto: {auto_label}, the measured default")
                steps = gr.Slider(1, MAX_STEPS, value=default_steps("auto"), step=1, label="steps", elem_id="steps")
                num_images = gr.Slider(1, MAX_IMAGES, value=8, step=1, label="images")
                with gr.Row(equal_height=True):
                    seed = gr.Number(0, label="seed", precision=0, minimum=0, maximum=MAX_SEED, scale=3)
                    random_seed = gr.Button("random", scale=1, min_width=60)
                # any value reaches the server (the API may name another model's class), which checks it;
                # empty means the model's first class
                class_label = gr.Dropdown(list(first.classes), value=None, allow_custom_value=True,
                                          label="class", visible=bool(first.classes))
                cfg_scale = gr.Slider(*SCALE_RANGES["cfg"], value=1.0, step=0.1, label="CFG scale",
                                      info="1 plain conditional, 0 unconditional, 2-5 sharper classes",
                                      visible=bool(first.classes))
            with gr.Column(scale=2, min_width=300):
                gr.Markdown("### Guide")
                with gr.Row(equal_height=True):
                    color = gr.ColorPicker(EXAMPLE_COLORS[0][0], label="colour", scale=1, min_width=80)
                    color_scale = gr.Slider(*SCALE_RANGES["color"], value=0, step=1, label="colour scale", scale=3,
                                            info="0: off", elem_id="color-scale")
                gr.Examples([list(e) for e in EXAMPLE_COLORS], [color, color_scale], cache_examples=False,
                            label="the course's colours (click one)", elem_id="colour-examples",
                            example_labels=[f"{hex_color} at scale {scale:g}" for hex_color, scale in EXAMPLE_COLORS])
                method = gr.Radio(list(METHODS), value="shortcut", label="guidance method",
                                  info="shortcut: the course's, 1 UNet call a step; full: through the UNet, 3x the "
                                       "cost, needs 3-4x the scale")
                clip_prompt = gr.Textbox("", label="CLIP prompt", placeholder="a red rose",
                                         interactive=clip_off is None,
                                         info=f"disabled: {clip_off}" if clip_off else "text guidance with CLIP")
                clip_scale = gr.Slider(*SCALE_RANGES["clip"], value=8, step=0.5, label="CLIP scale",
                                       interactive=clip_off is None)
                # a File, not an Image: Gradio would open an Image upload itself, and fail on a bad one
                # without saying why; ddpmkit's decoder checks it (check_upload) and says what is wrong
                reference = gr.File(file_types=["image"], type="filepath", height=120, elem_id="reference",
                                    label=f"reference image (png, jpg, webp; at most {MAX_UPLOAD_MB} MB)")
                image_scale = gr.Slider(*SCALE_RANGES["image"], value=20, step=1, label="reference image scale")
                every = gr.Number(1, label="guide every K steps", precision=0, minimum=1, maximum=MAX_STEPS)
            with gr.Column(scale=3, min_width=300):
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
                preview = gr.Image(label="predicted x0 while sampling", elem_id="preview", type="pil", format="png",
                                   height=200, elem_classes="pixelated", interactive=False, buttons=[])
                gallery = gr.Gallery(label="images", elem_id="gallery", columns=4, height=240, object_fit="contain",
                                     elem_classes="pixelated", buttons=["download", "download_all", "fullscreen"],
                                     format="png")
                summary = gr.Markdown(label="what was made")
                command = gr.Textbox(label="the same images from the command line", elem_id="command",
                                     buttons=["copy"], lines=3, interactive=False)
                downloads = gr.File(label="downloads: the grid and each image", file_count="multiple",
                                    interactive=False, height=140)

        def generate_images(model, scheduler, steps, num_images, seed, class_label, cfg_scale, color, color_scale,
                            guidance_method, clip_prompt, clip_scale, reference, image_scale, guidance_every,
                            progress=gr.Progress()):
            request = Request(model=model, scheduler=scheduler, steps=steps, num_images=num_images, seed=seed,
                              class_label=class_label, cfg_scale=cfg_scale, color=color, color_scale=color_scale,
                              clip_prompt=clip_prompt or "", clip_scale=clip_scale, reference=reference,
                              image_scale=image_scale, guidance_method=guidance_method,
                              guidance_every=guidance_every)
            try:
                request = studio.check(request)
            except UserError as err:
                raise gr.Error(str(err), print_exception=False) from None
            progress(0, desc="starting")
            every_preview = max(1, request.steps // PREVIEWS)
            for kind, payload in run_in_thread(studio, request, every_preview):
                if kind == "step":
                    progress((payload["step"] + 1, payload["num_steps"]), desc="sampling", unit="steps")
                    if payload["preview"] is not None:
                        yield {preview: payload["preview"]}
                elif kind == "error":
                    if isinstance(payload, UserError):
                        raise gr.Error(str(payload), print_exception=False)
                    if isinstance(payload, Stopped):
                        raise gr.Error("stopped: the server is shutting down", print_exception=False)
                    logger.error("job failed", exc_info=payload)
                    raise gr.Error(f"sampling failed: {type(payload).__name__}: {payload}")
                else:
                    result = payload
                    logger.info("%s", result.summary)
                    yield {gallery: [str(p) for p in result.singles], summary: result.summary,
                           command: result.command, downloads: [str(p) for p in result.downloads]}

        def pick_model(value):
            try:
                info = studio.describe(value) if value in studio.models else None
            except UserError as err:
                raise gr.Error(str(err), print_exception=False) from None
            classes = list(info.classes) if info else []
            return (gr.update(choices=classes, value=classes[0] if classes else None, visible=bool(classes)),
                    gr.update(visible=bool(classes)))

        inputs = [model, scheduler, steps, num_images, seed, class_label, cfg_scale, color, color_scale, method,
                  clip_prompt, clip_scale, reference, image_scale, every]
        generate.click(generate_images, inputs, [preview, gallery, summary, command, downloads],
                       api_name="generate", concurrency_limit=1, concurrency_id="sampling", show_progress="full",
                       show_progress_on=[gallery])  # the progress bar and the queue place; the preview stays seen
        model.change(pick_model, model, [class_label, cfg_scale], queue=False, api_visibility="private")
        app.load(lambda: gr.update(value=first.classes[0] if first.classes else None), None, class_label,
                 queue=False, api_visibility="private")  # the page shows the first class; the API's default stays empty
        scheduler.change(lambda name: gr.update(value=default_steps(name)), scheduler, steps, queue=False,
                         api_visibility="private")
        random_seed.click(None, None, seed, js=f"() => Math.floor(Math.random() * {MAX_SEED})")
    return app


def serve(model: str | None = None, models_dir: str | None = None, host: str = "127.0.0.1", port: int = 7860,
          share: bool = False) -> int:
    """Start the app on host:port and block until SIGINT or SIGTERM; then stop the running job and the server."""
    if not _has_gradio():
        raise UserError(NO_GRADIO)  # before any model is loaded: the one thing to install
    studio = Studio(model, models_dir)
    gr = _gradio()
    app = build_app(studio)
    app.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=True,
                       show_error=True, max_file_size=f"{MAX_UPLOAD_MB}mb", allowed_paths=[str(studio.output_dir)],
                       enable_monitoring=False, ssr_mode=False, mcp_server=False, pwa=False, run_history=False,
                       footer_links=["api"], css=CSS,
                       theme=gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"]))
        except OSError as err:
            raise UserError(f"cannot listen on {host}:{port} ({str(err).splitlines()[0]}): give another --port") \
                from None
        logger.info("ddpmkit serve: http://%s:%s%s (Ctrl-C stops it)", host, app.server_port,
                    f", public link {app.share_url}" if share and app.share_url else "")
        # Everything loaded so far lives until exit: keep it out of the collector's scans, which makes the
        # interpreter's last collection at exit ~6x shorter (it was most of the time a stop took).
        gc.freeze()
        stop.wait()
    finally:
        for sig, handler in previous.items():  # a second signal stops at once
            signal.signal(sig, handler)
    logger.info("stopping")
    studio.stopping.set()
    app.close()
    studio.close()
    return 0
