"""The parts `trainer.Trainer` is built from, each small enough to read and test alone.

- set-up, each piece checked before anything slow: the run folder, the device and the Accelerator (precision,
  trackers), the model to start from (a new UNet, or a pretrained pipeline for a fine-tune), the data, the seed,
  the learning rate, the EMA and the number of steps;
- `StepLosses`: each step's loss kept on the device and read every --log_every steps into loss.jsonl;
- the training state in and out of a checkpoint folder (accelerate's state plus each process's generators), with
  every process agreeing on whether a save failed;
- the model being trained as a pipeline, and its sample grid for the trackers.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddpmkit import runs
from ddpmkit.config import TrainConfig
from ddpmkit.data import ImageData, load_image_data
from ddpmkit.devices import resolve_device
from ddpmkit.errors import UserError, first_line
from ddpmkit.images import save_grid
from ddpmkit.models import (build_unet, check_image_size, check_unet_config, load_pipeline, new_noise_scheduler,
                            unet_config_for)
from ddpmkit.tuning import native_bf16

logger = logging.getLogger(__name__)


def check_before_loading(config: TrainConfig, output_dir: Path, pipeline_dir: Path) -> None:
    """The mistakes that fail before the data is read or the model built: an unwritable folder, a UNet config
    that does not fit the size, a --resume_from_checkpoint folder that is not a complete checkpoint, a new run in a
    folder holding another run's checkpoints."""
    runs.check_writable(output_dir)
    if config.cache_dir:
        runs.check_writable(Path(config.cache_dir).expanduser(), "--cache_dir")
    if not config.init_from:
        check_unet_config(unet_config_for(config.preset, config.unet_config), config.image_size,
                          f"--unet_config {config.unet_config}" if config.unet_config else "the UNet config")
    if config.resume_from_checkpoint not in (None, "latest"):
        runs.checkpoint_to_resume(output_dir, config.resume_from_checkpoint, pipeline_dir)
    earlier = runs.complete_checkpoints(runs.checkpoints_dir(output_dir))
    if config.resume_from_checkpoint is None and earlier:  # a new run there would mix with them ('latest' later)
        raise UserError(f"{output_dir} holds the checkpoints of an earlier run (the latest: {earlier[-1].name}): "
                        "continue it with --resume_from_checkpoint latest, or give a new --output_dir (or delete "
                        f"{runs.checkpoints_dir(output_dir)} to start over there)")


def make_accelerator(config: TrainConfig, output_dir: Path):
    """The Accelerator on the device `devices.resolve_device` picks, in the precision asked for (fp16 needs CUDA;
    bf16 on a CPU without it falls back to fp32), logging to TensorBoard (and W&B)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration, set_seed

    device = resolve_device(config.device)
    if config.mixed_precision == "fp16" and device.type != "cuda":
        raise UserError("--mixed_precision fp16 needs a GPU: use bf16 or no on the CPU")
    mixed_precision = config.mixed_precision
    if mixed_precision == "bf16" and device.type == "cpu" and not native_bf16("cpu"):
        # measured (benchmarks/speed.py): bf16 autocast is emulated on such CPUs and several times slower
        logger.warning("--mixed_precision bf16 on a CPU without native bf16 (no avx512_bf16 or AMX) is slower "
                       "than fp32 here: training in fp32 (docs/performance.md)")
        mixed_precision = "no"
    # accelerate keeps one precision per process and refuses another: a second training in the same Python
    # process (a notebook, a benchmark) may ask for another. The distributed set-up (PartialState) is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=config.grad_accumulation_steps,
        cpu=device.type == "cpu",  # also sets up the gloo process group under torchrun when no GPU is visible
        log_with=_trackers(config),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    if config.seed is not None:
        set_seed(config.seed)  # same initial weights on every process
    return accelerator


def _trackers(config: TrainConfig) -> list[str]:
    if not config.wandb_project:
        return ["tensorboard"]
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb_project needs the wandb package: pip install wandb") from None
    if os.environ.get("WANDB_MODE", "").lower() not in ("offline", "disabled", "dryrun"):
        try:  # the key is found (environment, ~/.netrc, wandb's settings) and well-formed; no network (verify=False)
            wandb.login(verify=False)
        except Exception as err:  # noqa: BLE001 - wandb's UsageError (no key), AuthenticationError (a malformed one)
            first = first_line(err)
            raise UserError(f"--wandb_project: W&B has no usable API key ({first[:120]}): run 'wandb login', or set "
                            "WANDB_MODE=offline to log in the run folder and sync later") from None
    return ["tensorboard", "wandb"]


def own_size(pipe) -> int:
    """The size a pretrained pipeline samples at: a fine-tune's --image_size when none is given."""
    size = pipe.unet.config.sample_size
    if not isinstance(size, int) and len(set(size)) > 1:
        raise UserError(f"the pretrained model samples at {size[0]}x{size[1]}, not a square: give --image_size")
    return size if isinstance(size, int) else size[0]


