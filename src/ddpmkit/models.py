"""UNet presets, building a UNet2DModel for a run, and loading pipelines (Hub id or folder) safely.

Loading never instantiates the class named in `model_index.json` and never runs code from a model
folder: the UNet and the scheduler config are read explicitly and wrapped in a `DDPMPipeline`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import warnings
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from ddpmkit import hub, runs
from ddpmkit.config import DEFAULT_MODEL
from ddpmkit.data import slug
from ddpmkit.errors import UserError, first_line

logger = logging.getLogger(__name__)
# diffusers 0.42 passes huggingface_hub an argument it deprecated; the warning is for diffusers, not for our users
warnings.filterwarnings("ignore", message=r"The `local_dir_use_symlinks` argument is deprecated", category=UserWarning)

# Block layouts. Every preset halves the resolution len(block_out_channels) - 1 times.
PRESETS: dict[str, dict] = {
    # The course's Unit 1 model, exactly (about 18M parameters).
    "course32": dict(
        layers_per_block=2,
        block_out_channels=(64, 128, 128, 256),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    ),
    # A mid-sized model: course32's layout with half the width.
    "small": dict(
        layers_per_block=2,
        block_out_channels=(32, 64, 64, 128),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=16,
    ),
    # CPU-sized (about 3.2M parameters, 55-64 img/s of training at 32x32 batch 64 on 2 cores): attention only at the
    # lowest resolution, where it is cheap; learns emoji shapes in a few minutes.
    "tiny": dict(
        layers_per_block=1,
        block_out_channels=(32, 64, 64, 128),
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=16,
    ),
    # For tests: a few thousand parameters, milliseconds per call.
    "micro": dict(
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
    ),
}


def downsampling_factor(config: dict) -> int:
    return 2 ** (len(config.get("block_out_channels", (224, 448, 672, 896))) - 1)


def check_unet_config(config: dict, image_size: int, where: str = "the UNet config") -> None:
    """What can be checked of a UNet2DModel config before building it: the value types, and that image_size fits."""
    _check_types(config, UNet2DModel, where)
    check_image_size(config, image_size)


def check_image_size(config: dict, image_size: int) -> None:
    factor = downsampling_factor(config)
    if image_size % factor:
        raise UserError(f"--image_size {image_size} does not fit this UNet: it halves the size "
                        f"{factor.bit_length() - 1} times, so use a multiple of {factor}")


def unet_config_for(preset: str = "tiny", unet_config: str | dict | None = None) -> dict:
    """The UNet2DModel keyword arguments of a preset, or of a config given as a dict or a JSON file."""
    if unet_config is None:
        if preset not in PRESETS:
            raise UserError(f"unknown --preset {preset!r}: use one of {', '.join(PRESETS)} or --unet_config file.json")
        return dict(PRESETS[preset])
    if isinstance(unet_config, dict):
        config = dict(unet_config)
    else:
        try:
            config = json.loads(Path(unet_config).read_text())
        except FileNotFoundError:
            raise UserError(f"--unet_config {unet_config} does not exist") from None
        except json.JSONDecodeError as err:
            raise UserError(f"--unet_config {unet_config} is not valid JSON ({err})") from None
    return {k: v for k, v in config.items() if not k.startswith("_")}


def build_unet(preset: str = "tiny", image_size: int = 32, channels: int = 3, unet_config: str | dict | None = None,
               num_class_embeds: int | None = None) -> UNet2DModel:
    """A new UNet2DModel from a preset or a config (file or dict); sample_size follows image_size."""
    config = unet_config_for(preset, unet_config)
    config.update(sample_size=image_size, in_channels=channels, out_channels=channels)
    if num_class_embeds is not None:
        config["num_class_embeds"] = num_class_embeds
    check_image_size(config, image_size)
    _check_types(config, UNet2DModel, "the UNet config" if unet_config is None or isinstance(unet_config, dict)
                 else f"--unet_config {unet_config}")
    try:
        return UNet2DModel(**config)
    except (TypeError, ValueError) as err:
        raise UserError(f"invalid UNet2DModel config: {err}") from None


def new_noise_scheduler(beta_schedule: str = "squaredcos_cap_v2", num_train_timesteps: int = 1000,
                        prediction_type: str = "epsilon") -> DDPMScheduler:
    """The training scheduler of a new model: the course's DDPMScheduler."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                         prediction_type=prediction_type)


SUPPORTED_PIPELINES = ("DDPMPipeline", "DDIMPipeline", "PNDMPipeline")  # a UNet2DModel and a beta-schedule scheduler


def _read_config(path: Path, name: str) -> dict:
    """A JSON object from a model folder, read as data (no class it names is imported)."""
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{name} has no {path.name} in {path.parent.name}/: save the model with "
                        "DDPMPipeline.save_pretrained") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}): the model folder is damaged") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} must hold a JSON object, not {type(config).__name__}: the model folder is damaged")
    return config


