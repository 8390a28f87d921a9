"""What `ddpmkit doctor` examines, opened once: a run folder, a pipeline folder (or a bundled name or Hub id), or a
training config given as flags before training; and the pieces the checks share, each made the first time a check
asks for it: the training data and a real batch, a new UNet as training would start it, the raw weights of the
newest checkpoint, and samples (cached by sampler, so that two checks never pay for the same images twice)."""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ddpmkit import runs
from ddpmkit.config import TrainConfig, make_config
from ddpmkit.data import ImageData, ShuffledBatches, load_image_data
from ddpmkit.devices import resolve_device
from ddpmkit.errors import UserError

logger = logging.getLogger(__name__)

DOCTOR_MAX_IMAGES = 512  # the data checks read at most this many images: a batch and its statistics need no more


def config_from_saved(saved: dict, overrides: dict | None = None) -> TrainConfig:
    """A TrainConfig from a saved train_config (its fields this version knows), with `overrides` on top, checked."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in saved.items() if k in known}
    return make_config(TrainConfig, {**values, **(overrides or {})}).validate()


@dataclass
class Subject:
    """A run, a pipeline or a config, and the pieces the checks share (made once, on first use)."""

    kind: str  # "run", "pipeline" or "config" (the train flags, before training)
    name: str
    config: TrainConfig | None  # how it trained (or will): the saved config, the doctor's flags on top
    saved_config: dict = field(default_factory=dict)  # the training config as saved (train_config.json, ddpmkit.json)
    pipeline: Any = None  # a DDPMPipeline: the EMA weights when it trained with --use_ema
    step: int | None = None  # the pipeline's step (ddpmkit.json)
    checkpoint: Path | None = None  # the run's newest complete checkpoint: the raw weights
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    data_error: str | None = None  # why the data could not be read (the data check reports it)
    _cache: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ data
    def data(self) -> ImageData | None:
        """At most DOCTOR_MAX_IMAGES training images as training reads them (None: no config, or unreadable)."""
        if "data" not in self._cache:
            c, data = self.config, None
            if c is not None:
                first = min(c.max_images or DOCTOR_MAX_IMAGES, DOCTOR_MAX_IMAGES)
                try:
                    if c.image_size is None:  # a fine-tune's flags without --image_size: its model's size
                        from ddpmkit.models import load_pipeline
                        from ddpmkit.train_parts import own_size

                        c.image_size = own_size(self._pretrained(load_pipeline))
                    data = load_image_data(c.dataset, c.image_size, c.channels, c.image_column, c.class_column,
                                           c.split, None, first, c.cache_max_gb)
                except UserError as err:
                    self.data_error = str(err)
            self._cache["data"] = data
        return self._cache["data"]

    def batch(self, flips: bool = True) -> torch.Tensor | None:
        """The first training batch exactly as `ShuffledBatches` makes it (float, flipped, scaled), on the CPU;
        `flips=False`: the same images unflipped (images the model saw whether or not the run flipped them)."""
        key = ("batch", flips)
        if key not in self._cache:
            data, c = self.data(), self.config
            self._cache[key] = None if data is None else next(iter(ShuffledBatches(
                data, c.batch_size, c.seed or 0, c.random_flip and flips)))["images"]
        return self._cache[key]

    # ------------------------------------------------------------------ models
    def noise_scheduler(self):
        """The scheduler the model trains with: the pipeline's, else the one a new run makes from the config."""
        if self.pipeline is not None:
            return self.pipeline.scheduler
        from ddpmkit.models import load_pipeline, new_noise_scheduler

        c = self.config
        if c.init_from:
            return self._pretrained(load_pipeline).scheduler
        return new_noise_scheduler(c.beta_schedule, c.num_train_timesteps, c.prediction_type or "epsilon")

    def fresh_unet(self):
        """The UNet a training starts from: a new one as the run builds it (seeded), or the pretrained weights of a
        fine-tune; for a pipeline without a config, a new UNet of its architecture."""
        from diffusers import UNet2DModel

        from ddpmkit.models import build_unet, load_pipeline

        c = self.config
        torch.manual_seed(c.seed or 0 if c is not None else 0)
        if c is not None and c.init_from:
            return copy.deepcopy(self.pipeline.unet) if self.pipeline is not None else \
                copy.deepcopy(self._pretrained(load_pipeline).unet)
        if self.pipeline is not None:
            return UNet2DModel.from_config(self.pipeline.unet.config)
        data = self.data()
        classes = len(data.class_names) if c.class_column and data is not None and data.class_names else None
        return build_unet(c.preset, c.image_size, c.channels, c.unet_config,
                          num_class_embeds=classes + 1 if classes else None)

    def _pretrained(self, load_pipeline):
        if "pretrained" not in self._cache:
            self._cache["pretrained"] = load_pipeline(self.config.init_from)
        return self._cache["pretrained"]

    def raw_pipeline(self):
        """The pipeline with the raw weights of the newest checkpoint (None: no checkpoint, or no weights in it)."""
        if "raw" not in self._cache:
            raw = None
            state = runs.read_checkpoint_weights(self.checkpoint) if self.checkpoint is not None else None
            if state is not None and self.pipeline is not None:
                raw = copy.copy(self.pipeline)
                raw.unet = copy.deepcopy(self.pipeline.unet)
                raw.unet.load_state_dict(state)
            self._cache["raw"] = raw
        return self._cache["raw"]

    @property
    def checkpoint_step(self) -> int | None:
        return runs.read_checkpoint_marker(self.checkpoint).get("global_step") if self.checkpoint else None

    # ------------------------------------------------------------------ samples
    def samples(self, scheduler: str, steps: int | None, num_images: int, raw: bool = False) -> torch.Tensor:
        """`num_images` samples (float in [-1, 1]) with seed 0, in fp32, cached by (scheduler, steps, count, weights)."""
        from ddpmkit.sampling import sample

        key = ("samples", scheduler, steps, num_images, raw)
        if key not in self._cache:
            pipe = self.raw_pipeline() if raw else self.pipeline
            out = sample(pipe, scheduler=scheduler, steps=steps, num_images=num_images, seed=0, progress=False,
                         device=self.device, dtype="fp32", batch_size=num_images, channels_last=False)
            self._cache[key] = out.images
        return self._cache[key]