def load_pretrained(config: TrainConfig, accelerator):
    """The pipeline a fine-tune starts from, checked against the run's size, channels and prediction type."""
    with accelerator.main_process_first():  # one download for all processes
        pipe = load_pipeline(config.init_from)
    if config.image_size is None:  # not given: the size the model was trained at
        config.image_size = own_size(pipe)
        logger.info("fine-tuning at the start model's own size, %dx%d (--image_size changes it)", config.image_size,
                    config.image_size)
    check_image_size(dict(pipe.unet.config), config.image_size)
    if config.prediction_type and config.prediction_type != pipe.scheduler.config.prediction_type:
        raise UserError(f"the pretrained model predicts {pipe.scheduler.config.prediction_type}; "
                        "a fine-tune cannot change --prediction_type")
    if pipe.unet.config.in_channels != config.channels:
        raise UserError(f"the pretrained model has {pipe.unet.config.in_channels} channels: use --channels "
                        f"{pipe.unet.config.in_channels}")
    return pipe


def load_data(config: TrainConfig, accelerator) -> ImageData:
    c = config
    with accelerator.main_process_first():  # one download / one disk cache for all processes
        data = load_image_data(c.dataset, c.image_size, c.channels, c.image_column, c.class_column, c.split,
                               c.cache_dir, c.max_images, c.cache_max_gb)
    logger.info("%d training images from %s at %dx%d", len(data), c.dataset, c.image_size, c.image_size)
    return data


def build_model(config: TrainConfig, data: ImageData, pretrained=None):
    """(unet, noise_scheduler): the pretrained pipeline's, or a new UNet (with a null class when the data has
    labels to condition on) and a new DDPMScheduler."""
    c = config
    if pretrained is not None:
        unet, noise_scheduler = pretrained.unet, pretrained.scheduler
        if unet.config.sample_size != c.image_size:
            logger.info("fine-tuning at %dx%d a model pretrained at %s: the UNet is convolutional, so it "
                        "takes any multiple of its downsampling factor; samples use the new size",
                        c.image_size, c.image_size, unet.config.sample_size)
            unet.register_to_config(sample_size=c.image_size)
    else:
        num_classes = len(data.class_names) if c.class_column and data.class_names else None
        unet = build_unet(c.preset, c.image_size, c.channels, c.unet_config,
                          num_class_embeds=num_classes + 1 if num_classes else None)
        noise_scheduler = new_noise_scheduler(c.beta_schedule, c.num_train_timesteps, c.prediction_type or "epsilon")
    params = sum(p.numel() for p in unet.parameters())
    logger.info("UNet2DModel with %.2fM parameters; noise schedule %s, T=%d, predicts %s", params / 1e6,
                noise_scheduler.config.beta_schedule, noise_scheduler.config.num_train_timesteps,
                noise_scheduler.config.prediction_type)
    return unet, noise_scheduler


def run_seed(config: TrainConfig) -> int:
    """--seed, or (without one) a random seed drawn once and shared by all processes; checkpoints keep it."""
    if config.seed is not None:
        return config.seed
    from accelerate.utils import broadcast_object_list

    return int(broadcast_object_list([int.from_bytes(os.urandom(8), "little") >> 1])[0])