def _check_types(config: dict, cls, path: Path | str) -> None:
    """Each value of a config has the type of the class's default for it (a wrong type fails here, in one line)."""
    import inspect

    for key, param in inspect.signature(cls.__init__).parameters.items():
        if key not in config or config[key] is None or param.default in (None, inspect.Parameter.empty):
            continue
        value, default = config[key], param.default
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(default, (tuple, list)):
            ok = isinstance(value, (tuple, list))
        elif isinstance(default, str):
            ok = isinstance(value, str)
        else:
            continue
        if not ok:
            raise UserError(f"{path}: {key} is {value!r} ({type(value).__name__}), but {cls.__name__} needs "
                            f"{type(default).__name__} like {default!r}: fix the file or save the model again")


def check_pipeline_folder(path: Path, name: str) -> None:
    """A local pipeline folder, checked as data before anything is built from it: a supported pipeline class,
    a UNet2DModel, configs whose values have the right types."""
    index = path / "model_index.json"
    if not index.exists():
        raise UserError(f"{name} has no model_index.json: it is incomplete (its save was interrupted?); save it "
                        "again with DDPMPipeline.save_pretrained, or resume the run that was writing it")
    index = _read_config(index, name)
    pipeline = index.get("_class_name")
    if pipeline not in SUPPORTED_PIPELINES:
        raise UserError(f"{name} holds a {pipeline!r} pipeline: ddpmkit supports unconditional pixel-space pipelines "
                        f"({', '.join(SUPPORTED_PIPELINES)}: a UNet2DModel and a scheduler)")
    unet = _read_config(path / "unet" / "config.json", name)
    if unet.get("_class_name", "UNet2DModel") != "UNet2DModel" or index.get("unet", ["diffusers", "UNet2DModel"]) != [
            "diffusers", "UNet2DModel"]:
        raise UserError(f"{name}: its unet is a {unet.get('_class_name')!r}, not a UNet2DModel: ddpmkit supports "
                        f"unconditional pixel-space pipelines ({', '.join(SUPPORTED_PIPELINES)})")
    _check_types(unet, UNet2DModel, path / "unet" / "config.json")
    size = unet.get("sample_size")
    if size is not None and not (isinstance(size, int) and not isinstance(size, bool) and size > 0 or isinstance(
            size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise UserError(f"{path / 'unet' / 'config.json'}: sample_size is {size!r}: it must be a positive int (or "
                        "[height, width]): fix the file or save the model again")
    _check_types(_read_config(path / "scheduler" / "scheduler_config.json", name), DDPMScheduler,
                 path / "scheduler" / "scheduler_config.json")


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name and not re.fullmatch(r"[\w.-]+/[\w.-]+", name)


# Pretrained pipelines shipped inside the package (src/ddpmkit/pretrained/NAME/, a DDPMPipeline folder each).
BUNDLED_DIR = Path(__file__).resolve().parent / "pretrained"


def bundled_models() -> dict[str, Path]:
    """Name -> folder of every pipeline shipped inside the package."""
    if not BUNDLED_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(BUNDLED_DIR.iterdir()) if (p / "model_index.json").is_file()}


def model_path(model: str | os.PathLike) -> str:
    """Where a --model value points: a bundled model's folder for its name (unless a local folder of that
    name exists), else the value itself (a folder or a Hub id)."""
    name = str(model)
    bundled = bundled_models()
    if name in bundled and not Path(name).expanduser().exists():
        return str(bundled[name])
    return name


def resolve_pipeline(model):
    """A pipeline from a Hub id / folder, or a pipeline-like object with `.unet` and `.scheduler`."""
    if isinstance(model, (str,)) or hasattr(model, "__fspath__"):
        return load_pipeline(model)
    if not (hasattr(model, "unet") and hasattr(model, "scheduler")):
        raise UserError("model must be a Hub id, a pipeline folder, or a pipeline with .unet and .scheduler")
    return model


def pipeline_name(pipe) -> str | None:
    """Where a pipeline was loaded from (the name `load_pipeline` was given), None for one built in memory."""
    return getattr(getattr(pipe, "config", None), "_name_or_path", None)


def load_pipeline(model: str | os.PathLike = DEFAULT_MODEL, device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None) -> DDPMPipeline:
    """Load a DDPM-style pipeline (UNet2DModel + scheduler): a bundled model by name ('emoji32', the
    default), a local folder, or a Hub id.

    Works for folders written by `DDPMPipeline.save_pretrained` (safetensors or .bin weights),
    by ddpmkit, and for Hub repos such as `google/ddpm-cifar10-32`.
    """
    name = model_path(model)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"--model {name} is a file: point it at a pipeline folder (with model_index.json)")
        if not (path / "unet").is_dir() or not (path / "scheduler").is_dir():
            if run_hint := runs.unfinished_run_hint(path):
                raise UserError(f"{name} is a run without its final pipeline yet: {run_hint}")
            hint = " (it looks like a training checkpoint: use the run folder)" if (path / "optimizer.bin").exists() \
                else ""
            raise UserError(f"{name} is not a diffusion pipeline folder: it needs unet/ and scheduler/ sub-folders"
                            f"{hint}; train one with 'ddpmkit train' or save one with DDPMPipeline.save_pretrained")
        check_pipeline_folder(path, name)
        source, local = str(path), True
    elif _looks_like_path(name):
        raise UserError(f"model folder {name} does not exist: check the path")
    elif Path(owner := name.split("/")[0]).is_dir():  # runs/mine: a folder here, not Hub user runs (40 s of retries)
        raise UserError(f"model folder {name} does not exist: check the path (the folder {owner}/ is here, so it is "
                        "not read as a Hub id)")
    else:
        source, local = name, False
    try:
        with contextlib.nullcontext() if local else hub.offline_if_unreachable() as unreachable:
            unet = UNet2DModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype)
            scheduler_config = DDPMScheduler.load_config(source, subfolder="scheduler")
            scheduler = DDPMScheduler.from_config(scheduler_config)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, NotImplementedError, RuntimeError) as err:
        first = first_line(err)
        if local:
            raise UserError(f"could not load the pipeline in {name}: {first[:200]}") from None
        if unreachable:
            raise UserError(f"{name!r} is not in the Hugging Face cache and the Hub cannot be reached ({unreachable}):"
                            " connect to the network and run again, or use a local folder (a saved pipeline)") from None
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            raise UserError(f"{name!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: download it once "
                            "with network access, or use a local folder (a saved pipeline)") from None
        raise UserError(f"could not download {name!r} from the Hub ({first[:120]}): use a local folder (a saved pipeline), "
                        "or set HF_HUB_OFFLINE=1 to use a copy already in the Hugging Face cache") from None
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.register_to_config(_name_or_path=name)
    if device is not None:
        pipe.to(device)
    return pipe



