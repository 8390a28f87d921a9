"""A run folder on disk, and the only code that opens its files by name.

    OUTPUT_DIR/
      model_index.json unet/ scheduler/   the pipeline (or in OUTPUT_DIR/MODEL_SAVE_NAME), and step_N/ snapshots
      ddpmkit.json                        beside each pipeline: class names, null class, dataset, step, config
      train_config.json                   the run's config (also beside each pipeline)
      loss.jsonl                          one line per optimizer step; a kill may cut the last one short
      train_state.json                    the final step, process count and per-process weight checksums
      checkpoints/step_0000100/           the full training state; complete once training_state.json is in it
      eval.jsonl                          --eval_every: one line per evaluation during training (FID, KID, cost)
      best/                               --keep_best: the pipeline with the lowest FID so far
      phema/step_0000100.safetensors      --posthoc_ema: the EMA profiles at that step (`ddpmkit.phema`)

Everything is written so that a kill or a full disk leaves the previous version intact: small files by an
atomic rename, checkpoints and pipelines in a staging folder (`.tmp_*`) moved into place when complete.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

from ddpmkit.errors import UserError, first_line

logger = logging.getLogger(__name__)

META_FILE = "ddpmkit.json"  # beside model_index.json: class names and how the model was trained
CONFIG_FILE = "train_config.json"
STATE_FILE = "train_state.json"
LOSS_LOG = "loss.jsonl"
EVAL_LOG = "eval.jsonl"  # --eval_every: one line per evaluation during training
BEST_PIPELINE = "best"  # --keep_best: the pipeline with the lowest FID so far
CHECKPOINTS = "checkpoints"
CHECKPOINT_MARKER = "training_state.json"  # written last: a checkpoint folder without it is incomplete
PROCESS_STATE = "ddpmkit_state_{}.pt"  # per process: the batch position and the generators
PHEMA_DIR = "phema"  # post-hoc EMA snapshots, one safetensors file per step


# ---------------------------------------------------------------------- ddpmkit.json, train_config.json, train_state
def read_meta(folder: str | os.PathLike) -> dict:
    """The ddpmkit.json of a pipeline folder ({} when it has none); a damaged one is a UserError."""
    return _read_json(Path(folder) / META_FILE, "the model folder is damaged")


def write_meta(folder: str | os.PathLike, meta: dict) -> Path:
    return write_atomic(Path(folder) / META_FILE, json.dumps(meta, indent=2) + "\n")


def read_train_config(folder: str | os.PathLike) -> dict:
    """The config a run (or a pipeline it saved) was trained with ({} when there is none)."""
    return _read_json(Path(folder) / CONFIG_FILE, "write it again with the run's command")


def write_train_config(folder: str | os.PathLike, config: dict) -> Path:
    return write_atomic(Path(folder) / CONFIG_FILE, json.dumps(config, indent=2) + "\n")


def read_train_state(folder: str | os.PathLike) -> dict:
    """How a finished run ended: global_step, num_processes, weights_checksum_per_process ({} before the end)."""
    return _read_json(Path(folder) / STATE_FILE, "train the run again")


def write_train_state(folder: str | os.PathLike, state: dict) -> Path:
    return write_atomic(Path(folder) / STATE_FILE, json.dumps(state, indent=2) + "\n")


def _read_json(path: Path, advice: str) -> dict:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path} ({err}): {advice}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} must hold a JSON object, not {type(value).__name__}: {advice}")
    return value


# ---------------------------------------------------------------------- loss.jsonl
def loss_log_path(folder: str | os.PathLike) -> Path:
    return Path(folder) / LOSS_LOG


def read_loss_log(path: str | os.PathLike) -> list[dict]:
    """The records of a run's loss.jsonl (`path`: the file or the run folder); a line cut short by a kill is left
    out with a warning, an absent log is []."""
    path = loss_log_path(path) if Path(path).is_dir() else Path(path)
    records = []
    if path.exists():
        for line in filter(str.strip, path.read_text().splitlines()):
            try:
                records.append(json.loads(line))
            except ValueError:
                logger.warning("ignoring a line of %s cut short (a killed run): %r", path, line[:80])
    return records


class LossLog:
    """A run's loss.jsonl: one line per optimizer step, appended as the losses are read from the device."""

    def __init__(self, folder: str | os.PathLike):
        self.path = loss_log_path(folder)

    def append(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        return read_loss_log(self.path)

    def finite(self) -> list[dict]:
        """The steps with a finite loss (a line cut short by a kill, or a skipped step, is left out)."""
        return [r for r in self.records() if isinstance(r.get("loss"), (int, float))]

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def keep_until(self, step: int) -> list[dict]:
        """Drop the steps logged after `step` (a resumed checkpoint's); returns the records kept."""
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        return kept


class EvalLog(LossLog):
    """A run's eval.jsonl (--eval_every): one line per evaluation during training, appended as it is made."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / EVAL_LOG

    def replace(self, records: list[dict]) -> None:
        """The log as `records` (a resumed checkpoint's history: the evaluations logged after it go)."""
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in records))


