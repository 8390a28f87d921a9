"""The one training loop (accelerate): from scratch, or fine-tuning when `init_from` names a pipeline.

Per micro-batch, the course's loop: t ~ U{0..T-1} per sample, x_t = add_noise(x0, eps, t),
loss = MSE(unet(x_t, t), target) with target eps (or x0, or v). Only the UNet is optimized; the noise
comes from the model's own scheduler. Checkpoints (`--checkpointing_steps`) are written atomically
and `--resume_from_checkpoint latest` continues a run that was killed.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ddpmkit.config import TrainConfig, make_config
from ddpmkit.data import ImageData, load_image_data, make_dataloader
from ddpmkit.errors import UserError
from ddpmkit.images import bars_enabled, plot_loss_curve, save_grid
from ddpmkit.models import build_unet, check_image_size, load_pipeline, new_noise_scheduler, unet_config_for

logger = logging.getLogger(__name__)

META_FILE = "ddpmkit.json"  # beside model_index.json: class names and how the model was trained


def train(config: TrainConfig | None = None, data: ImageData | None = None, **overrides) -> Path:
    """Train (or fine-tune) a diffusion UNet and save a DDPMPipeline folder; returns its path.

    `ddpmkit.train(dataset="emoji", image_size=32, max_steps=2000, output_dir="runs/emoji32")`.
    Pass `data` to train on images already in memory (an `ImageData`).
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
        if not config.init_from:  # fail on a bad size before spending time on the data
            check_image_size(unet_config_for(config.preset, config.unet_config), config.image_size)
        if config.resume_from_checkpoint not in (None, "latest"):  # a wrong folder fails before the data is read
            self._checkpoint_to_resume()
        self.accelerator = self._make_accelerator()
        # a fine-tune loads its model before the data: a wrong model id fails before a long dataset download
        self.pretrained = self._load_pretrained() if config.init_from else None
        self.data = data if data is not None else self._load_data()
        self.unet, self.noise_scheduler = self._build_model()
        self.global_step = 0
        self.loss_log = self.output_dir / "loss.jsonl"

    # ------------------------------------------------------------------ set up
    def _make_accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        c = self.config
        if c.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise UserError("--mixed_precision fp16 needs a GPU: use bf16 or no on the CPU")
        if c.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda, but no CUDA GPU is visible: use --device cpu or auto")
        trackers = ["tensorboard"]
        if c.wandb_project:
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise UserError("--wandb_project needs the wandb package: pip install wandb") from None
            trackers.append("wandb")
        accelerator = Accelerator(
            mixed_precision=c.mixed_precision,
            gradient_accumulation_steps=c.grad_accumulation_steps,
            cpu=c.device == "cpu",
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
                                   c.cache_dir, c.max_images)
        logger.info("%d training images from %s at %dx%d", len(data), c.dataset, c.image_size, c.image_size)
        return data

    def _load_pretrained(self):
        with self.accelerator.main_process_first():  # one download for all processes
            pipe = load_pipeline(self.config.init_from)
        check_image_size(dict(pipe.unet.config), self.config.image_size)
        return pipe

    def _build_model(self):
        c = self.config
        if c.init_from:
            unet, noise_scheduler = self.pretrained.unet, self.pretrained.scheduler
            if c.prediction_type and c.prediction_type != noise_scheduler.config.prediction_type:
                raise UserError(f"the pretrained model predicts {noise_scheduler.config.prediction_type}; "
                                "a fine-tune cannot change --prediction_type")
            if unet.config.in_channels != c.channels:
                raise UserError(f"the pretrained model has {unet.config.in_channels} channels: use --channels "
                                f"{unet.config.in_channels}")
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
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        c, acc = self.config, self.accelerator
        lr = c.lr if c.lr is not None else (1e-5 if c.init_from else 4e-4)  # the course's two learning rates
        optimizer = torch.optim.AdamW(self.unet.parameters(), lr=lr, weight_decay=c.adam_weight_decay)
        loader = make_dataloader(self.data, c.batch_size, c.random_flip, c.seed, drop_last=False)
        self.ema = EMAModel(self.unet.parameters(), decay=c.ema_max_decay, use_ema_warmup=True, inv_gamma=1.0,
                            power=3 / 4, model_cls=type(self.unet), model_config=self.unet.config) if c.use_ema else None
        self.unet, optimizer, loader = acc.prepare(self.unet, optimizer, loader)
        self.total_steps = self._total_steps(len(loader))
        self.lr_scheduler = get_scheduler(c.lr_scheduler, optimizer, num_warmup_steps=c.lr_warmup_steps,
                                          num_training_steps=self.total_steps)
        acc.register_for_checkpointing(self.lr_scheduler)
        if self.ema is not None:
            self.ema.to(acc.device)
            acc.register_for_checkpointing(self.ema)
        self.optimizer = optimizer
        self._resume()
        if c.seed is not None:
            from accelerate.utils import set_seed

            set_seed(c.seed + self.global_step, device_specific=True)  # different noise on each process
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            c.save(self.output_dir / "train_config.json")
            if self.global_step == 0:  # a fresh run in an old folder starts a new loss log (a resume keeps it)
                self.loss_log.unlink(missing_ok=True)
        acc.init_trackers(c.wandb_project or "ddpmkit", config=_flat(c.to_dict()),
                          init_kwargs={"wandb": {"dir": str(self.output_dir)}})  # wandb/ inside the run folder
        logger.info("training for %d optimizer steps (%d micro-batches of %d per epoch, %d process(es), lr %.1e)",
                    self.total_steps, len(loader), c.batch_size, acc.num_processes, lr)

        bar = tqdm(total=self.total_steps, initial=self.global_step, disable=not bars_enabled(acc.is_local_main_process),
                   desc="training", dynamic_ncols=True)
        started, images_seen, micro_losses = time.perf_counter(), 0, []
        epoch = 0
        while self.global_step < self.total_steps:
            for batch in loader:
                micro_losses.append(self.run_step(batch))
                images_seen += batch["images"].shape[0] * acc.num_processes
                if not acc.sync_gradients:
                    continue
                self.global_step += 1
                loss = acc.gather(torch.stack(micro_losses)).mean().item()
                micro_losses = []
                if not math.isfinite(loss):
                    raise RuntimeError(f"the loss became {loss} at step {self.global_step}: lower --lr")
                rate = images_seen / max(time.perf_counter() - started, 1e-9)
                self.log_step(loss, epoch, rate)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.0f}")
                self._periodic()
                if self.global_step >= self.total_steps:
                    break
            epoch += 1
        bar.close()
        acc.wait_for_everyone()
        final = self.save(self.pipeline_dir)
        self._finish()
        return final

    def run_step(self, batch: dict) -> torch.Tensor:
        """One micro-batch under `accumulate`: forward, backward (loss / accumulation steps), maybe step."""
        acc = self.accelerator
        with acc.accumulate(self.unet):
            loss = self.forward_backward(batch)
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
        noise = torch.randn_like(clean_images)  # eps
        bs = clean_images.shape[0]
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (bs,),
                                  device=clean_images.device).long()  # t ~ U, one per sample
        noisy_images = self.noise_scheduler.add_noise(clean_images, noise, timesteps)  # x_t
        kwargs = {}
        if self.unet_config.num_class_embeds:
            labels = batch["labels"].clone()
            drop = torch.rand(bs, device=labels.device) < self.config.cond_drop_prob
            # the null class, for classifier-free guidance; also for images without a label (-1)
            labels[drop | (labels < 0)] = self.unet_config.num_class_embeds - 1
            kwargs["class_labels"] = labels
        with self.accelerator.autocast():
            model_output = self.unet(noisy_images, timesteps, return_dict=False, **kwargs)[0]
        target = self._target(clean_images, noise, timesteps)
        loss = F.mse_loss(model_output.float(), target.float())
        self.accelerator.backward(loss)
        return loss

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

    # ------------------------------------------------------------------ logging and saving
    def log_step(self, loss: float, epoch: int, images_per_s: float) -> None:
        lr = self.lr_scheduler.get_last_lr()[0]
        self.accelerator.log({"loss": loss, "lr": lr, "epoch": epoch}, step=self.global_step)
        if self.accelerator.is_main_process:
            with self.loss_log.open("a") as f:
                f.write(json.dumps({"step": self.global_step, "loss": loss, "lr": lr, "epoch": epoch,
                                    "images_per_s": round(images_per_s, 2)}) + "\n")

    def _periodic(self) -> None:
        c, step = self.config, self.global_step
        if c.checkpointing_steps and step % c.checkpointing_steps == 0 and step < self.total_steps:
            self.save_checkpoint()
        if c.save_model_every and step % c.save_model_every == 0 and step < self.total_steps:
            self.save(self.pipeline_dir / f"step_{step}", final=False)
        if c.log_samples_every and step % c.log_samples_every == 0 and step < self.total_steps:
            self.log_samples()

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
        """Save a loadable DDPMPipeline (model_index.json, unet/, scheduler/) plus ddpmkit.json and a model card."""
        if self.accelerator.is_main_process:
            pipe = self._pipeline()
            folder.mkdir(parents=True, exist_ok=True)
            pipe.save_pretrained(folder)
            meta = {"class_names": self.data.class_names if self.unet_config.num_class_embeds else None,
                    "null_class": (self.unet_config.num_class_embeds - 1) if self.unet_config.num_class_embeds else None,
                    "base_model": self.config.init_from, "dataset": self.config.dataset, "step": self.global_step,
                    "train_config": self.config.to_dict()}
            (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            self.config.save(folder / "train_config.json")  # the run's config beside the weights
            if final:
                self._write_final_artifacts(folder)
            else:
                from ddpmkit.hub import write_model_card

                write_model_card(folder, self.config, losses=self._loss_records())
            logger.info("saved pipeline (step %d) to %s", self.global_step, folder)
        self.accelerator.wait_for_everyone()
        return folder

    def _write_final_artifacts(self, folder: Path) -> None:
        records = self._loss_records()
        if records:
            plot_loss_curve([r["step"] for r in records], [r["loss"] for r in records], self.output_dir / "loss_curve.png")
        grid = self.log_samples()
        if grid is not None:
            shutil.copy(grid, folder / "samples.png")
        from ddpmkit.hub import write_model_card

        write_model_card(folder, self.config, sample_grid="samples.png", losses=records)

    def _loss_records(self) -> list[dict]:
        return [json.loads(line) for line in self.loss_log.read_text().splitlines()] if self.loss_log.exists() else []

    def save_checkpoint(self) -> Path:
        """Full training state (weights, optimizer, lr schedule, EMA, RNG) written to a temp folder, then renamed."""
        root = self.output_dir / "checkpoints"
        final = root / f"step_{self.global_step:07d}"
        tmp = root / f".tmp_step_{self.global_step:07d}"
        if self.accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))
        if self.accelerator.is_main_process:
            (tmp / "training_state.json").write_text(json.dumps({"global_step": self.global_step}))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in sorted(root.glob("step_*"))[:-self.config.checkpoints_total_limit or None]:
                shutil.rmtree(old)
            logger.info("checkpoint saved to %s", final)
        self.accelerator.wait_for_everyone()
        return final

    def _checkpoint_to_resume(self) -> Path | None:
        """The folder --resume_from_checkpoint names ('latest': the newest one), or None to start from step 0."""
        which = self.config.resume_from_checkpoint
        if not which:
            return None
        if which == "latest":
            found = sorted((self.output_dir / "checkpoints").glob("step_*"))
            if not found:
                logger.info("no checkpoint in %s/checkpoints: starting from the beginning", self.output_dir)
                return None
            return found[-1]
        path = Path(which)
        if not (path / "training_state.json").exists():
            raise UserError(f"{which} is not a ddpmkit checkpoint folder (no training_state.json): use 'latest' "
                            "or a folder under OUTPUT_DIR/checkpoints")
        return path

    def _resume(self) -> None:
        path = self._checkpoint_to_resume()
        if path is None:
            return
        self.accelerator.load_state(str(path))
        if self.ema is not None:  # EMAModel.load_state_dict puts the shadow weights on the CPU
            self.ema.to(self.accelerator.device)
        self.global_step = json.loads((path / "training_state.json").read_text())["global_step"]
        if self.accelerator.is_main_process and self.loss_log.exists():  # drop steps logged after the checkpoint
            kept = [line for line in self.loss_log.read_text().splitlines() if json.loads(line)["step"] <= self.global_step]
            self.loss_log.write_text("".join(line + "\n" for line in kept))
        logger.info("resumed from %s at step %d", path, self.global_step)

    def _finish(self) -> None:
        acc = self.accelerator
        unet = acc.unwrap_model(self.unet)
        checksum = torch.tensor([sum(float(p.detach().double().sum()) for p in unet.parameters())], device=acc.device)
        per_rank = acc.gather(checksum).cpu().tolist()
        if acc.is_main_process:
            state = {"global_step": self.global_step, "num_processes": acc.num_processes,
                     "weights_checksum_per_process": per_rank}
            (self.output_dir / "train_state.json").write_text(json.dumps(state, indent=2) + "\n")
        if acc.num_processes > 1:
            # Free the DDP wrapper while the process group is still registered. Freed later (when the Trainer goes),
            # its Reducer drops the group's last reference with the GIL held, and gloo's destructor then waits for
            # a worker thread that needs the GIL: torchrun hung at exit now and then (pytorch/pytorch#56297).
            self.unet = unet
            acc.free_memory()
        acc.end_training()
        if self.config.push_to_hub and acc.is_main_process:
            from ddpmkit.hub import push_to_hub

            push_to_hub(self.pipeline_dir, self.config.hub_model_id, private=self.config.hub_private)


def _ema_copy(ema, unet):
    """A copy of `unet` holding the EMA weights (the training weights stay untouched)."""
    import copy

    model = copy.deepcopy(unet)
    ema.copy_to(model.parameters())
    return model


def _flat(d: dict) -> dict:
    """Hyperparameters as the trackers accept them: numbers, strings and booleans only."""
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool))}
