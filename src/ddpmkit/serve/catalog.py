"""What the web app offers: its models (the picker), what it knows of each, and whether CLIP guidance is on.

The picker holds the bundled models, the pipeline folders under --models_dir (both from `models.list_models`)
and the --model given. Each entry's classes and image size come from `models.describe_model`, which reads the
config files: no weights are loaded to fill the picker (a job loads the pipeline it needs).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ddpmkit.config import DEFAULT_MODEL
from ddpmkit.errors import UserError


@dataclass(frozen=True)
class ModelInfo:
    """One entry of the model picker: what `--model` takes, and what the page shows of it."""

    value: str  # the `--model` argument: a bundled name, an absolute folder, or a Hub id
    label: str
    classes: tuple[str, ...] = ()  # class names (or indices) of a class-conditioned model
    image_size: int | None = None


def model_info(row: dict, value: str, label: str) -> ModelInfo:
    """The picker entry of a `models.describe_model` row: each class by its saved name, else by its index."""
    num_classes = row["num_classes"]
    names = [str(name) for name in (row["class_names"] or [])][:num_classes]
    classes = tuple(names + [str(i) for i in range(len(names), num_classes)])
    size = row["image_size"]
    return ModelInfo(value, label, classes, size[0] if isinstance(size, list) else size)


def find_models(model: str | None = None, models_dir: str | os.PathLike | None = None,
                load: Callable[[str], object] | None = None) -> tuple[dict[str, ModelInfo], str]:
    """The model picker ({value: ModelInfo}: the bundled models, the pipeline folders under models_dir, and
    `model`) and the model shown first: `model`, else the bundled DEFAULT_MODEL, else the first one found.

    `model` is checked as `models.load_pipeline` checks it (`describe_given`); `load(value)` loads a pipeline,
    called only for a `model` that is not a pipeline folder here (a Hub id not yet in the local cache).
    """
    from ddpmkit.models import bundled_models, list_models

    root = Path(models_dir).expanduser() if models_dir is not None else None
    infos: dict[str, ModelInfo] = {}
    for row in list_models(models_dir, hub_cache=False):
        if row["kind"] == "bundled":
            infos[row["name"]] = model_info(row, row["name"], f"{row['name']} (bundled)")
        else:
            folder = Path(row["path"])
            infos[str(folder.resolve())] = model_info(row, str(folder.resolve()), _shown(folder, root))
    if model is not None:
        path = Path(str(model)).expanduser()
        value = str(path.resolve()) if path.exists() and str(model) not in bundled_models() else str(model)
        row = describe_given(value, load)  # checked now, so that a model that cannot be used fails in one line
        if value in infos:
            infos[value] = model_info(row, value, infos[value].label)
        else:
            infos = {value: model_info(row, value, path.name if path.is_dir() else str(model)), **infos}
        return infos, value
    if DEFAULT_MODEL in bundled_models():
        return infos, DEFAULT_MODEL
    if infos:
        return infos, next(iter(infos))
    where = f" and --models_dir {models_dir} has no pipeline folders" if models_dir is not None else ""
    raise UserError(f"the bundled model {DEFAULT_MODEL} is not installed in this copy of ddpmkit{where}: give "
                    "--model FOLDER (a pipeline made by 'ddpmkit train') or --models_dir DIR (a folder of them)")


def _shown(folder: Path, root: Path | None) -> str:
    """A folder under --models_dir as the picker names it: relative to --models_dir."""
    if root is None or folder == root:
        return folder.name
    try:
        return str(folder.relative_to(root))
    except ValueError:
        return str(folder)


def describe_given(value: str, load: Callable[[str], object] | None = None) -> dict:
    """The `models.describe_model` row of the --model given, checked as `models.load_pipeline` checks it: a
    local pipeline folder is read as data; anything else (a Hub id not in the local cache, a path that is not a
    pipeline) goes through `load` once, which downloads a Hub id or says in one line what is wrong."""
    from ddpmkit.models import check_pipeline_folder, describe_model, load_pipeline, model_path

    path = Path(model_path(value)).expanduser()
    if (path / "unet").is_dir() and (path / "scheduler").is_dir():
        check_pipeline_folder(path, value)  # a pipeline class ddpmkit supports, configs of the right types
        return describe_model(path, value)
    folder = _hub_snapshot(value)
    if folder is None:
        (load or load_pipeline)(value)
        folder = _hub_snapshot(value)
    if folder is None:  # loaded, yet not in the Hub cache: nothing to read its configs from
        raise UserError(f"{value} loaded, but its configs are not in the Hugging Face cache: give --model a "
                        "local pipeline folder (save it with DDPMPipeline.save_pretrained)")
    return describe_model(folder, value, "hub cache")


def _hub_snapshot(repo_id: str) -> Path | None:
    """The folder of `repo_id` in the local Hugging Face cache when its UNet config is there, else None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "unet/config.json")
    except Exception:  # not a repo id, or an unreadable cache: not there
        return None
    return Path(found).parent.parent if isinstance(found, str) else None


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
