"""Post-hoc EMA while training (`--posthoc_ema`; EDM2 section 3): the `TrainingHook` that keeps power-function EMA
profiles of the UNet's weights and writes snapshots of them, from which `ddpmkit ema` makes the EMA of any length.

The profiles (`phema.PowerFunctionEMA`, one float32 copy of the weights per length) live on the training device and
are updated after every optimizer step on every process (a skipped step counts: its weights are held for it). Every
--posthoc_ema_every steps and at the end, the main process writes one snapshot file to OUTPUT_DIR/phema/ (complete
or absent: `runs.write_phema_snapshot`); the file also holds the UNet and scheduler configs and the run's config, so
that the snapshots alone make a pipeline. The profiles and their step are in every checkpoint, so a resumed run
continues them exactly; it first removes the snapshots written after its checkpoint (it writes them again).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from ddpmkit import phema, runs
from ddpmkit.config import TrainConfig
from ddpmkit.errors import UserError
from ddpmkit.train_parts import TrainingHook, raise_if_failed

logger = logging.getLogger(__name__)

# Without --posthoc_ema_every, a snapshot every (steps / 16): 16 evenly spaced snapshots of the two profiles match
# any length from 0.03 to 0.2 within 4% of its weighting (0.4% at 0.07; `phema.fit_error`, docs/ema.md), and 32
# only bring that to 1% for twice the disk.
SNAPSHOTS_PER_RUN = 16


class PostHocEMA(TrainingHook):
    """Power-function EMAs of the UNet's parameters at each --posthoc_ema_sigma_rels length, with snapshots."""

    def __init__(self, config: TrainConfig, unet, accelerator):
        _check_resume(config)
        model = accelerator.unwrap_model(unet)
        self.names = [name for name, _ in model.named_parameters()]
        sigma_rels = phema.parse_sigma_rels(config.posthoc_ema_sigma_rels, "--posthoc_ema_sigma_rels")
        self.ema = phema.PowerFunctionEMA(model.parameters(), sigma_rels)  # on the device the weights are on
        self.config, self.accelerator, self.output_dir = config, accelerator, Path(config.output_dir)
        self.started_at = 0  # the step this process's run started from (a resume: its checkpoint's)
        self.begun = False
        self.written = None  # the step of the last snapshot written
        self.logged = False

    # ------------------------------------------------------------------ in every checkpoint
    def state_dict(self) -> dict:
        return self.ema.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state)
        self.started_at = self.ema.step

    # ------------------------------------------------------------------ the hook
    def after_step(self, trainer) -> None:
        self.ema.update()
        self._begin()
        if self.ema.step % self.every(trainer.total_steps) == 0:
            self.write(trainer)

    def finish(self, trainer) -> None:
        """The snapshot of the last step, when the interval did not land on it."""
        self._begin()
        if self.written != self.ema.step:
            self.write(trainer)

    def every(self, total_steps: int) -> int:
        return self.config.posthoc_ema_every or max(1, math.ceil(total_steps / SNAPSHOTS_PER_RUN))

    def _begin(self) -> None:
        """Once: the snapshots after the step this run starts from are of a run that was stopped (or of an older
        run in this folder): removed, as loss.jsonl drops its steps."""
        if not self.begun and self.accelerator.is_main_process:
            runs.drop_phema_snapshots(self.output_dir, after=self.started_at)
        self.begun = True

    def write(self, trainer) -> None:
        """The profiles at this step to phema/step_N.safetensors (main process); every process learns if it failed."""
        step, error, path = self.ema.step, None, None
        if self.accelerator.is_main_process:
            try:
                path = runs.write_phema_snapshot(self.output_dir, step, self.ema.snapshot(self.names),
                                                 self.metadata(trainer, step))
            except Exception as err:  # noqa: BLE001 - a full disk shows up as OSError, RuntimeError or SafetensorError
                error = err
        raise_if_failed(self.accelerator, error, f"the post-hoc EMA snapshot of step {step} to "
                        f"{runs.phema_dir(self.output_dir)}", trainer.last_checkpoint)
        self.written = step
        if path is not None and not self.logged:
            self.logged = True
            every, total = self.every(trainer.total_steps), trainer.total_steps
            count = total // every + (total % every > 0)
            size = path.stat().st_size / 1e6
            logger.info("post-hoc EMA: %d profiles (sigma_rel %s), a snapshot every %d steps and at the end to %s, "
                        "%.1f MB each (%d for this run: %.0f MB)", len(self.ema.sigma_rels),
                        ", ".join(f"{s:g}" for s in self.ema.sigma_rels), every, path.parent, size, count,
                        size * count)

    def metadata(self, trainer, step: int) -> dict[str, str]:
        """What makes a snapshot a pipeline on its own: the UNet's and scheduler's configs, the class names and the
        data (as in ddpmkit.json), the run's config; and its step and lengths."""
        c, classes = self.config, trainer.num_class_embeds
        model = {"class_names": trainer.data.class_names if classes else None,
                 "null_class": classes - 1 if classes else None, "base_model": c.init_from, "dataset": c.dataset}
        return {"format": phema.FORMAT, "step": str(step), "sigma_rels": json.dumps(self.ema.sigma_rels),
                "unet_config": self.accelerator.unwrap_model(trainer.unet).to_json_string(),
                "scheduler_config": trainer.noise_scheduler.to_json_string(), "ddpmkit": json.dumps(model),
                "train_config": json.dumps(c.to_dict())}


def _check_resume(config: TrainConfig) -> None:
    """A checkpoint of a run without --posthoc_ema has no profiles to continue: one line before anything loads."""
    which = config.resume_from_checkpoint
    if not which:
        return
    if which == "latest":
        run = Path(config.output_dir)
        if not runs.complete_checkpoints(runs.checkpoints_dir(run)):
            return  # nothing to resume: a new run
    else:
        run = Path(which).parent.parent  # OUTPUT_DIR/checkpoints/step_N
    before = runs.read_train_config(run)
    if before and not before.get("posthoc_ema"):
        raise UserError(f"the checkpoint to resume in {run} was saved by a run without --posthoc_ema, so it has no "
                        "EMA profiles to continue: resume without --posthoc_ema, or start a new run")