# ---------------------------------------------------------------------- opening what was given
def open_subject(target=None, overrides: dict | None = None, device: str | None = None) -> Subject:
    """A run folder, a pipeline (folder, bundled name, Hub id or object) or, with no target, the train flags
    (`overrides`, as `ddpmkit train` takes them). With a target, `overrides` go over its saved training config."""
    overrides = dict(overrides or {})
    if target is None:
        config = make_config(TrainConfig, overrides).validate()
        return Subject("config", "the train flags", config, device=resolve_device(device or config.device))
    if hasattr(target, "unet") and hasattr(target, "scheduler"):
        config = config_from_saved({}, overrides) if "dataset" in overrides else None
        return Subject("pipeline", "the pipeline", config, pipeline=target, device=resolve_device(device))
    return _open_folder(str(target), overrides, device)


def _open_folder(target: str, overrides: dict, device: str | None) -> Subject:
    from ddpmkit.models import load_pipeline, model_meta, model_path

    path = Path(model_path(target)).expanduser()
    run_dir, pipe_dir = _run_and_pipeline(path, target)
    has_pipeline = pipe_dir is not None or not path.exists()  # a folder, a bundled name or a Hub id
    source = str(pipe_dir) if pipe_dir is not None else target
    meta = model_meta(source) if has_pipeline else {}
    saved = ((runs.read_train_config(run_dir) if run_dir is not None else {})
             or (runs.read_train_config(pipe_dir) if pipe_dir is not None else {}) or meta.get("train_config") or {})
    saved_device = saved.get("device") if saved.get("device") != "auto" else None
    resolved = resolve_device(device or overrides.get("device") or saved_device)
    pipeline = load_pipeline(source, device=resolved) if has_pipeline else None
    config = None
    if saved:
        config = config_from_saved(saved, overrides)
    elif "dataset" in overrides and pipeline is not None:  # a plain pipeline, and the data it was trained on
        unet = pipeline.unet.config
        size = unet.sample_size if isinstance(unet.sample_size, int) else unet.sample_size[0]
        config = config_from_saved({"image_size": size, "channels": unet.in_channels}, overrides)
    checkpoints = runs.complete_checkpoints(runs.checkpoints_dir(run_dir)) if run_dir is not None else []
    return Subject("run" if run_dir is not None else "pipeline", target, config, saved, pipeline, meta.get("step"),
                   checkpoints[-1] if checkpoints else None, resolved)


def _is_run(folder: Path) -> bool:
    """A run folder (--output_dir): its loss log or its checkpoints are there (every pipeline folder has its own
    train_config.json, so that alone does not make a run)."""
    return bool(runs.read_train_config(folder)) and (runs.loss_log_path(folder).is_file()
                                                      or runs.checkpoints_dir(folder).is_dir())


def _run_and_pipeline(path: Path, target: str) -> tuple[Path | None, Path | None]:
    """(the run folder, the pipeline folder) a path names: a run folder (its pipeline in it, in its
    --model_save_name folder, or not saved yet), or a pipeline folder (a run's when it is in one)."""
    if not path.exists():
        return None, None  # a bundled name or a Hub id
    if not path.is_dir():
        raise UserError(f"{target} is a file: give a run folder (--output_dir of a training) or a pipeline folder")
    if (path / "model_index.json").is_file():
        run = next((folder for folder in (path, path.parent) if _is_run(folder)), None)
        return run, path
    if not _is_run(path):
        raise UserError(f"{target} is neither a run folder (no {runs.CONFIG_FILE} and {runs.LOSS_LOG}) nor a "
                        "pipeline folder (no model_index.json): give the --output_dir of a training, or a pipeline")
    name = runs.read_train_config(path).get("model_save_name")
    inner = path / name if name else None
    if inner is not None and (inner / "model_index.json").is_file():
        return path, inner
    saved = runs.step_pipelines(path)  # still training, or stopped: the checks that sample take its newest pipeline
    if saved:
        logger.info("doctor: %s has no final pipeline yet: the checks that sample use its last saved one, %s",
                    target, saved[-1])
    return path, saved[-1] if saved else None