# --------------------------------------------------------------------------- a model's metadata (ddpmkit.json)
def model_meta(model: str | os.PathLike) -> dict:
    """The ddpmkit.json saved beside a model (a bundled name, a folder, or a Hub id already in the local cache):
    class names, null class, dataset, step, the run's config; {} when it has none."""
    folder = Path(model_path(model)).expanduser()
    if not (folder / runs.META_FILE).is_file():
        try:
            from huggingface_hub import hf_hub_download

            folder = Path(hf_hub_download(str(model), runs.META_FILE, local_files_only=True)).parent
        except Exception:  # not a Hub id in the cache, or no ddpmkit.json there: nothing saved
            return {}
    return runs.read_meta(folder)


def class_names(model) -> list[str] | None:
    """The class names saved beside a ddpmkit model (ddpmkit.json), or None."""
    return model_meta(model).get("class_names")


def default_guidance(model) -> dict:
    """The guidance a model samples with when none is asked for: ddpmkit.json's "default_guidance" ({"autoguide",
    "autoguide_scale", "guidance_interval", and "why": what it was measured to buy}), {} without one."""
    try:
        found = model_meta(model).get("default_guidance")
    except UserError:  # a damaged ddpmkit.json: no default (loading the model says what is wrong)
        return {}
    return dict(found) if isinstance(found, dict) and found.get("autoguide") else {}


def trained_on(model) -> str | None:
    """The dataset a ddpmkit model was trained on (ddpmkit.json), or None (unknown, or a damaged file)."""
    try:
        dataset = model_meta(model).get("dataset")
    except UserError:
        return None
    return dataset if isinstance(dataset, str) else None


def resolve_class_label(label: int | str, names: list[str] | None, num_classes: int) -> int:
    """A class index or a class name (any case; 'ankle-boot' finds 'Ankle boot') -> the index."""
    text = str(label).strip()
    if re.fullmatch(r"\d+", text):
        index = int(text)
    else:
        matches = [i for i, n in enumerate(names or []) if slug(n) == slug(text)]
        if not matches:
            known = f"one of {', '.join(names)}" if names else f"a number 0..{num_classes - 1} (no class names saved)"
            raise UserError(f"unknown --class_label {label!r}: use {known}")
        index = matches[0]
    if not 0 <= index < num_classes:
        raise UserError(f"--class_label {index} is out of range: this model has classes 0..{num_classes - 1}")
    return index


