"""The Trainer's saving and resuming: the pipeline folders it writes (complete, or the previous one kept), the
checkpoints that hold the whole training state, and resuming from one as the run it replaces.

`SaveAndResume` is mixed into `trainer.Trainer` and reads the attributes its `__init__` sets (accelerator, unet,
ema, noise_scheduler, config, data, batches, generator, losses, loss_log, hooks, global_step, ...); the files
themselves are `ddpmkit.runs`'s.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ddpmkit import runs
from ddpmkit.data import derive_seed
from ddpmkit.images import plot_loss_curve
from ddpmkit.train_parts import raise_if_failed, read_checkpoint, sample_grid, training_pipeline, write_checkpoint

logger = logging.getLogger("ddpmkit.trainer")  # the Trainer's own log lines, under its name as before


class SaveAndResume:
    """save (a DDPMPipeline folder), save_checkpoint (the training state), resume (from one), log_samples (a grid)."""

    def log_samples(self) -> Path | None:
        """A grid from the model being trained (`sample_scheduler` at `sample_steps`, seed 0), also to the trackers."""
        if not self.accelerator.is_main_process:
            return None
        path = self.output_dir / "samples" / f"step_{self.global_step:06d}.png"
        return sample_grid(self.pipeline(), self.config, path, self.accelerator.trackers, self.global_step)

    def pipeline(self):
        """The model being trained as a DDPMPipeline (EMA weights when --use_ema), on the training device."""
        return training_pipeline(self.accelerator.unwrap_model(self.unet), self.noise_scheduler, self.ema)

    def save(self, folder: Path, final: bool = True) -> Path:
        """A loadable DDPMPipeline (model_index.json, unet/, scheduler/) with ddpmkit.json, train_config.json and a
        model card; the final one also with the loss curve and a sample grid. Complete, or the previous one kept."""
        error = None
        if self.accelerator.is_main_process:
            try:
                runs.save_staged(folder, lambda staged: self._write_pipeline(staged, folder, final))
            except Exception as err:  # noqa: BLE001 - a full disk shows up as OSError, RuntimeError or SafetensorError
                error = err
        raise_if_failed(self.accelerator, error, f"the pipeline of step {self.global_step} to {folder}",
                        self.last_checkpoint)
        if self.accelerator.is_main_process:
            logger.info("saved pipeline (step %d) to %s", self.global_step, folder)
        return folder

    def _write_pipeline(self, staged: Path, folder: Path, final: bool) -> None:
        from ddpmkit.hub import write_model_card

        self.pipeline().save_pretrained(staged)
        classes = self.num_class_embeds
        runs.write_meta(staged, {"class_names": self.data.class_names if classes else None,
                                 "null_class": classes - 1 if classes else None, "base_model": self.config.init_from,
                                 "dataset": self.config.dataset, "step": self.global_step,
                                 "train_config": self.config.to_dict()})
        runs.write_train_config(staged, self.config.to_dict())  # the run's config beside the weights
        records = self.loss_log.finite()
        if final and records:
            plot_loss_curve([r["step"] for r in records], [r["loss"] for r in records],
                            self.output_dir / "loss_curve.png")
        grid = self.log_samples() if final else None
        if grid is not None:
            shutil.copy(grid, staged / "samples.png")
        write_model_card(folder, self.config, sample_grid="samples.png" if final else None, losses=records,
                         staged=staged)
        for hook in self.hooks:
            hook.add_to_pipeline(self, staged, final)

    def save_checkpoint(self) -> Path:
        """Full training state (weights, optimizer, LR schedule, EMA, step, batch position, every generator) written
        to a staging folder, then renamed: a `checkpoints/step_*` folder is complete, or it does not exist."""
        final = runs.checkpoints_dir(self.output_dir) / runs.checkpoint_name(self.global_step)
        own = {"batches": self.batches.state_dict(), "generator": self.generator.get_state(),
               "skipped_steps": self.losses.skipped_steps}  # what this process needs to continue the same sequence
        error = write_checkpoint(self.accelerator, final, own, self.global_step, self.config.checkpoints_total_limit)
        raise_if_failed(self.accelerator, error, f"the checkpoint of step {self.global_step} to {final.parent}",
                        self.last_checkpoint)
        self.last_checkpoint = final
        if self.accelerator.is_main_process:
            logger.info("checkpoint saved to %s", final)
        return final

    def resume(self) -> None:
        """Continue from the checkpoint --resume_from_checkpoint names: weights, optimizer, LR schedule, EMA, step,
        and (with the same number of processes) the batch position and every generator."""
        acc = self.accelerator
        path = runs.checkpoint_to_resume(self.output_dir, self.config.resume_from_checkpoint, self.pipeline_dir,
                                         acc.is_main_process)
        if path is None:
            return
        self.global_step, own = read_checkpoint(acc, path)
        self.last_checkpoint = path
        if self.ema is not None:  # EMAModel.load_state_dict puts the shadow weights on the CPU
            self.ema.to(acc.device)
        if own is not None:
            self.batches.load_state_dict(own["batches"])
            self.generator.set_state(own["generator"])
            self.losses.skipped_steps = int(own.get("skipped_steps", 0))
        else:  # another number of processes: the same position in the data, new seeds
            micro_batches = self.global_step * self.config.grad_accumulation_steps
            self.batches.epoch, self.batches.position = divmod(micro_batches, len(self.batches))
            self.generator.manual_seed(derive_seed(self.batches.seed, acc.process_index, 2, self.global_step))
        if acc.is_main_process and self.loss_log.path.exists():  # drop steps logged after the checkpoint
            kept = self.loss_log.keep_until(self.global_step)
            self.train_s_before = float(kept[-1].get("train_s", 0.0)) if kept else 0.0
        logger.info("resumed from %s at step %d (epoch %d, batch %d of %d)", path, self.global_step,
                    self.batches.epoch, self.batches.position, len(self.batches))