class TrainingHook:
    """A piece that rides along the loop without the loop knowing it (post-hoc EMA, quality while training).

    `trainer.build_hooks` makes them from the config. A hook with `state_dict` / `load_state_dict` is saved in
    every checkpoint and restored on resume (accelerate's `register_for_checkpointing`), so a resumed run continues
    it exactly. Every method is optional; each gets the Trainer."""

    def after_step(self, trainer) -> None:
        """After each optimizer step's loss is recorded, before that step's saves and checkpoint."""

    def add_to_pipeline(self, trainer, staged: Path, final: bool) -> None:
        """Files to add to a pipeline folder being saved (`staged`, moved into place when complete)."""

    def finish(self, trainer) -> None:
        """After the final pipeline is saved."""


def make_ema(config: TrainConfig, unet):
    """diffusers' EMAModel with train_unconditional.py's warm-up, or None without --use_ema."""
    if not config.use_ema:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(unet.parameters(), decay=config.ema_max_decay, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4,
                    foreach=True,  # one fused update over all weights, not one per tensor
                    model_cls=type(unet), model_config=unet.config)


def compile_unet(unet):
    """--compile: the training forward only; saving and sampling use the module as it is."""
    logger.info("--compile: the first step compiles the UNet (minutes on a CPU); the steps after are faster")
    return torch.compile(unet, dynamic=False)


def total_steps(config: TrainConfig, batches_per_epoch: int) -> int:
    """--max_steps, else --num_epochs (the course's 30 without it) of optimizer steps."""
    if config.max_steps:
        return config.max_steps
    epochs = config.num_epochs or 30  # the course trains for 30 epochs
    return epochs * math.ceil(batches_per_epoch / config.grad_accumulation_steps)