def sampling_labels(model, num_class_embeds: int | None, class_label: int | str | None = None,
                    cfg_scale: float = 1.0, per_class: int | None = None) -> tuple[list[str], list[int] | None]:
    """(row names, class labels) to sample a model with: one label for `class_label` (a name or an index; 'none':
    the null class, unconditional), else a row of `per_class` images (8) per class of a class-conditioned model."""
    num_classes = (num_class_embeds or 1) - 1  # the last class embedding is the null class
    if num_classes < 1:
        if class_label is not None:
            raise UserError("--class_label given, but this model is not class-conditioned (train one with "
                            "'ddpmkit train --class_column label')")
        if cfg_scale != 1.0:
            raise UserError("--cfg_scale needs a class-conditioned model (train one with --class_column label)")
        return [], None
    names = class_names(model)
    if class_label is not None and str(class_label).strip().lower() in ("none", "null"):
        return [], None  # the null class: unconditional samples
    if class_label is not None:
        return [], [resolve_class_label(class_label, names, num_classes)]
    rows = list(names or [])[:num_classes] + [str(i) for i in range(len(names or []), num_classes)]
    return rows, [k for k in range(num_classes) for _ in range(per_class or 8)]


def describe_model(path: str | os.PathLike, name: str | None = None, kind: str = "local") -> dict:
    """What `ddpmkit models` and the web app show of one pipeline folder, read from its config files (no weights
    are loaded). `num_classes` counts the classes of a class-conditioned UNet without its null (CFG) class."""
    path = Path(path)
    unet = _read_config(path / "unet" / "config.json", str(path))
    meta = runs.read_meta(path)
    weights = [p for p in (path / "unet").iterdir() if p.suffix in (".safetensors", ".bin")]
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    scheduler = _read_config(scheduler_file, str(path)) if scheduler_file.is_file() else {}
    return {"name": name or str(path), "kind": kind, "path": str(path),
            "size_mb": round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 1),
            "weights": [p.name for p in weights],
            "image_size": unet.get("sample_size"), "channels": unet.get("in_channels"),
            "prediction_type": scheduler.get("prediction_type", "epsilon"),
            "class_names": meta.get("class_names") if unet.get("num_class_embeds") else None,
            "num_classes": _num_classes(unet.get("num_class_embeds")),
            "dataset": meta.get("dataset")}


def _num_classes(num_class_embeds) -> int:
    """The classes of a UNet config's class embedding, without its last one, the null (CFG) class."""
    valid = isinstance(num_class_embeds, int) and not isinstance(num_class_embeds, bool)
    return num_class_embeds - 1 if valid and num_class_embeds > 1 else 0


def local_models(models_dir: str | os.PathLike = ".", max_depth: int = 3) -> list[Path]:
    """Pipeline folders (model_index.json with unet/ and scheduler/) under models_dir, at most max_depth deep;
    hidden folders, virtual environments and training checkpoints are skipped."""
    root = Path(models_dir).expanduser()
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        if (folder / "model_index.json").is_file() and (folder / "unet").is_dir():
            found.append(folder)
        if depth >= max_depth:
            return
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir())
        except OSError:
            return
        for child in children:
            if child.name.startswith((".", "_")) or child.name in ("checkpoints", "node_modules", "site-packages", "venv"):
                continue
            walk(child, depth + 1)

    if root.is_dir():
        walk(root, 0)
    return found


def hub_cached_models() -> list[tuple[str, Path]]:
    """Hub pipelines already in the local Hugging Face cache (repo id, snapshot folder), newest snapshot each."""
    try:
        from huggingface_hub import scan_cache_dir

        repos = scan_cache_dir().repos
    except Exception:  # no cache yet, or an unreadable one: nothing to list
        return []
    out = []
    for repo in sorted(repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for revision in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            if (revision.snapshot_path / "model_index.json").is_file() and (revision.snapshot_path / "unet").is_dir():
                out.append((repo.repo_id, revision.snapshot_path))
                break
    return out


def list_models(models_dir: str | os.PathLike | None = ".", hub_cache: bool = True) -> list[dict]:
    """Every model `--model` can name here: the bundled ones, pipeline folders under models_dir, and (with
    `hub_cache`) the Hub pipelines in the local cache; each a `describe_model` row."""
    if models_dir is not None and not Path(models_dir).expanduser().is_dir():
        raise UserError(f"--models_dir {models_dir} is not a folder: give the folder your runs are in")
    rows = [describe_model(p, name, "bundled") for name, p in bundled_models().items()]
    if models_dir is not None:
        bundled = {p.resolve() for p in bundled_models().values()}
        for folder in local_models(models_dir):
            if folder.resolve() not in bundled:
                try:
                    rows.append(describe_model(folder))
                except (OSError, UserError) as err:
                    logger.warning("skipped %s: %s", folder, err)
    for repo_id, folder in hub_cached_models() if hub_cache else []:
        try:
            rows.append(describe_model(folder, repo_id, "hub cache"))
        except (OSError, UserError):
            continue
    return rows
