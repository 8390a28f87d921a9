"""The one training loop (accelerate): from scratch, or fine-tuning when `init_from` names a pipeline.

Per micro-batch, the course's loop: t ~ U{0..T-1} per sample, x_t = add_noise(x0, eps, t),
loss = MSE(unet(x_t, t), target) with target eps (or x0, or v). Only the UNet is optimized; the noise
comes from the model's own scheduler.

A resumed run is the run it replaces: a checkpoint (`--checkpointing_steps`, and on SIGINT/SIGTERM) holds
the model, EMA, optimizer, LR schedule, step, the position inside the epoch and every generator (data
order, flips, timesteps, noise; on every process), and `--resume_from_checkpoint latest` continues the same
sequence. Checkpoints and pipeline folders are written beside their place and moved in when complete, so a
kill or a full disk leaves the previous ones intact.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ddpmkit.config import TrainConfig, make_config
from ddpmkit.data import ImageData, ShuffledBatches, derive_seed, load_image_data
from ddpmkit.errors import Interrupted, UserError
from ddpmkit.images import bars_enabled, plot_loss_curve, save_grid
from ddpmkit.models import (build_unet, check_image_size, check_unet_config, load_pipeline, new_noise_scheduler,
                            unet_config_for)
from ddpmkit.tuning import native_bf16

logger = logging.getLogger(__name__)

META_FILE = "ddpmkit.json"  # beside model_index.json: class names and how the model was trained
CHECKPOINT_MARKER = "training_state.json"  # written last: a checkpoint folder without it is incomplete
RNG_STATE = "ddpmkit_state_{}.pt"  # per process: the batch position and the generators


def train(config: TrainConfig | None = None, data: ImageData | None = None, **overrides) -> Path:
    """Train (or fine-tune) a diffusion UNet and save a DDPMPipeline folder; returns its path.

    `ddpmkit.train(dataset="emoji", image_size=32, max_steps=2000, output_dir="runs/emoji32")`.
    Pass `data` to train on images already in memory (an `ImageData`). SIGINT/SIGTERM (in the main thread) save a
    checkpoint and raise `ddpmkit.errors.Interrupted`; a mistake in the input or a failed save raises `UserError`.
    """
    if config is None:
        config = make_config(TrainConfig, overrides)
    elif overrides:
        config = make_config(TrainConfig, {**config.to_dict(), **overrides})
    trainer = Trainer(config.validate(), data=data)
    return trainer.run()


class Trainer:
    """Set up -> run_step (forward_backward) -> log_step -> save; `run()` reads like the table of contents."""

    def __init__(self, config: TrainConfig, data: ImageData | None = None):
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.pipeline_dir = self.output_dir / config.model_save_name if config.model_save_name else self.output_dir
        check_writable(self.output_dir)  # before the data is read or the model built
        if not config.init_from:  # fail on a bad config or size before spending time on the data
            check_unet_config(unet_config_for(config.preset, config.unet_config), config.image_size,
                              f"--unet_config {config.unet_config}" if config.unet_config else "the UNet config")
        if config.resume_from_checkpoint not in (None, "latest"):  # a wrong folder fails before the data is read
            self._checkpoint_to_resume()
        self.accelerator = self._make_accelerator()
        # a fine-tune loads its model before the data: a wrong model id fails before a long dataset download
        self.pretrained = self._load_pretrained() if config.init_from else None
        self.data = data if data is not None else self._load_data()
        self.unet, self.noise_scheduler = self._build_model()
        self.seed = self._run_seed()
        # timesteps, noise and label drops: one generator per process, saved in every checkpoint
        self.generator = torch.Generator(self.accelerator.device).manual_seed(
            derive_seed(self.seed, self.accelerator.process_index, 2))
        self.global_step = 0
        self.train_s_before = self.train_s = 0.0  # training wall-clock seconds, summed over resumed runs
        self.loss_log = self.output_dir / "loss.jsonl"
        self.skipped_steps = 0  # non-finite steps skipped so far (--skip_nonfinite)
        self.stop_signal = 0  # set by SIGINT / SIGTERM: save a checkpoint after this step and stop
        self.last_checkpoint = None
        self.compiled = None  # the torch.compile'd UNet for training steps (--compile)

    # ------------------------------------------------------------------ set up
    def _make_accelerator(self):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import ProjectConfiguration, set_seed

        c = self.config
        if c.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise UserError("--mixed_precision fp16 needs a GPU: use bf16 or no on the CPU")
        if c.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda, but no CUDA GPU is visible: use --device cpu or auto")
        mixed_precision = c.mixed_precision
        on_cpu = c.device == "cpu" or not torch.cuda.is_available()
        if mixed_precision == "bf16" and on_cpu and not native_bf16("cpu"):
            # measured (benchmarks/speed.py): bf16 autocast is emulated on such CPUs and several times slower
            logger.warning("--mixed_precision bf16 on a CPU without native bf16 (no avx512_bf16 or AMX) is slower "
                           "than fp32 here: training in fp32 (docs/performance.md)")
            mixed_precision = "no"
        trackers = ["tensorboard"]
        if c.wandb_project:
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise UserError("--wandb_project needs the wandb package: pip install wandb") from None
            trackers.append("wandb")
        # accelerate keeps one precision per process and refuses another: a second training in the same Python
        # process (a notebook, a benchmark) may ask for another. The distributed set-up (PartialState) is kept.
        AcceleratorState._reset_state()
        accelerator = Accelerator(
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=c.grad_accumulation_steps,
            cpu=on_cpu,  # also sets up the gloo process group under torchrun when no GPU is visible
            log_with=trackers,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir),
                                                logging_dir=str(self.output_dir / "logs")),
        )
        if c.seed is not None:
            set_seed(c.seed)  # same initial weights on every process
        return accelerator

    def _load_data(self) -> ImageData:
        c = self.config
        with self.accelerator.main_process_first():  # one download / one disk cache for all processes
            data = load_image_data(c.dataset, c.image_size, c.channels, c.image_column, self.config.class_column, c.split,
                                   c.cache_dir, c.max_images, c.cache_max_gb)
        logger.info("%d training images from %s at %dx%d", len(data), c.dataset, c.image_size, c.image_size)
        return data

    def _load_pretrained(self):
        c = self.config
        with self.accelerator.main_process_first():  # one download for all processes
            pipe = load_pipeline(c.init_from)
        check_image_size(dict(pipe.unet.config), c.image_size)
        if c.prediction_type and c.prediction_type != pipe.scheduler.config.prediction_type:
            raise UserError(f"the pretrained model predicts {pipe.scheduler.config.prediction_type}; "
                            "a fine-tune cannot change --prediction_type")
        if pipe.unet.config.in_channels != c.channels:
            raise UserError(f"the pretrained model has {pipe.unet.config.in_channels} channels: use --channels "
                            f"{pipe.unet.config.in_channels}")
        return pipe

    def _build_model(self):
        c = self.config
        if c.init_from:
            unet, noise_scheduler = self.pretrained.unet, self.pretrained.scheduler
            if unet.config.sample_size != c.image_size:
                logger.info("fine-tuning at %dx%d a model pretrained at %s: the UNet is convolutional, so it "
                            "takes any multiple of its downsampling factor; samples use the new size",
                            c.image_size, c.image_size, unet.config.sample_size)
                unet.register_to_config(sample_size=c.image_size)
        else:
            num_classes = len(self.data.class_names) if self.config.class_column and self.data.class_names else None
            unet = build_unet(c.preset, c.image_size, c.channels, c.unet_config,
                              num_class_embeds=num_classes + 1 if num_classes else None)
            noise_scheduler = new_noise_scheduler(c.beta_schedule, c.num_train_timesteps, c.prediction_type or "epsilon")
        params = sum(p.numel() for p in unet.parameters())
        logger.info("UNet2DModel with %.2fM parameters; noise schedule %s, T=%d, predicts %s", params / 1e6,
                    noise_scheduler.config.beta_schedule, noise_scheduler.config.num_train_timesteps,
                    noise_scheduler.config.prediction_type)
        return unet, noise_scheduler

    def _total_steps(self, batches_per_epoch: int) -> int:
        c = self.config
        if c.max_steps:
            return c.max_steps
        epochs = c.num_epochs or 30  # the course trains for 30 epochs
        return epochs * math.ceil(batches_per_epoch / c.grad_accumulation_steps)

    # ------------------------------------------------------------------ the loop
    def run(self) -> Path:
        from accelerate.utils import set_seed
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        c, acc = self.config, self.accelerator
        lr = c.lr if c.lr is not None else (1e-5 if c.init_from else 4e-4)  # the course's two learning rates
        optimizer = torch.optim.AdamW(self.unet.parameters(), lr=lr, weight_decay=c.adam_weight_decay)
        self.ema = EMAModel(self.unet.parameters(), decay=c.ema_max_decay, use_ema_warmup=True, inv_gamma=1.0,
                            power=3 / 4, foreach=True,  # one fused update over all weights, not one per tensor
                            model_cls=type(self.unet), model_config=self.unet.config) if c.use_ema else None
        if c.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.unet, optimizer = acc.prepare(self.unet, optimizer)
        if c.compile:  # the training forward only: saving and sampling use the module as it is
            logger.info("--compile: the first step compiles the UNet (minutes on a CPU); the steps after are faster")
            self.compiled = torch.compile(self.unet, dynamic=False)
        self.batches = ShuffledBatches(self.data, c.batch_size, self.seed, c.random_flip, acc.device, acc.process_index,
                                       acc.num_processes)
        self.total_steps = self._total_steps(len(self.batches))
        self.lr_scheduler = get_scheduler(c.lr_scheduler, optimizer, num_warmup_steps=c.lr_warmup_steps,
                                          num_training_steps=self.total_steps)
        acc.register_for_checkpointing(self.lr_scheduler)
        if self.ema is not None:
            self.ema.to(acc.device)
            acc.register_for_checkpointing(self.ema)
        self.optimizer = optimizer
        set_seed(derive_seed(self.seed, acc.process_index, 3) % 2**32)  # global generators (dropout); a resume restores them
        self._resume()
        if acc.is_main_process:
            _write_atomic(self.output_dir / "train_config.json", json.dumps(c.to_dict(), indent=2) + "\n")
            if self.global_step == 0:  # a fresh run in an old folder starts a new loss log (a resume keeps it)
                self.loss_log.unlink(missing_ok=True)
        acc.init_trackers(c.wandb_project or "ddpmkit", config=_flat(c.to_dict()),
                          init_kwargs={"wandb": {"dir": str(self.output_dir)}})  # wandb/ inside the run folder
        logger.info("training for %d optimizer steps (%d micro-batches of %d per epoch, %d process(es), lr %.1e)",
                    self.total_steps, len(self.batches), self.batches.batch_size, acc.num_processes, lr)

        bar = tqdm(total=self.total_steps, initial=self.global_step, disable=not bars_enabled(acc.is_local_main_process),
                   desc="training", dynamic_ncols=True)
        started, images_seen = time.perf_counter(), 0
        self.micro_losses, self.skipping, self.pending = [], False, []
        batches = iter(self.batches)
        with self._stop_on_signals(), bar:
            while self.global_step < self.total_steps:
                batch = next(batches)
                self.run_step(batch)
                images_seen += batch["images"].shape[0] * acc.num_processes
                if not acc.sync_gradients:
                    continue
                self.global_step += 1
                self.train_s = self.train_s_before + time.perf_counter() - started
                rate = images_seen / max(time.perf_counter() - started, 1e-9)
                self._record_step(rate)
                bar.update(1)
                stop = 0
                if self._read_due():  # the only host synchronisation of a step, once per --log_every steps
                    loss, stop = self._read_losses()
                    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.0f}")
                self._periodic()
                if stop and self.global_step < self.total_steps:
                    bar.close()
                    self._stop(stop)
        acc.wait_for_everyone()
        final = self.save(self.pipeline_dir)
        self._finish()
        return final

    def run_step(self, batch: dict) -> torch.Tensor:
        """One micro-batch under `accumulate`: forward, backward (loss / accumulation steps), maybe step."""
        acc = self.accelerator
        with acc.accumulate(self.unet):
            loss = self.forward_backward(batch)
            self.micro_losses.append(loss.detach())
            self.skipping = acc.sync_gradients and self.config.skip_nonfinite > 0 and not self._all_finite()
            if self.skipping:  # --skip_nonfinite: no update from this step (weights, optimizer, LR, EMA)
                self.optimizer.zero_grad(set_to_none=True)
                return loss.detach()
            if acc.sync_gradients:
                if self.config.max_grad_norm > 0:
                    acc.clip_grad_norm_(self.unet.parameters(), self.config.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if acc.sync_gradients:
                self.lr_scheduler.step()
                if self.ema is not None:
                    self.ema.step(self.unet.parameters())
        return loss.detach()

    def forward_backward(self, batch: dict) -> torch.Tensor:
        clean_images = batch["images"]  # x0 in [-1, 1], (B, C, H, W)
        noise = torch.randn_like(clean_images, generator=self.generator)  # eps
        bs = clean_images.shape[0]
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (bs,),
                                  device=clean_images.device, generator=self.generator).long()  # t ~ U, one per sample
        noisy_images = self.noise_scheduler.add_noise(clean_images, noise, timesteps)  # x_t
        kwargs = {}
        if self.unet_config.num_class_embeds:
            labels = batch["labels"].clone()
            drop = torch.rand(bs, device=labels.device, generator=self.generator) < self.config.cond_drop_prob
            # the null class, for classifier-free guidance; also for images without a label (-1)
            labels[drop | (labels < 0)] = self.unet_config.num_class_embeds - 1
            kwargs["class_labels"] = labels
        # a shorter last batch of an epoch runs eagerly: the same weights, and no second compile for its shape
        unet = self.compiled if self.compiled is not None and bs == self.batches.batch_size else self.unet
        with self.accelerator.autocast():
            model_output = unet(noisy_images, timesteps, return_dict=False, **kwargs)[0]
        target = self._target(clean_images, noise, timesteps)
        if self.config.snr_gamma is None:
            loss = F.mse_loss(model_output.float(), target.float())
        else:  # Min-SNR-gamma: the per-sample MSE weighted by min(SNR, gamma) / (SNR or SNR + 1)
            per_sample = F.mse_loss(model_output.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
            loss = (per_sample * self._snr_weights(timesteps)).mean()
        self.accelerator.backward(loss)
        return loss

    def _run_seed(self) -> int:
        """--seed, or (without one) a random seed drawn once and shared by all processes; checkpoints keep it."""
        if self.config.seed is not None:
            return self.config.seed
        from accelerate.utils import broadcast_object_list

        return int(broadcast_object_list([int.from_bytes(os.urandom(8), "little") >> 1])[0])

    def _record_step(self, images_per_s: float) -> None:
        """Keep this step's loss on the device (mean over its micro-batches) until the next read."""
        loss = torch.stack(self.micro_losses).float().mean()
        self.micro_losses = []
        self.pending.append({"step": self.global_step, "loss": loss, "lr": self.lr_scheduler.get_last_lr()[0],
                             "epoch": self.batches.epoch, "images_per_s": images_per_s, "train_s": self.train_s,
                             "skipped": self.skipping})

    def _read_due(self) -> bool:
        """Read the losses every --log_every steps, at the last step, before anything is saved or sampled (a
        diverged model is never saved), and at a stop signal (one process: it acts after this step)."""
        c, step = self.config, self.global_step
        periodic = any(every and step % every == 0 for every in
                       (c.save_model_every, c.log_samples_every, c.checkpointing_steps))
        return (step % c.log_every == 0 or step >= self.total_steps or periodic
                or (self.stop_signal and self.accelerator.num_processes == 1))

    def _read_losses(self) -> tuple[float, int]:
        """The pending steps' losses (each the mean over micro-batches and processes), in one transfer, written
        to loss.jsonl; the last one, and the stop signal any process got (0: none), shared in the same gather so
        that every process stops after the same step. A non-finite loss raises, unless --skip_nonfinite skipped it."""
        acc, pending, self.pending = self.accelerator, self.pending, []
        losses = torch.stack([record.pop("loss") for record in pending])
        if acc.num_processes == 1:
            values, stop = losses.tolist(), self.stop_signal
        else:
            flag = torch.tensor([float(self.stop_signal)], device=acc.device)
            gathered = acc.gather(torch.cat([losses, flag])).view(acc.num_processes, -1).cpu()
            values, stop = gathered[:, :-1].mean(dim=0).tolist(), int(gathered[:, -1].max().item())
        for record, loss in zip(pending, values):
            if math.isfinite(loss):
                self.log_step(record, loss)
            elif record["skipped"]:
                self._log_skipped(record, loss)
            else:
                raise self._diverged(loss, record["step"])
        return values[-1], stop

    def _all_finite(self) -> bool:
        """Whether every micro-batch loss of this step is finite on every process (--skip_nonfinite)."""
        bad = (~torch.isfinite(torch.stack(self.micro_losses))).any().float().view(1)
        return not self.accelerator.gather(bad).max().item()

    def _log_skipped(self, record: dict, loss: float) -> None:
        self.skipped_steps += 1
        if self.skipped_steps > self.config.skip_nonfinite:
            raise self._diverged(loss, record["step"])
        logger.warning("step %d: the loss is %s; skipped it, weights unchanged (%d of --skip_nonfinite %d)",
                       record["step"], loss, self.skipped_steps, self.config.skip_nonfinite)
        if self.accelerator.is_main_process:
            with self.loss_log.open("a") as f:
                f.write(json.dumps({"step": record["step"], "loss": None, "skipped": str(loss),
                                    "epoch": record["epoch"]}) + "\n")

    def _diverged(self, loss: float, step: int) -> UserError:
        c = self.config
        kept = (f"the last good checkpoint, {self.last_checkpoint}, is intact: resume from it with "
                "--resume_from_checkpoint latest and a lower --lr") if self.last_checkpoint else \
            "no checkpoint was saved before it (--checkpointing_steps N saves one every N steps)"
        if c.skip_nonfinite:
            what = f"after {self.skipped_steps - 1} skipped step(s), the most --skip_nonfinite {c.skip_nonfinite} allows"
        else:
            what = "lower --lr, or skip up to N such steps with --skip_nonfinite N"
        return UserError(f"the loss became {loss} at step {step} ({what}); nothing was saved from this "
                         f"step; {kept}")

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGINT / SIGTERM set `stop_signal`: the loop saves a checkpoint after the step and stops; a second one acts
        at once."""
        if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
            yield
            return
        previous = {}

        def handler(signum, frame):
            self.stop_signal = signum
            signal.signal(signum, previous[signum])

        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, handler)
        try:
            yield
        finally:
            for signum, old in previous.items():
                signal.signal(signum, old)

    def _stop(self, signum: int):
        name = signal.Signals(signum).name
        logger.info("%s: saving a checkpoint at step %d", name, self.global_step)
        path = self.last_checkpoint if self._saved_at(self.global_step) else self.save_checkpoint()
        self._release()
        raise Interrupted(f"stopped by {name} at step {self.global_step} of {self.total_steps}; saved {path}: "
                          "resume with the same command and --resume_from_checkpoint latest", signum)

    def _saved_at(self, step: int) -> bool:
        return self.last_checkpoint is not None and self.last_checkpoint.name == _checkpoint_name(step)

    @property
    def unet_config(self):
        return self.accelerator.unwrap_model(self.unet).config

    def _target(self, clean_images, noise, timesteps):
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "sample":
            return clean_images
        return self.noise_scheduler.get_velocity(clean_images, noise, timesteps)  # v = sqrt(ab) eps - sqrt(1-ab) x0

    def _snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma weights (Hang et al. 2023), as diffusers' training scripts compute them."""
        alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        snr = alphas_cumprod / (1 - alphas_cumprod)
        clipped = snr.clamp(max=self.config.snr_gamma)
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "v_prediction":
            return clipped / (snr + 1)
        if prediction_type == "sample":  # x0 loss is SNR times the eps loss: weight it by min(SNR, gamma)
            return clipped
        return clipped / snr

    # ------------------------------------------------------------------ logging and saving
    def log_step(self, record: dict, loss: float) -> None:
        """One step's line in loss.jsonl (and the trackers), written when its loss is read."""
        step, lr, epoch = record["step"], record["lr"], record["epoch"]
        self.accelerator.log({"loss": loss, "lr": lr, "epoch": epoch}, step=step)
        if self.accelerator.is_main_process:
            with self.loss_log.open("a") as f:
                f.write(json.dumps({"step": step, "loss": loss, "lr": lr, "epoch": epoch,
                                    "images_per_s": round(record["images_per_s"], 2),
                                    "train_s": round(record["train_s"], 1)}) + "\n")

    def _periodic(self) -> None:
        c, step = self.config, self.global_step
        if c.save_model_every and step % c.save_model_every == 0 and step < self.total_steps:
            self.save(self.pipeline_dir / f"step_{step}", final=False)
        if c.log_samples_every and step % c.log_samples_every == 0 and step < self.total_steps:
            self.log_samples()
        # last: the checkpoint then holds every generator exactly as the next step finds it
        if c.checkpointing_steps and step % c.checkpointing_steps == 0 and step < self.total_steps:
            self.save_checkpoint()

    def _pipeline(self):
        """The model being trained as a DDPMPipeline (EMA weights when --use_ema), on the training device."""
        from diffusers import DDPMPipeline

        unet = self.accelerator.unwrap_model(self.unet)
        if self.ema is not None:
            unet = _ema_copy(self.ema, unet)
        return DDPMPipeline(unet=unet, scheduler=self.noise_scheduler)

    def log_samples(self) -> Path | None:
        """A grid from the model being trained: `sample_scheduler` at `sample_steps`, fixed seed 0."""
        if not self.accelerator.is_main_process:
            return None
        from ddpmkit.sampling import sample

        out = sample(self._pipeline(), scheduler=self.config.sample_scheduler, steps=self.config.sample_steps,
                     num_images=self.config.num_sample_images, seed=0, progress=False)
        path = save_grid(out.images, self.output_dir / "samples" / f"step_{self.global_step:06d}.png")
        grid = np.asarray(Image.open(path).convert("RGB"))
        for tracker in self.accelerator.trackers:
            try:
                if tracker.name == "tensorboard":
                    tracker.log_images({"samples": grid[None]}, step=self.global_step, dataformats="NHWC")
                else:
                    tracker.log_images({"samples": [grid]}, step=self.global_step)
            except Exception as err:  # a tracker failing to take an image must not stop training
                logger.warning("could not log samples to %s: %s", tracker.name, err)
        return path

    def save(self, folder: Path, final: bool = True) -> Path:
        """Save a loadable DDPMPipeline (model_index.json, unet/, scheduler/) plus ddpmkit.json and a model card.

        Written to a staging folder first and moved into `folder` when complete (model_index.json last), so a
        kill or a full disk leaves the previous pipeline there intact.
        """
        error = None
        if self.accelerator.is_main_process:
            staged = folder / ".tmp_pipeline" if folder.exists() else folder.parent / f".tmp_{folder.name}"
            try:
                _remove(staged)
                self._write_pipeline(staged, folder, final)
                _commit_pipeline(staged, folder)
            except Exception as err:  # noqa: BLE001 - a full disk shows up as OSError, RuntimeError or SafetensorError
                _remove(staged)
                error = err
        self._raise_if_failed(error, f"the pipeline of step {self.global_step} to {folder}")
        if self.accelerator.is_main_process:
            logger.info("saved pipeline (step %d) to %s", self.global_step, folder)
        return folder

    def _write_pipeline(self, staged: Path, folder: Path, final: bool) -> None:
        from ddpmkit.hub import write_model_card

        self._pipeline().save_pretrained(staged)
        meta = {"class_names": self.data.class_names if self.unet_config.num_class_embeds else None,
                "null_class": (self.unet_config.num_class_embeds - 1) if self.unet_config.num_class_embeds else None,
                "base_model": self.config.init_from, "dataset": self.config.dataset, "step": self.global_step,
                "train_config": self.config.to_dict()}
        (staged / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        self.config.save(staged / "train_config.json")  # the run's config beside the weights
        records = self._loss_records()
        if not final:
            write_model_card(folder, self.config, losses=records, staged=staged)
            return
        if records:
            plot_loss_curve([r["step"] for r in records], [r["loss"] for r in records], self.output_dir / "loss_curve.png")
        grid = self.log_samples()
        if grid is not None:
            shutil.copy(grid, staged / "samples.png")
        write_model_card(folder, self.config, sample_grid="samples.png", losses=records, staged=staged)

    def _loss_records(self) -> list[dict]:
        """The logged steps with a finite loss (a line cut short by a kill, or a skipped step, is left out)."""
        return [r for r in _read_log(self.loss_log) if isinstance(r.get("loss"), (int, float))]

    def save_checkpoint(self) -> Path:
        """Full training state (weights, optimizer, LR schedule, EMA, step, batch position, every generator) written
        to a temporary folder, then renamed: a `checkpoints/step_*` folder is complete, or it does not exist."""
        acc = self.accelerator
        root = self.output_dir / "checkpoints"
        final = root / _checkpoint_name(self.global_step)
        tmp = root / f".tmp_{final.name}"
        if acc.is_main_process:
            _remove(tmp)  # left by a killed run
        acc.wait_for_everyone()
        error = None
        try:
            acc.save_state(str(tmp))
            torch.save(self._process_state(), tmp / RNG_STATE.format(acc.process_index))
        except Exception as err:  # noqa: BLE001 - see save()
            error = err
        error = self._agree(error)
        if acc.is_main_process and error is not None:
            _remove(tmp)
        elif acc.is_main_process:
            try:
                _fsync_tree(tmp)
                marker = {"global_step": self.global_step, "num_processes": acc.num_processes}
                _write_atomic(tmp / CHECKPOINT_MARKER, json.dumps(marker))  # last: the checkpoint is complete
                _remove(final)  # the same step saved before (a run resumed from an earlier checkpoint)
                os.replace(tmp, final)
                _fsync_dir(root)
            except Exception as err:  # noqa: BLE001
                error = err
            if error is not None:
                _remove(tmp)
            else:
                self._prune_checkpoints(root, final)
        self._raise_if_failed(error, f"the checkpoint of step {self.global_step} to {root}")
        self.last_checkpoint = final
        if acc.is_main_process:
            logger.info("checkpoint saved to %s", final)
        return final

    def _process_state(self) -> dict:
        """What this process needs to continue the same sequence: batch position, flips, timesteps and noise."""
        return {"batches": self.batches.state_dict(), "generator": self.generator.get_state(),
                "skipped_steps": self.skipped_steps}

    def _prune_checkpoints(self, root: Path, newest: Path) -> None:
        """Keep the newest --checkpoints_total_limit complete checkpoints (the new one is complete by now)."""
        complete = [p for p in _complete_checkpoints(root) if p != newest]
        for old in complete[:max(0, len(complete) - (self.config.checkpoints_total_limit - 1))]:
            _remove(old)
        # left by killed runs: unfinished checkpoints (the new one has its final name by now) and unfinished deletions
        for leftover in [*root.glob(".tmp_step_*"), *root.glob(".del_*")]:
            _remove(leftover)

    def _agree(self, error: Exception | None) -> Exception | None:
        """Every process learns whether any of them failed (so that none waits for the others for ever)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return error
        failed = acc.gather(torch.tensor([float(error is not None)], device=acc.device)).max().item()
        return error or (RuntimeError("another process failed to save") if failed else None)

    def _raise_if_failed(self, error: Exception | None, what: str) -> None:
        error = self._agree(error)
        self.accelerator.wait_for_everyone()
        if error is None:
            return
        previous = f"the last complete checkpoint, {self.last_checkpoint}," if self.last_checkpoint else \
            "the previous checkpoints"
        reason, advice = save_error_advice(error)
        raise UserError(f"could not save {what} ({reason}); {previous} and the saved pipelines are intact: "
                        f"{advice}, then resume with --resume_from_checkpoint latest")

    def _checkpoint_to_resume(self) -> Path | None:
        """The folder --resume_from_checkpoint names ('latest': the newest complete one), or None to start anew."""
        which = self.config.resume_from_checkpoint
        if not which:
            return None
        if which == "latest":
            root = self.output_dir / "checkpoints"
            complete = _complete_checkpoints(root)
            if self.accelerator.is_main_process:
                for partial in sorted(set(root.glob("*step_*")) - set(complete)):
                    logger.warning("ignoring %s: an incomplete checkpoint (its save was interrupted)", partial)
                for partial in _incomplete_pipelines(self.pipeline_dir):
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

    def _resume(self) -> None:
        path = self._checkpoint_to_resume()
        if path is None:
            return
        acc = self.accelerator
        acc.load_state(str(path))
        if self.ema is not None:  # EMAModel.load_state_dict puts the shadow weights on the CPU
            self.ema.to(acc.device)
        state = json.loads((path / CHECKPOINT_MARKER).read_text())
        self.global_step = state["global_step"]
        self.last_checkpoint = path
        own = path / RNG_STATE.format(acc.process_index)
        if state.get("num_processes", 1) == acc.num_processes and own.exists():
            saved = torch.load(own, weights_only=True)
            self.batches.load_state_dict(saved["batches"])
            self.generator.set_state(saved["generator"])
            self.skipped_steps = int(saved.get("skipped_steps", 0))
        else:  # another number of processes: another sharding, so the same sequence cannot continue
            logger.warning("%s was written by %s process(es), this run has %d: the data order, flips and noise "
                           "continue from new seeds, so this run is not exactly the one it replaces", path,
                           state.get("num_processes", "?"), acc.num_processes)
            micro_batches = self.global_step * self.config.grad_accumulation_steps
            self.batches.epoch, self.batches.position = divmod(micro_batches, len(self.batches))
            self.generator.manual_seed(derive_seed(self.batches.seed, acc.process_index, 2, self.global_step))
        if acc.is_main_process and self.loss_log.exists():  # drop steps logged after the checkpoint
            kept = [r for r in _read_log(self.loss_log) if r.get("step", 0) <= self.global_step]
            self.train_s_before = float(kept[-1].get("train_s", 0.0)) if kept else 0.0
            _write_atomic(self.loss_log, "".join(json.dumps(r) + "\n" for r in kept))
        logger.info("resumed from %s at step %d (epoch %d, batch %d of %d)", path, self.global_step,
                    self.batches.epoch, self.batches.position, len(self.batches))

    def _release(self) -> None:
        """Flush the trackers and, with several processes, free the DDP wrapper before the process group goes."""
        acc = self.accelerator
        if acc.num_processes > 1:
            # Freed later (when the Trainer goes), the DDP Reducer drops the group's last reference with the GIL
            # held, and gloo's destructor then waits for a worker thread that needs the GIL: torchrun hung at exit
            # now and then (pytorch/pytorch#56297).
            self.unet = acc.unwrap_model(self.unet)
            acc.free_memory()
        acc.end_training()

    def _finish(self) -> None:
        acc = self.accelerator
        unet = acc.unwrap_model(self.unet)
        checksum = torch.tensor([sum(float(p.detach().double().sum()) for p in unet.parameters())], device=acc.device)
        per_rank = acc.gather(checksum).cpu().tolist()
        if acc.is_main_process:
            state = {"global_step": self.global_step, "num_processes": acc.num_processes,
                     "weights_checksum_per_process": per_rank}
            _write_atomic(self.output_dir / "train_state.json", json.dumps(state, indent=2) + "\n")
        self._release()
        if self.config.push_to_hub and acc.is_main_process:
            from ddpmkit.hub import push_to_hub

            push_to_hub(self.pipeline_dir, self.config.hub_model_id, private=self.config.hub_private)


# ---------------------------------------------------------------------- files that are complete or absent
def save_error_advice(error: Exception) -> tuple[str, str]:
    """(what went wrong, what to do) for a failed save: only a full disk or quota asks for disk space."""
    import errno

    if not isinstance(error, OSError) or error.errno is None:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
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


def check_writable(folder: Path) -> None:
    """Create `folder` and write a file in it, or raise UserError saying what is wrong."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write to --output_dir {folder} ({err.strerror or err}): choose a folder you can "
                        "write to") from None