# ---------------------------------------------------------------------- the losses between the device and loss.jsonl
class StepLosses:
    """Each optimizer step's loss, kept on the device until it is read, in one transfer, every --log_every steps
    and before anything is saved (no host synchronisation inside a step); read losses go to loss.jsonl and the
    trackers. A non-finite loss stops the run, unless --skip_nonfinite skipped its step."""

    def __init__(self, accelerator, config: TrainConfig, log: runs.LossLog):
        self.accelerator, self.config, self.log = accelerator, config, log
        self.micro: list[torch.Tensor] = []  # this step's micro-batch losses
        self.pending: list[dict] = []  # steps whose loss is not read yet
        self.skipping = False  # this step is skipped (--skip_nonfinite)
        self.skipped_steps = 0  # skipped so far, over resumed runs

    def add(self, loss: torch.Tensor) -> None:
        self.micro.append(loss.detach())

    def skip_step(self) -> bool:
        """--skip_nonfinite: whether this step's loss is NaN or infinite on any process (then no update)."""
        if self.config.skip_nonfinite > 0:
            bad = (~torch.isfinite(torch.stack(self.micro))).any().float().view(1)
            self.skipping = bool(self.accelerator.gather(bad).max().item())
        else:
            self.skipping = False
        return self.skipping

    def end_step(self, record: dict) -> torch.Tensor:
        """This step's loss (the mean over its micro-batches, on the device), kept with its record until read."""
        loss = torch.stack(self.micro).float().mean()
        self.micro = []
        self.pending.append({**record, "loss": loss, "skipped": self.skipping})
        return loss

    def read_due(self, step: int, total_steps: int, stop_signal: int) -> bool:
        """Every --log_every steps, at the last step, before anything is saved or sampled (a diverged model is
        never saved), and at a stop signal (one process: it acts after this step)."""
        c = self.config
        periodic = any(every and step % every == 0 for every in
                       (c.save_model_every, c.log_samples_every, c.checkpointing_steps))
        return (step % c.log_every == 0 or step >= total_steps or periodic
                or (stop_signal and self.accelerator.num_processes == 1))

    def read(self, stop_signal: int, last_checkpoint: Path | None) -> tuple[float, int]:
        """The pending steps' losses (each the mean over micro-batches and processes), written; returns the last
        one, and the stop signal any process got (0: none), shared in the same gather so that every process stops
        after the same step."""
        acc, pending, self.pending = self.accelerator, self.pending, []
        losses = torch.stack([record.pop("loss") for record in pending])
        if acc.num_processes == 1:
            values, stop = losses.tolist(), stop_signal
        else:
            flag = torch.tensor([float(stop_signal)], device=acc.device)
            gathered = acc.gather(torch.cat([losses, flag])).view(acc.num_processes, -1).cpu()
            values, stop = gathered[:, :-1].mean(dim=0).tolist(), int(gathered[:, -1].max().item())
        for record, loss in zip(pending, values):
            if math.isfinite(loss):
                self._write(record, loss)
            elif record["skipped"]:
                self._write_skipped(record, loss, last_checkpoint)
            else:
                raise self._diverged(loss, record["step"], last_checkpoint)
        return values[-1], stop

    def _write(self, record: dict, loss: float) -> None:
        """One step's line in loss.jsonl (and the trackers)."""
        step, lr, epoch = record["step"], record["lr"], record["epoch"]
        self.accelerator.log({"loss": loss, "lr": lr, "epoch": epoch}, step=step)
        if self.accelerator.is_main_process:
            self.log.append({"step": step, "loss": loss, "lr": lr, "epoch": epoch,
                             "images_per_s": round(record["images_per_s"], 2), "train_s": round(record["train_s"], 1)})

    def _write_skipped(self, record: dict, loss: float, last_checkpoint: Path | None) -> None:
        self.skipped_steps += 1
        if self.skipped_steps > self.config.skip_nonfinite:
            raise self._diverged(loss, record["step"], last_checkpoint)
        logger.warning("step %d: the loss is %s; skipped it, weights unchanged (%d of --skip_nonfinite %d)",
                       record["step"], loss, self.skipped_steps, self.config.skip_nonfinite)
        if self.accelerator.is_main_process:
            self.log.append({"step": record["step"], "loss": None, "skipped": str(loss), "epoch": record["epoch"]})

    def _diverged(self, loss: float, step: int, last_checkpoint: Path | None) -> UserError:
        c = self.config
        kept = (f"the last good checkpoint, {last_checkpoint}, is intact: resume from it with "
                "--resume_from_checkpoint latest and a lower --lr") if last_checkpoint else \
            "no checkpoint was saved before it (--checkpointing_steps N saves one every N steps)"
        if c.skip_nonfinite:
            what = (f"after {self.skipped_steps - 1} skipped step(s), the most --skip_nonfinite {c.skip_nonfinite} "
                    "allows")
        else:
            what = "lower --lr, or skip up to N such steps with --skip_nonfinite N"
        return UserError(f"the loss became {loss} at step {step} ({what}); nothing was saved from this step; {kept}")


# ---------------------------------------------------------------------- the training state in and out of checkpoints
def write_checkpoint(accelerator, final: Path, process_state: dict, step: int, keep: int) -> Exception | None:
    """accelerate's state (weights, optimizer, LR schedule, EMA, global generators) and this process's own
    (`process_state`) into a staging folder, renamed to `final` once every process wrote its part (the marker
    last); the oldest beyond `keep` complete ones removed. Returns the error any process met (None: saved)."""
    tmp = runs.staging_checkpoint(final)
    if accelerator.is_main_process:
        runs.remove(tmp)  # left by a killed run
    accelerator.wait_for_everyone()
    error = None
    try:
        accelerator.save_state(str(tmp))
        torch.save(process_state, runs.process_state_file(tmp, accelerator.process_index))
    except Exception as err:  # noqa: BLE001 - a full disk shows up as OSError, RuntimeError or SafetensorError
        error = err
    error = agree(accelerator, error)
    if accelerator.is_main_process:
        if error is None:
            try:
                runs.commit_checkpoint(tmp, final, {"global_step": step, "num_processes": accelerator.num_processes})
            except Exception as err:  # noqa: BLE001
                error = err
        if error is None:
            runs.prune_checkpoints(final.parent, final, keep)
        else:
            runs.remove(tmp)
    return error


