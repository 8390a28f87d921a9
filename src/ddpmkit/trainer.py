"""The one training loop (accelerate): from scratch, or fine-tuning when `init_from` names a pipeline.

Per micro-batch, the course's loop: t ~ U{0..T-1} per sample, x_t = add_noise(x0, eps, t),
loss = MSE(unet(x_t, t), target) with target eps (or x0, or v). Only the UNet is optimized; the noise
comes from the model's own scheduler. `Trainer.run()` is the table of contents, as in improved-diffusion's
TrainLoop: `run_step` (`forward_backward`, then the optimizer step), `log_step`, `save`.

A resumed run is the run it replaces: a checkpoint (`--checkpointing_steps`, and on SIGINT/SIGTERM) holds
the model, EMA, optimizer, LR schedule, step, the position inside the epoch and every generator (data
order, flips, timesteps, noise; on every process), and `--resume_from_checkpoint latest` continues the same
sequence. The run folder's files (`ddpmkit.runs`) are complete or absent, whatever kills the run.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ddpmkit import runs
from ddpmkit.capture import CapturedStep, optimizer_options, training_graphs
from ddpmkit.config import TrainConfig, make_config
from ddpmkit.data import ImageData, ShuffledBatches, derive_seed
from ddpmkit.errors import Interrupted
from ddpmkit.images import bars_enabled
from ddpmkit.phema_hook import PostHocEMA
from ddpmkit.train_eval import QualityDuringTraining
from ddpmkit.train_saving import SaveAndResume
from ddpmkit.train_parts import (StepLosses, TrainingHook, build_model, check_before_loading, compile_unet, load_data,
                                 load_pretrained, make_accelerator, make_ema, run_seed, total_steps, weights_checksums)

logger = logging.getLogger(__name__)

# Called after every optimizer step with {"step", "loss" (a tensor still on the device: reading it is the
# caller's choice of host synchronisation), "images_seen" (all processes, this run), "seconds" (since the loop began)}.
StepCallback = Callable[[dict], None]


def build_hooks(config: TrainConfig, unet, accelerator) -> list[TrainingHook]:
    """The `TrainingHook`s this config asks for, in the order they run after each step."""
    hooks: list[TrainingHook] = []
    if config.posthoc_ema:  # EDM2's power-function EMAs and their snapshots
        hooks.append(PostHocEMA(config, unet, accelerator))
    if config.eval_every:  # FID and KID every N steps, and the best pipeline kept
        hooks.append(QualityDuringTraining(config, accelerator))
    return hooks


def train(config: TrainConfig | None = None, data: ImageData | None = None, callback: StepCallback | None = None,
          **overrides) -> Path:
    """Train (or fine-tune) a diffusion UNet and save a DDPMPipeline folder; returns its path.

    `ddpmkit.train(dataset="emoji", image_size=32, max_steps=2000, output_dir="runs/emoji32")`.
    Pass `data` to train on images already in memory (an `ImageData`), `callback` to see every step. SIGINT/SIGTERM
    (in the main thread) save a checkpoint and raise `ddpmkit.errors.Interrupted`; a mistake in the input or a failed
    save raises `UserError`.
    """
    if config is None:
        config = make_config(TrainConfig, overrides)
    elif overrides:
        config = make_config(TrainConfig, {**config.to_dict(), **overrides})
    return Trainer(config.validate(), data=data, callback=callback).run()


# ---------------------------------------------------------------------- the loss, as the papers write it
def loss_target(noise_scheduler, clean_images: torch.Tensor, noise: torch.Tensor,
                timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict at x_t: eps (DDPM), x0 ('sample') or v = sqrt(ab) eps - sqrt(1 - ab) x0
    (Salimans & Ho 2022), following the scheduler's prediction_type."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return clean_images
    return noise_scheduler.get_velocity(clean_images, noise, timesteps)


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights per sample (Hang et al. 2023), as diffusers' training scripts compute them:
    min(SNR, gamma) / SNR for eps, / (SNR + 1) for v, and min(SNR, gamma) for x0 (its loss is SNR times eps's)."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas_cumprod / (1 - alphas_cumprod)
    clipped = snr.clamp(max=gamma)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if prediction_type == "sample":
        return clipped
    return clipped / snr


def drop_labels(labels: torch.Tensor, null_class: int, drop_prob: float, generator: torch.Generator) -> torch.Tensor:
    """Classifier-free guidance's label dropout (Ho & Salimans 2022): the null class for `drop_prob` of the images,
    and for those without a label (-1)."""
    drop = torch.rand(labels.shape[0], device=labels.device, generator=generator) < drop_prob
    return torch.where(drop | (labels < 0), null_class, labels)  # not a masked assignment: no host sync (CUDA graphs)


class Trainer(SaveAndResume):
    """Set up in `__init__`; `run()`: start (or resume) -> run_step (forward_backward) -> log_step -> save.
    Saving pipelines and checkpoints and resuming from one: `SaveAndResume` (ddpmkit.train_saving)."""

    def __init__(self, config: TrainConfig, data: ImageData | None = None, callback: StepCallback | None = None):
        from diffusers.optimization import get_scheduler

        c = self.config = config
        self.output_dir = Path(c.output_dir)
        self.pipeline_dir = self.output_dir / c.model_save_name if c.model_save_name else self.output_dir
        self.callback = callback
        check_before_loading(c, self.output_dir, self.pipeline_dir)  # before the data is read or the model built
        acc = self.accelerator = make_accelerator(c, self.output_dir)
        # a fine-tune loads its model before the data: a wrong model id fails before a long dataset download
        pretrained = load_pretrained(c, acc) if c.init_from else None
        self.data = data if data is not None else load_data(c, acc)
        unet, self.noise_scheduler = build_model(c, self.data, pretrained)
        self.num_class_embeds = unet.config.num_class_embeds  # classes + the null class; None: unconditional
        self.seed = run_seed(c)
        # timesteps, noise and label drops: one generator per process, saved in every checkpoint
        self.generator = torch.Generator(acc.device).manual_seed(derive_seed(self.seed, acc.process_index, 2))
        self.lr = c.learning_rate()
        graphs = training_graphs(c, acc)  # --compile on CUDA: the step captured in CUDA graphs (ddpmkit.capture)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=self.lr, weight_decay=c.adam_weight_decay,
                                      **optimizer_options(graphs))
        self.ema = make_ema(c, unet)
        if c.channels_last:
            unet.to(memory_format=torch.channels_last)
        self.unet, self.optimizer = acc.prepare(unet, optimizer)
        # for full training batches only; inside the captured step with --compile_kernels
        self.compiled = compile_unet(self.unet) if c.compile and (graphs is None or c.compile_kernels) else None
        self.batches = ShuffledBatches(self.data, c.batch_size, self.seed, c.random_flip, acc.device,
                                       acc.process_index, acc.num_processes, drop_last=graphs is not None)
        self.total_steps = total_steps(c, len(self.batches))
        self.lr_scheduler = get_scheduler(c.lr_scheduler, optimizer, num_warmup_steps=c.lr_warmup_steps,
                                          num_training_steps=self.total_steps)
        acc.register_for_checkpointing(self.lr_scheduler)
        if self.ema is not None:
            self.ema.to(acc.device)
            acc.register_for_checkpointing(self.ema)
        self.captured = CapturedStep(self, graphs) if graphs is not None else None
        self.hooks: list[TrainingHook] = build_hooks(c, self.unet, acc)
        for hook in self.hooks:
            if hasattr(hook, "state_dict"):
                acc.register_for_checkpointing(hook)
        # where the run stands (a resume sets it from its checkpoint), and the loop's bookkeeping
        self.global_step = 0
        self.train_s_before = self.train_s = 0.0  # training wall-clock seconds, summed over resumed runs
        self.last_checkpoint: Path | None = None
        self.loss_log = runs.LossLog(self.output_dir)
        self.losses = StepLosses(acc, c, self.loss_log)
        self.stop_signal = 0  # set by SIGINT / SIGTERM: save a checkpoint after this step and stop
        self.images_seen, self.started, self.progress = 0, 0.0, None

    # ------------------------------------------------------------------ the loop
    def run(self) -> Path:
        """Start (or resume), one optimizer step after another, save the final pipeline; returns its folder."""
        acc = self.accelerator
        self.start()
        batches = iter(self.batches)
        with _stop_on_signals(self):
            with self.progress:
                while self.global_step < self.total_steps:
                    batch = next(batches)
                    self.run_step(batch)
                    self.images_seen += batch["images"].shape[0] * acc.num_processes
                    if not acc.sync_gradients:  # more micro-batches to go in this step (--grad_accumulation_steps)
                        continue
                    self.global_step += 1
                    loss, stop = self.log_step()
                    for hook in self.hooks:
                        hook.after_step(self)
                    self.save_due()
                    if self.callback is not None:
                        self.callback({"step": self.global_step, "loss": loss, "images_seen": self.images_seen,
                                       "seconds": time.perf_counter() - self.started})
                    if stop and self.global_step < self.total_steps:
                        self.stop(stop)
            # the last step is done: a stop signal now waits for the final pipeline (its sample grid takes a while)
            acc.wait_for_everyone()
            final = self.save(self.pipeline_dir)
            for hook in self.hooks:
                hook.finish(self)
            if self.stop_signal:
                logger.info("%s came after the last step: the final pipeline was saved first",
                            signal.Signals(self.stop_signal).name)
        self.finish()
        return final

    def run_step(self, batch: dict) -> torch.Tensor:
        """One micro-batch under `accumulate`: forward, backward (loss / accumulation steps), maybe step."""
        if self.captured is not None:  # the same step, replayed from CUDA graphs
            return self.captured.run_step(batch)
        acc = self.accelerator
        with acc.accumulate(self.unet):
            loss = self.forward_backward(batch)
            self.losses.add(loss)
            if acc.sync_gradients and self.losses.skip_step():  # no update: weights, optimizer, LR, EMA as they were
                self.optimizer.zero_grad(set_to_none=True)
                return loss.detach()
            if acc.sync_gradients and self.config.max_grad_norm > 0:
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
        noise, timesteps = self.draw_noise(clean_images)  # eps, and t ~ U{0..T-1} one per sample
        noisy_images = self.noise_scheduler.add_noise(clean_images, noise, timesteps)  # x_t
        class_labels = (drop_labels(batch["labels"], self.num_class_embeds - 1, self.config.cond_drop_prob,
                                    self.generator) if self.num_class_embeds else None)
        # a shorter last batch of an epoch runs eagerly: the same weights, and no second compile for its shape
        full = clean_images.shape[0] == self.batches.batch_size
        unet = self.compiled if self.compiled is not None and full else self.unet
        with self.accelerator.autocast():
            model_output = unet(noisy_images, timesteps, class_labels=class_labels, return_dict=False)[0]
        target = loss_target(self.noise_scheduler, clean_images, noise, timesteps)
        if self.config.snr_gamma is None:
            loss = F.mse_loss(model_output.float(), target.float())
        else:  # Min-SNR-gamma: the per-sample MSE weighted by min(SNR, gamma) / (SNR or SNR + 1)
            per_sample = F.mse_loss(model_output.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
            loss = (per_sample * min_snr_weights(self.noise_scheduler, timesteps, self.config.snr_gamma)).mean()
        self.accelerator.backward(loss)
        return loss

    def draw_noise(self, clean_images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps ~ N(0, I) shaped like x0, t ~ U{0..T-1} per image) from the run's generator; a test may give its own."""
        noise = torch.randn_like(clean_images, generator=self.generator)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (clean_images.shape[0],),
                                  device=clean_images.device, generator=self.generator).long()
        return noise, timesteps

    # ------------------------------------------------------------------ start, log, stop
    def start(self) -> None:
        """Global generators, the checkpoint to continue, the run's config file, a new loss log, trackers, the bar."""
        from accelerate.utils import set_seed

        c, acc = self.config, self.accelerator
        # the global generators (dropout): seeded per process; a resume restores them
        set_seed(derive_seed(self.seed, acc.process_index, 3) % 2**32)
        self.resume()
        if acc.is_main_process:
            runs.write_train_config(self.output_dir, c.to_dict())
            if self.global_step == 0:  # a fresh run in an old folder starts a new loss log (a resume keeps it)
                self.loss_log.clear()
        acc.init_trackers(c.wandb_project or "ddpmkit", config=_flat(c.to_dict()),
                          init_kwargs={"wandb": {"dir": str(self.output_dir)}})  # wandb/ inside the run folder
        logger.info("training for %d optimizer steps (%d micro-batches of %d per epoch, %d process(es), lr %.1e)",
                    self.total_steps, len(self.batches), self.batches.batch_size, acc.num_processes, self.lr)
        self.progress = tqdm(total=self.total_steps, initial=self.global_step, desc="training", dynamic_ncols=True,
                             disable=not bars_enabled(acc.is_local_main_process))
        self.images_seen, self.started = 0, time.perf_counter()

    def log_step(self) -> tuple[torch.Tensor, int]:
        """This step's loss, kept on the device; the waiting ones read when due (the only host synchronisation, once
        per --log_every steps). Returns this step's loss and the stop signal every process agreed on (0: none)."""
        now = time.perf_counter()
        self.train_s = self.train_s_before + now - self.started
        rate = self.images_seen / max(now - self.started, 1e-9)
        loss = self.losses.end_step({"step": self.global_step, "lr": self.lr_scheduler.get_last_lr()[0],
                                     "epoch": self.batches.epoch, "images_per_s": rate, "train_s": self.train_s})
        self.progress.update(1)
        if not self.losses.read_due(self.global_step, self.total_steps, self.stop_signal):
            return loss, 0
        last, stop = self.losses.read(self.stop_signal, self.last_checkpoint)
        # the time to --max_steps at this run's measured rate (evaluations and saves included, over resumes)
        eta = tqdm.format_interval((self.total_steps - self.global_step) * self.train_s / self.global_step)
        shown = {k: v for hook in self.hooks for k, v in getattr(hook, "postfix", {}).items()}  # e.g. the last FID
        self.progress.set_postfix(loss=f"{last:.4f}", img_s=f"{rate:.0f}", eta=eta, **shown)
        return loss, stop

    def stop(self, signum: int):
        """After a stop signal: save a checkpoint of this step (unless there is one) and raise `Interrupted`."""
        self.progress.close()
        name = signal.Signals(signum).name
        logger.info("%s: saving a checkpoint at step %d", name, self.global_step)
        saved = self.last_checkpoint is not None and self.last_checkpoint.name == runs.checkpoint_name(self.global_step)
        path = self.last_checkpoint if saved else self.save_checkpoint()
        self._release()
        raise Interrupted(f"stopped by {name} at step {self.global_step} of {self.total_steps}; saved {path}: "
                          "resume with the same command and --resume_from_checkpoint latest", signum)

    # ------------------------------------------------------------------ saving and resuming
    def save_due(self) -> None:
        """What --save_model_every, --log_samples_every and --checkpointing_steps ask for at this step."""
        c, step = self.config, self.global_step
        if c.save_model_every and step % c.save_model_every == 0 and step < self.total_steps:
            self.save(self.pipeline_dir / f"step_{step}", final=False)
        if c.log_samples_every and step % c.log_samples_every == 0 and step < self.total_steps:
            self.log_samples()
        # last: the checkpoint then holds every generator exactly as the next step finds it
        if c.checkpointing_steps and step % c.checkpointing_steps == 0 and step < self.total_steps:
            self.save_checkpoint()

    def finish(self) -> None:
        """train_state.json (the step and every process's weight checksum), the trackers closed, the Hub upload."""
        acc = self.accelerator
        checksums = weights_checksums(acc, acc.unwrap_model(self.unet))
        if acc.is_main_process:
            state = {"global_step": self.global_step, "num_processes": acc.num_processes,
                     "weights_checksum_per_process": checksums}
            runs.write_train_state(self.output_dir, state)
        self._release()
        if self.config.push_to_hub and acc.is_main_process:
            from ddpmkit.hub import push_to_hub

            push_to_hub(self.pipeline_dir, self.config.hub_model_id, private=self.config.hub_private)

    def _release(self) -> None:
        """Flush the trackers and, with several processes, free the DDP wrapper before the process group goes."""
        acc = self.accelerator
        if acc.num_processes > 1:
            # Freed later (when the Trainer goes), the DDP Reducer drops the group's last reference with the GIL
            # held, and gloo's destructor then waits for a worker thread that needs the GIL: torchrun hung at exit
            # now and then (pytorch/pytorch#56297). So the Trainer's reference goes first, then accelerate's.
            self.unet = acc.unwrap_model(self.unet)
            acc.free_memory()
        acc.end_training()  # destroys the process group


@contextlib.contextmanager
def _stop_on_signals(trainer: Trainer):
    """SIGINT / SIGTERM set `trainer.stop_signal`: the loop saves a checkpoint after the step and stops; a second
    one acts at once."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return
    previous = {}

    def handler(signum, frame):
        trainer.stop_signal = signum
        signal.signal(signum, previous[signum])

    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _flat(d: dict) -> dict:
    """Hyperparameters as the trackers accept them: numbers, strings and booleans only."""
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool))}