def read_eval_log(folder: str | os.PathLike) -> list[dict]:
    """The evaluations of a run (its eval.jsonl), oldest first; [] without one."""
    return EvalLog(folder).records()


def best_pipeline_dir(output_dir: str | os.PathLike) -> Path:
    """Where --keep_best keeps the pipeline with the lowest FID so far."""
    return Path(output_dir) / BEST_PIPELINE


# ---------------------------------------------------------------------- checkpoints
def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINTS


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    found = [p for p in root.glob("step_*") if (p / CHECKPOINT_MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]) if p.name.split("_")[1].isdigit() else -1)


def read_checkpoint_marker(checkpoint: Path) -> dict:
    """{"global_step": N, "num_processes": P} of a complete checkpoint."""
    return json.loads((checkpoint / CHECKPOINT_MARKER).read_text())


def read_checkpoint_weights(checkpoint: Path) -> dict | None:
    """The UNet's raw weights (not the EMA's) in a checkpoint, as accelerate's `save_state` wrote the first prepared
    model (model.safetensors, or pytorch_model.bin); None when there is neither. DDP's `module.` prefix is removed."""
    import torch
    from safetensors.torch import load_file

    if (checkpoint / "model.safetensors").is_file():
        state = load_file(str(checkpoint / "model.safetensors"))
    elif (checkpoint / "pytorch_model.bin").is_file():
        state = torch.load(checkpoint / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        return None
    return {k.removeprefix("module."): v for k, v in state.items()}


def process_state_file(checkpoint: Path, process_index: int) -> Path:
    return checkpoint / PROCESS_STATE.format(process_index)


def checkpoint_to_resume(output_dir: Path, which: str | None, pipeline_dir: Path, main_process: bool = True
                         ) -> Path | None:
    """The folder --resume_from_checkpoint names ('latest': the newest complete one), or None to start anew.
    `main_process`: the one that warns about the folders a kill left incomplete."""
    if not which:
        return None
    if which == "latest":
        root = checkpoints_dir(output_dir)
        complete = complete_checkpoints(root)
        if main_process:
            for partial in sorted(set(root.glob("*step_*")) - set(complete)):
                logger.warning("ignoring %s: an incomplete checkpoint (its save was interrupted)", partial)
            for partial in incomplete_pipelines(pipeline_dir):
                logger.warning("ignoring %s: an incomplete pipeline (its save was interrupted); it is saved "
                               "again when the run gets there", partial)
        if not complete:
            logger.info("no checkpoint in %s yet: starting a new run", root)
            return None
        return complete[-1]
    path = Path(which)
    if not (path / CHECKPOINT_MARKER).exists():
        if path.name.startswith(".tmp_step_") or (path / "model.safetensors").exists():
            raise UserError(f"{which} is an incomplete checkpoint (its save was interrupted): use 'latest' or "
                            "an earlier folder under OUTPUT_DIR/checkpoints")
        raise UserError(f"{which} is not a ddpmkit checkpoint folder (no {CHECKPOINT_MARKER}): use 'latest' "
                        "or a folder under OUTPUT_DIR/checkpoints")
    return path


def staging_checkpoint(final: Path) -> Path:
    """Where the checkpoint `final` is written before it is complete (left by a killed run: removed first)."""
    return final.with_name(f".tmp_{final.name}")


def commit_checkpoint(tmp: Path, final: Path, marker: dict) -> None:
    """Flush a fully written checkpoint, mark it complete (the marker last) and give it its final name."""
    fsync_tree(tmp)
    write_atomic(tmp / CHECKPOINT_MARKER, json.dumps(marker))
    remove(final)  # the same step saved before (a run resumed from an earlier checkpoint)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def prune_checkpoints(root: Path, newest: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints (the new one is complete by now)."""
    complete = [p for p in complete_checkpoints(root) if p != newest]
    for old in complete[:max(0, len(complete) - (keep - 1))]:
        remove(old)
    # left by killed runs: unfinished checkpoints (the new one has its final name by now) and unfinished deletions
    for leftover in [*root.glob(".tmp_step_*"), *root.glob(".del_*")]:
        remove(leftover)


# ---------------------------------------------------------------------- pipelines
def staging_pipeline(folder: Path) -> Path:
    """Where a pipeline for `folder` is written before it is complete (inside it when it is the run folder)."""
    return folder / ".tmp_pipeline" if folder.exists() else folder.parent / f".tmp_{folder.name}"


def save_staged(folder: Path, write) -> Path:
    """`write(staged)` a pipeline into a staging folder, then commit it to `folder`; on any error the staging folder
    goes and `folder` stays as it was."""
    staged = staging_pipeline(folder)
    try:
        remove(staged)
        write(staged)
        commit_pipeline(staged, folder)
    except Exception:
        remove(staged)
        raise
    return folder


def incomplete_pipelines(folder: Path) -> list[Path]:
    """Pipeline folders a kill left half-written: staging folders, and folders with unet/ but no model_index.json."""
    candidates = [folder, *folder.glob("step_*")] if folder.is_dir() else []
    found = [p for p in candidates if (p / "unet").is_dir() and not (p / "model_index.json").exists()]
    staging = [p for p in [*folder.glob(".tmp_*"), *folder.parent.glob(f".tmp_{folder.name}")] if p.is_dir()]
    return sorted(found + staging)


def commit_pipeline(staged: Path, folder: Path) -> None:
    """Move a complete staged pipeline into `folder`: a new folder by one rename; into an existing folder (the run
    folder, which also holds logs and checkpoints) entry by entry, model_index.json removed first and put back last,
    so that a kill in between leaves no loadable half (`load_pipeline` needs model_index.json)."""
    fsync_tree(staged)
    if not folder.exists():
        os.replace(staged, folder)
        fsync_dir(folder.parent)
        return
    index = folder / "model_index.json"
    index.unlink(missing_ok=True)
    old = folder / ".old_pipeline"
    remove(old)
    old.mkdir()
    for entry in sorted(staged.iterdir()):
        if entry.name == "model_index.json":
            continue
        target = folder / entry.name
        if target.exists():
            os.replace(target, old / entry.name)
        os.replace(entry, target)
    os.replace(staged / "model_index.json", index)
    fsync_dir(folder)
    remove(old)
    remove(staged)


# ---------------------------------------------------------------------- post-hoc EMA snapshots (phema/)
def phema_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / PHEMA_DIR


def phema_snapshots(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The complete post-hoc EMA snapshots of a run, [(step, file)] oldest first (a write a kill cut short has
    its temporary name, and is not listed)."""
    found = []
    for path in phema_dir(output_dir).glob("step_*.safetensors"):
        digits = path.name[len("step_"):-len(".safetensors")]
        if digits.isdigit():
            found.append((int(digits), path))
    return sorted(found)


def write_phema_snapshot(output_dir: str | os.PathLike, step: int, tensors: dict, metadata: dict[str, str]) -> Path:
    """One snapshot, whole or not at all: written under a temporary name, flushed, then renamed."""
    from safetensors.torch import save_file

    folder = phema_dir(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:07d}.safetensors"
    tmp = path.with_name(f".tmp_{path.name}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(folder)
    return path


def drop_phema_snapshots(output_dir: str | os.PathLike, after: int) -> None:
    """Remove the snapshots of steps after `after` (a resumed run writes them again; a new run in an old folder
    starts with none) and the temporary files of killed writes."""
    for step, path in phema_snapshots(output_dir):
        if step > after:
            path.unlink()
    for leftover in phema_dir(output_dir).glob(".tmp_*"):
        leftover.unlink()


def read_phema_metadata(path: Path) -> dict[str, str]:
    """The metadata of a snapshot (its step, profiles and the model's configs), without reading the tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for a damaged header
        raise UserError(f"cannot read the post-hoc EMA snapshot {path} ({err}): delete it and use the others") \
            from None


def read_phema_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def step_pipelines(run: Path) -> list[Path]:
    """The pipelines a run saved on the way (--save_model_every: step_N), oldest first."""
    return sorted((p for p in run.glob("step_*") if (p / "model_index.json").is_file() and
                   p.name.removeprefix("step_").isdigit()), key=lambda p: int(p.name.removeprefix("step_")))


def unfinished_run_hint(path: Path) -> str:
    """For a run folder whose final pipeline is not there yet (training, or stopped): what it does hold to sample
    ('' for any other folder)."""
    if not (path / CONFIG_FILE).is_file() and not checkpoints_dir(path).is_dir():
        return ""
    saved = step_pipelines(path)
    resume = "resume it to the end (--resume_from_checkpoint latest)"
    found = f"sample its last saved pipeline, {saved[-1]}" if saved else resume
    ema = f", or make a post-hoc EMA with 'ddpmkit ema {path} --sigma_rel 0.1 --out DIR'" \
        if phema_snapshots(path) else ""
    return found + ema


# ---------------------------------------------------------------------- files that are complete or absent
def check_writable(folder: Path, flag: str = "--output_dir", given: str | os.PathLike | None = None) -> None:
    """Create `folder` and write a file in it, or raise UserError saying what is wrong: checked before the work that
    writes there (training, sampling, an evaluation), so that a path that cannot be written loses nothing. `given` is
    what the user gave `flag` (a file inside `folder`, say), `folder` itself by default."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write to {flag} {folder if given is None else given} ({err.strerror or err}): choose "
                        "a folder you can write to") from None


def save_error_advice(error: Exception) -> tuple[str, str]:
    """(what went wrong, what to do) for a failed save: only a full disk or quota asks for disk space."""
    if not isinstance(error, OSError) or error.errno is None:
        reason = first_line(error)[:200]
        if "no space" in reason.lower() or "quota" in reason.lower():  # safetensors/torch wrap the OSError's text
            return reason, "free some disk space"
        return reason, "fix the cause"
    where = f": {error.filename}" if error.filename else ""
    reason = f"{error.strerror or os.strerror(error.errno)}{where}"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return reason, "free some disk space"
    if error.errno == errno.EFBIG:
        return reason, "raise the file size limit (ulimit -f) or free some disk space"
    if error.errno == errno.ENOENT:
        return reason, ("a file or folder disappeared while it was being written (another run writing to the "
                        "same --output_dir?): give each run its own folder")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return reason, "make the folder writable"
    return reason, "fix the cause"


def remove(path: Path) -> None:
    """Delete a file or folder; a folder is renamed first, so that no half-deleted folder keeps its name."""
    if path.is_dir() and not path.is_symlink():
        doomed = path.with_name(f".del_{path.name}_{os.getpid()}")
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_atomic(path: Path, text: str) -> Path:
    """Write `text` to `path` whole or not at all: a flushed temporary file renamed over it."""
    tmp = path.with_name(f".tmp_{path.name}")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def fsync_tree(folder: Path) -> None:
    """Flush a folder's files to the disk, so that a crash of the machine cannot leave them empty after the rename."""
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