def read_checkpoint(accelerator, path: Path) -> tuple[int, dict | None]:
    """Load accelerate's state from a checkpoint: (its step, this process's own state), or (step, None) when another
    number of processes wrote it (another sharding: the same sequence cannot continue)."""
    try:
        accelerator.load_state(str(path))
    except (RuntimeError, ValueError, KeyError) as err:  # another UNet, optimizer or EMA than this run's flags build
        first = first_line(err)
        why = "its UNet's layers or sizes differ" if "state_dict" in first else first[:160]
        raise UserError(f"{path} does not fit the model these flags build ({why}): resume with the flags of "
                        "the run that saved it (its train_config.json), or start a new run") from None
    marker = runs.read_checkpoint_marker(path)
    own = runs.process_state_file(path, accelerator.process_index)
    if marker.get("num_processes", 1) == accelerator.num_processes and own.exists():
        return marker["global_step"], torch.load(own, weights_only=True)
    logger.warning("%s was written by %s process(es), this run has %d: the data order, flips and noise "
                   "continue from new seeds, so this run is not exactly the one it replaces", path,
                   marker.get("num_processes", "?"), accelerator.num_processes)
    return marker["global_step"], None


def agree(accelerator, error: Exception | None) -> Exception | None:
    """Every process learns whether any of them failed (so that none waits for the others for ever)."""
    if accelerator.num_processes == 1:
        return error
    failed = accelerator.gather(torch.tensor([float(error is not None)], device=accelerator.device)).max().item()
    return error or (RuntimeError("another process failed to save") if failed else None)


def raise_if_failed(accelerator, error: Exception | None, what: str, last_checkpoint: Path | None) -> None:
    """After a save on every process: if any failed, all raise the same one line (what, why, what is intact, what
    to do)."""
    error = agree(accelerator, error)
    accelerator.wait_for_everyone()
    if error is None:
        return
    previous = f"the last complete checkpoint, {last_checkpoint}," if last_checkpoint else "the previous checkpoints"
    reason, advice = runs.save_error_advice(error)
    raise UserError(f"could not save {what} ({reason}); {previous} and the saved pipelines are intact: "
                     f"{advice}, then resume with --resume_from_checkpoint latest")


def weights_checksums(accelerator, unet) -> list[float]:
    """The sum of every weight, on each process: equal when the processes trained one model."""
    total = sum(float(p.detach().double().sum()) for p in unet.parameters())
    checksum = torch.tensor([total], device=accelerator.device)
    return accelerator.gather(checksum).cpu().tolist()


# ---------------------------------------------------------------------- the model being trained, as a pipeline
def training_pipeline(unet, noise_scheduler, ema=None):
    """A DDPMPipeline of the UNet being trained; with `ema`, of a copy holding the EMA weights (the training
    weights stay untouched)."""
    import copy

    from diffusers import DDPMPipeline

    if ema is not None:
        unet = copy.deepcopy(unet)
        ema.copy_to(unet.parameters())
    return DDPMPipeline(unet=unet, scheduler=noise_scheduler)


def sample_grid(pipe, config: TrainConfig, path: Path, trackers, step: int) -> Path:
    """A grid of `num_sample_images` (`sample_scheduler` at `sample_steps`, seed 0) saved to `path`, and given to
    the trackers."""
    from ddpmkit.sampling import sample

    out = sample(pipe, scheduler=config.sample_scheduler, steps=config.sample_steps,
                 num_images=config.num_sample_images, seed=0, progress=False)
    path = save_grid(out.images, path)
    grid = np.asarray(Image.open(path).convert("RGB"))
    for tracker in trackers:
        try:
            if tracker.name == "tensorboard":
                tracker.log_images({"samples": grid[None]}, step=step, dataformats="NHWC")
            else:
                tracker.log_images({"samples": [grid]}, step=step)
        except Exception as err:  # a tracker failing to take an image must not stop training
            logger.warning("could not log samples to %s: %s", tracker.name, err)
    return path
