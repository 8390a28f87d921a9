"""The Hub side of a saved pipeline: its README.md model card, uploading the folder, and whether the Hub is there.

`write_model_card` runs for every pipeline ddpmkit saves (final and step_N); `card_metadata`, `card_text` and
`save_card` are its pieces, for a card with other text (scripts/bundle_emoji32.py); `push_to_hub` creates
the repo and uploads the folder without training state. Neither touches the weights. `offline_if_unreachable` makes
a Hub id load from the caches at once when the Hub's host does not resolve (no network), instead of 30 s of retries.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import os
import re
import shlex
import socket
import urllib.parse
from pathlib import Path
from typing import Any

from ddpmkit import runs
from ddpmkit.config import FINETUNE_DEFAULTS, SCRATCH_IMAGE_SIZE, TrainConfig
from ddpmkit.errors import UserError, first_line

logger = logging.getLogger(__name__)

TAGS = ["diffusers", "unconditional-image-generation", "ddpmkit", "diffusion-models-class"]
LICENSE = "apache-2.0"  # the license of google/ddpm-* and of diffusers itself
# Not uploaded: training state, tracker files and intermediate pipelines (as diffusers' train_unconditional.py).
IGNORE_PATTERNS = ["checkpoints/*", "logs/*", "wandb/*", "phema/*", "best/*", "step_*", "step_*/*", ".tmp*", "*/.tmp*",
                   ".old_*", ".del_*"]  # the run folder's working files stay local: only the pipeline goes up
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
# Flags left out of the reconstructed command: they say how a run restarted, not how the model was made.
NOT_IN_COMMAND = ("resume_from_checkpoint", "cache_max_gb")
# Hyperparameters shown in the card's table, in this order.
TABLE_FIELDS = ("dataset", "split", "image_size", "channels", "batch_size", "grad_accumulation_steps", "lr",
                "lr_scheduler", "lr_warmup_steps", "num_epochs", "max_steps", "adam_weight_decay", "max_grad_norm",
                "use_ema", "ema_max_decay", "mixed_precision", "seed", "preset", "class_column", "cond_drop_prob")
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached from here, when that is known at once: its host name does not
    resolve (no network). None otherwise: reachable, offline mode already set, or a proxy that resolves names itself
    (the download then says what went wrong)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in PROXY_VARIABLES):
        return None
    host = urllib.parse.urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT
    try:
        socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        return f"{host} does not resolve: {err.strerror}"
    except OSError:  # anything else: let the download try
        return None
    return None


@contextlib.contextmanager
def offline_if_unreachable():
    """Yields why the Hub cannot be reached (None when it can). While it cannot, huggingface_hub, diffusers and
    datasets read their caches only, as with HF_HUB_OFFLINE=1: a cached model or dataset loads, a missing one fails
    at once (online, a missing network costs 30 s of retries and a flood of warnings first)."""
    why = hub_unreachable()
    if why is None:
        yield None
        return
    import huggingface_hub.constants as hub_constants

    patched = [(hub_constants, "HF_HUB_OFFLINE")]
    with contextlib.suppress(ImportError):  # datasets reads its own copy (diffusers goes through huggingface_hub's)
        import datasets.config

        patched += [(datasets.config, name) for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")]
    saved = [(module, name, getattr(module, name)) for module, name in patched]
    try:
        for module, name in patched:
            setattr(module, name, True)
        yield why
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _as_config(config: TrainConfig | dict) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return config
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in dict(config).items() if k in names})


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def is_hub_id(name: str | None) -> bool:
    """True for a Hub repo id (user/name) that is not a local path."""
    return bool(name) and HUB_ID.fullmatch(name) is not None and not Path(name).exists()


def training_command(config: TrainConfig | dict) -> str:
    """The `ddpmkit` command that reproduces this run: `finetune` when it started from a model, else `train`."""
    config = _as_config(config)
    finetune = bool(config.init_from)
    defaults = FINETUNE_DEFAULTS if finetune else {"image_size": SCRATCH_IMAGE_SIZE}  # a fine-tune's size: listed
    words = ["ddpmkit", "finetune" if finetune else "train"]
    for f in dataclasses.fields(TrainConfig):
        value = getattr(config, f.name)
        default = defaults.get(f.name, f.default)
        if f.name in NOT_IN_COMMAND or (value == default and not (finetune and f.name == "init_from")):
            continue
        aliases = f.metadata.get("aliases", ())
        flag = aliases[0] if finetune and f.name in ("init_from", "dataset") and aliases else f"--{f.name}"
        if isinstance(value, bool):
            words.append(flag if value else f"--no-{f.name}")
        elif value is not None:
            words += [flag, str(value)]
    return " ".join(shlex.quote(w) for w in words)


def _loss_summary(losses: list[dict] | None) -> str | None:
    """The final loss as the mean over the last steps (one step's MSE depends on its random t), and the first."""
    if not losses:
        return None
    n = min(50, max(1, len(losses) // 4))
    last = sum(r["loss"] for r in losses[-n:]) / n
    first = sum(r["loss"] for r in losses[:n]) / n
    return f"{last:.4f} (mean of the last {n} steps; the first {n} steps: {first:.4f})"


def model_card_text(folder: str | Path, config: TrainConfig | dict, sample_grid: str | None = None,
                    losses: list[dict] | None = None, repo_id: str | None = None, staged: str | Path | None = None) -> str:
    """The README.md of a pipeline folder: YAML metadata, the command, hyperparameters, samples, usage.

    `staged`: the folder's files are still in this staging folder (a save in progress); the card names `folder`.
    """
    folder = Path(folder)
    files = Path(staged) if staged is not None else folder
    config = _as_config(config)
    try:
        meta = runs.read_meta(files)
    except UserError:  # a damaged ddpmkit.json: the card goes without class names
        meta = {}
    scheduler = _read_json(files / "scheduler" / "scheduler_config.json")
    unet = _read_json(files / "unet" / "config.json")
    class_names = meta.get("class_names")
    data = card_metadata(bool(class_names), config.init_from, config.dataset)
    name = repo_id or config.hub_model_id or str(folder)
    title = name.split("/")[-1] if repo_id or config.hub_model_id else folder.name
    if folder.name.startswith("step_"):
        title = f"{folder.parent.name} ({folder.name.replace('_', ' ')})"
    if config.init_from:
        intro = f"`{config.init_from}` fine-tuned on `{config.dataset}`"
    else:
        intro = f"A diffusion model (DDPM, Ho et al. 2020) trained from scratch on `{config.dataset}`"
    lr = config.learning_rate()
    skip = {"preset"} if config.init_from else set()  # a fine-tune keeps the pretrained architecture
    skip |= set() if config.use_ema else {"ema_max_decay"}
    skip |= set() if config.class_column else {"cond_drop_prob"}
    skip |= set() if is_hub_id(config.dataset) else {"split"}
    rows = [(f, getattr(config, f)) for f in TABLE_FIELDS if getattr(config, f) is not None and f not in skip]
    rows = [(k, f"{lr:g}" if k == "lr" else v) for k, v in rows]
    if unet.get("sample_size"):
        rows.append(("sample_size", unet["sample_size"]))
    for key in ("beta_schedule", "num_train_timesteps", "prediction_type"):
        if key in scheduler:
            rows.append((key, scheduler[key]))
    final_loss = _loss_summary(losses)
    steps = losses[-1]["step"] if losses else meta.get("step")
    if steps is not None:
        rows.append(("steps trained", steps))
    table = "\n".join(["| hyperparameter | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
    lines = [f"# {title}", "", f"{intro}, with ddpmkit (a toolkit for Units 1 and 2 of the Hugging Face "
             "[diffusion models class](https://github.com/huggingface/diffusion-models-class)).", ""]
    if class_names:
        lines += [f"Class-conditioned on {len(class_names)} classes: {', '.join(map(str, class_names))}.", ""]
    lines += ["## Training command", "", "```bash", training_command(config), "```", "", "## Hyperparameters", "",
              table, ""]
    if final_loss:
        lines += [f"Final training loss (MSE): {final_loss}.", ""]
    if sample_grid:
        lines += ["## Samples", "", f"![samples]({sample_grid})", ""]
    lines += ["## Usage", "", "```python", "from diffusers import DDPMPipeline", "",
              f"pipe = DDPMPipeline.from_pretrained({json.dumps(name)})", "image = pipe().images[0]  # 1000 DDPM steps",
              "image.save('sample.png')", "```", "", "Faster, with any scheduler (DDIM in 40 steps):", "", "```bash",
              f"ddpmkit sample --model {shlex.quote(name)} --scheduler ddim --steps 40 --out samples.png", "```", ""]
    if class_names:
        lines += ["`DDPMPipeline.__call__` passes no class labels: sample this model with ddpmkit.", ""]
    return card_text(data, lines)


def card_metadata(class_conditional: bool = False, base_model: str | None = None, dataset: str | None = None,
                  extra_tags: tuple[str, ...] = ()):
    """The card's YAML metadata (huggingface_hub.ModelCardData): license, library, pipeline tag and tags; the base
    model and the dataset when they are Hub ids."""
    from huggingface_hub import ModelCardData

    return ModelCardData(
        license=LICENSE,
        library_name="diffusers",
        pipeline_tag="unconditional-image-generation",
        tags=TAGS + (["class-conditional"] if class_conditional else []) + list(extra_tags),
        base_model=base_model if base_model and is_hub_id(base_model) else None,
        datasets=[dataset] if dataset and is_hub_id(dataset) else None,
    )


def card_text(metadata, lines: list[str]) -> str:
    """A model card: the metadata as its YAML header, then the lines of markdown."""
    return f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(lines)


def save_card(folder: str | Path, text: str) -> Path:
    """Write `folder/README.md` with `huggingface_hub.ModelCard`."""
    from huggingface_hub import ModelCard

    path = Path(folder) / "README.md"
    ModelCard(text).save(path)
    return path


def write_model_card(folder: str | Path, config: TrainConfig | dict, sample_grid: str | None = None,
                     losses: list[dict] | None = None, staged: str | Path | None = None) -> Path:
    """Write `folder/README.md` with `huggingface_hub.ModelCard`; `sample_grid` is copied in when outside the folder.

    `staged`: write into this staging folder instead, which will become `folder` (the card names `folder`).
    """
    import shutil

    named, folder = Path(folder), Path(staged) if staged is not None else Path(folder)
    if sample_grid is not None:
        grid = Path(sample_grid)
        if grid.is_absolute() or not (folder / grid).exists():
            if not grid.exists():
                logger.warning("sample grid %s not found: the model card goes without it", sample_grid)
                sample_grid = None
            else:
                shutil.copy(grid, folder / grid.name)
                sample_grid = grid.name
    return save_card(folder, model_card_text(named, config, sample_grid, losses, staged=staged))


def _upload_errors() -> tuple[type[BaseException], ...]:
    """What a failed create_repo/upload raises: HfHubHTTPError and requests errors are OSErrors, a bad repo id
    a ValueError, and a network failure an httpx(2) error (huggingface_hub's HTTP client changed over versions)."""
    errors: list[Any] = [OSError, ValueError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload a pipeline folder to the Hub: `create_repo(exist_ok=True)` then `upload_folder`; returns the repo URL.

    Without a token or network, raises UserError and leaves the folder as it is.
    """
    from huggingface_hub import HfApi, constants, get_token

    folder = Path(folder)
    if not (folder / "model_index.json").exists():
        raise UserError(f"{folder} is not a pipeline folder (no model_index.json): nothing to push")
    if not repo_id or not HUB_ID.fullmatch(repo_id):
        raise UserError(f"--hub_model_id must look like user/name (got {repo_id!r})")
    kept = f"the pipeline is kept in {folder}; upload it later with: hf upload {repo_id} {folder}"
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"cannot push to the Hub while HF_HUB_OFFLINE is set; {kept}")
    if unreachable := hub_unreachable():
        raise UserError(f"cannot push to the Hub: it cannot be reached ({unreachable}); {kept}")
    token = token or get_token()
    if not token:
        raise UserError(f"no Hugging Face token to push with: run 'hf auth login' or set HF_TOKEN; {kept}")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=url.repo_id, folder_path=str(folder), repo_type="model",
                          ignore_patterns=IGNORE_PATTERNS, commit_message="Upload pipeline trained with ddpmkit")
    except _upload_errors() as err:
        first = first_line(err)
        raise UserError(f"could not push to {repo_id} ({first[:160]}); {kept}") from None
    logger.info("pushed %s to %s", folder, url)
    return str(url)
