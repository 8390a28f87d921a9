"""The web app's job runner: `Studio.run` turns one checked `Request` into one `sampling.sample` call, and
`run_in_thread` runs it in a worker thread that reports each step and a preview of the predicted x0.

One job samples at a time (the UNet already uses every core; on a GPU it has the device to itself): Gradio's
queue (at most QUEUE_SIZE waiting, `concurrency_limit=1`) shows each waiting page its place. A job stops at
its next step when its page goes away or the server stops (`Stopped`). Pipelines are loaded when a job needs
them, on `devices.resolve_device`'s device (a CUDA GPU when there is one), and the last few stay loaded.
"""
from __future__ import annotations

import math
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ddpmkit.serve.catalog import ModelInfo, clip_unavailable_reason, find_models
from ddpmkit.serve.request import Request

PREVIEWS = 8  # live previews of the predicted x0 per job (plus the last step)
QUEUE_SIZE = 64  # waiting jobs; beyond it a request is told the queue is full


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
    """The models on offer, their loaded pipelines and CLIP, and `run`: one Request -> one `sample` call.

    `device`: where jobs sample; None or 'auto' is `devices.resolve_device`'s rule (a CUDA GPU when there is
    one), 'cpu' pins the CPU.
    """

    def __init__(self, model: str | None = None, models_dir: str | os.PathLike | None = None,
                 output_dir: str | os.PathLike | None = None, max_loaded: int = 2, device: str | None = None):
        from ddpmkit.devices import default_device, resolve_device
        from ddpmkit.schedulers import is_available, scheduler_names

        self.device = resolve_device(device)
        # the command names the device only where `ddpmkit sample` would pick another one by itself
        self._device_flag = None if self.device == default_device() else str(self.device)
        self.max_loaded = max_loaded
        self.stopping = threading.Event()  # set by `close`: running jobs end at their next step
        self._loaded: OrderedDict = OrderedDict()  # value -> pipeline, least recently used first
        self._load_lock = threading.Lock()
        self._run_lock = threading.Lock()  # one `sample` at a time, even while an abandoned job winds down
        self._clip = None
        # read from config files; a --model that cannot be used fails here, in one line
        self.models, self.default_model = find_models(model, models_dir, load=self.pipeline)
        self.schedulers = ["auto", *[n for n in scheduler_names() if is_available(n)]]
        self.clip_reason = clip_unavailable_reason()
        self.output_dir = Path(output_dir or tempfile.mkdtemp(prefix="ddpmkit-serve-"))
        self.output_dir.mkdir(parents=True, exist_ok=True)

    def pipeline(self, value: str):
        """The pipeline of a picker value on the studio's device, loaded on first use."""
        from ddpmkit.models import load_pipeline

        with self._load_lock:
            if value not in self._loaded:
                self._loaded[value] = load_pipeline(value, device=self.device)
                while len(self._loaded) > self.max_loaded:
                    self._loaded.popitem(last=False)
            self._loaded.move_to_end(value)
            return self._loaded[value]

    @property
    def loaded(self) -> list[str]:
        """The models whose pipelines are loaded now, least recently used first."""
        return list(self._loaded)

    def describe(self, value: str) -> ModelInfo:
        """The picker entry of `value`: its label, classes and image size."""
        return self.models[value]

    def check(self, request: Request) -> Request:
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
        from ddpmkit.models import resolve_class_label
        from ddpmkit.sampling import sample

        request = self.check(request)
        info = self.models[request.model]
        folder = Path(tempfile.mkdtemp(prefix="job-", dir=self.output_dir))
        reference = copy_reference(request.reference, folder) if request.reference else None
        guidance = self.guidance(request, reference)
        labels = None
        if request.class_label is not None:
            labels = resolve_class_label(request.class_label, info.classes, len(info.classes))
        callback = self._step_callback(on_step, cancelled)
        pipe = self.pipeline(request.model)
        start = time.perf_counter()
        with self._run_lock:
            out = sample(pipe, scheduler=request.scheduler, steps=request.steps, num_images=request.num_images,
                         seed=request.seed, guidance=guidance, class_labels=labels, cfg_scale=request.cfg_scale,
                         autoguide=self.pipeline(request.autoguide) if request.autoguide else None,
                         autoguide_scale=request.autoguide_scale, guidance_interval=request.guidance_interval or None,
                         callback=callback, progress=False, dtype="fp32")
        return self._result(request, info, out, folder, reference, time.perf_counter() - start)

    def _step_callback(self, on_step, cancelled) -> Callable[[dict], None]:
        """sample's per-step callback: stops the job once it is cancelled, else hands the step to `on_step`."""

        def callback(state: dict) -> None:
            if self.stopping.is_set() or (cancelled is not None and cancelled.is_set()):
                raise Stopped("stopped")
            if on_step is not None:
                on_step(state)

        return callback

    def _result(self, request: Request, info: ModelInfo, out, folder: Path, reference: Path | None,
                seconds: float) -> Result:
        """Write a job's files as its command would, and say what was made."""
        from ddpmkit.images import save_grid, save_individual

        grid = save_grid(out.images, folder / "samples.png", scale=2)  # what `--out samples.png` writes
        singles = save_individual(out.images, folder / "samples")  # and `--save_individual`
        command = self.command(request, reference.name if reference else None)
        second = f" + {out.guide_calls} of the guide" if request.autoguide and out.guide_calls else ""
        summary = (f"{request.num_images} image(s) from {info.label}: {request.scheduler}, {request.steps} steps, "
                   f"{out.nfe} UNet calls per image{second}, {seconds:.1f} s")
        if reference is not None:
            summary += f"; the command reads {reference.name} (in the downloads) from the folder it runs in"
        downloads = [grid, *singles, *([reference] if reference else [])]
        return Result(out.images, folder, grid, singles, downloads, command, summary, seconds)

    def command(self, request: Request, reference_name: str | None = None) -> str:
        """The `ddpmkit sample` line of a checked request, with this studio's CPU threads (they change float
        rounding) and its device where `ddpmkit sample` would pick another one by itself."""
        import torch

        threads = torch.get_num_threads() if self.device.type == "cpu" else None
        return request.command(request.model, threads, reference_name, self._device_flag)

    def close(self) -> None:
        """Stop running jobs (at their next step) and delete the files of this session."""
        self.stopping.set()
        with self._run_lock:  # the job in progress, if any, has ended
            shutil.rmtree(self.output_dir, ignore_errors=True)


def copy_reference(upload: str, folder: Path) -> Path:
    """An uploaded reference image copied into a job's folder as reference.EXT, the name its command reads."""
    suffix = re.sub(r"[^a-z0-9.]", "", Path(upload).suffix.lower()) or ".png"
    reference = folder / f"reference{suffix}"
    shutil.copyfile(upload, reference)
    return reference


def preview_image(x0, width: int = 256):
    """The predicted x0 of a step as a PIL grid about `width` pixels wide (nearest-neighbour enlarged)."""
    from ddpmkit.images import make_grid

    images = x0.detach().float().cpu().clamp(-1, 1)
    columns = max(1, math.ceil(math.sqrt(images.shape[0])))
    scale = max(1, width // (columns * (images.shape[-1] + 2) + 2))
    return make_grid(images, scale=scale)


def preview_every(steps: int) -> int:
    """Every how many steps a job of `steps` steps shows its predicted x0 (about PREVIEWS times)."""
    return max(1, steps // PREVIEWS)


def run_in_thread(studio: Studio, request: Request, every: int):
    """Run `request` in a worker thread; yield ("step", state) every step (x0 every `every` steps), then
    ("done", Result) or ("error", exception). Closing the generator (the page went away) stops the job at its
    next step."""
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