def _checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def _complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    found = [p for p in root.glob("step_*") if (p / CHECKPOINT_MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]) if p.name.split("_")[1].isdigit() else -1)


def _incomplete_pipelines(folder: Path) -> list[Path]:
    """Pipeline folders a kill left half-written: staging folders, and folders with unet/ but no model_index.json."""
    candidates = [folder, *folder.glob("step_*")] if folder.is_dir() else []
    found = [p for p in candidates if (p / "unet").is_dir() and not (p / "model_index.json").exists()]
    return sorted(found + [p for p in [*folder.glob(".tmp_*"), *folder.parent.glob(f".tmp_{folder.name}")] if p.is_dir()])


def _read_log(path: Path) -> list[dict]:
    """The records of a JSON-lines log; a line cut short by a kill is left out."""
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                logger.warning("ignoring a line of %s cut short (a killed run): %r", path, line[:80])
    return records


def _remove(path: Path) -> None:
    """Delete a file or folder; a folder is renamed first, so that no half-deleted folder keeps its name."""
    if path.is_dir() and not path.is_symlink():
        doomed = path.with_name(f".del_{path.name}_{os.getpid()}")
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp_{path.name}")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(folder: Path) -> None:
    """Flush a folder's files to the disk, so that a crash of the machine cannot leave them empty after the rename."""
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit_pipeline(staged: Path, folder: Path) -> None:
    """Move a complete staged pipeline into `folder`: a new folder by one rename; into an existing folder (the run
    folder, which also holds logs and checkpoints) entry by entry, model_index.json removed first and put back last,
    so that a kill in between leaves no loadable half (`load_pipeline` needs model_index.json)."""
    _fsync_tree(staged)
    if not folder.exists():
        os.replace(staged, folder)
        _fsync_dir(folder.parent)
        return
    index = folder / "model_index.json"
    index.unlink(missing_ok=True)
    old = folder / ".old_pipeline"
    _remove(old)
    old.mkdir()
    for entry in sorted(staged.iterdir()):
        if entry.name == "model_index.json":
            continue
        target = folder / entry.name
        if target.exists():
            os.replace(target, old / entry.name)
        os.replace(entry, target)
    os.replace(staged / "model_index.json", index)
    _fsync_dir(folder)
    _remove(old)
    _remove(staged)


def _ema_copy(ema, unet):
    """A copy of `unet` holding the EMA weights (the training weights stay untouched)."""
    import copy

    model = copy.deepcopy(unet)
    ema.copy_to(model.parameters())
    return model


def _flat(d: dict) -> dict:
    """Hyperparameters as the trackers accept them: numbers, strings and booleans only."""
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool))}
