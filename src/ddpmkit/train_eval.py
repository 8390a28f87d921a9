"""Quality during training (--eval_every, --keep_best): a `trainer.TrainingHook` that scores the model being trained.

Every --eval_every steps, and at the last, the main process samples --eval_images images with a fast sampler
(--eval_scheduler, DEIS 15 steps by default; seed 0 every time, so the figures move with the model, not the noise)
from the EMA weights and from the raw ones (with --use_ema: a run shows when the EMA has caught up), and scores
them with FID and KID against the training data: --eval_images training images drawn as `ddpmkit eval` draws
its reference, so their features come from (and go to) the same cache, and the floor at that count is the one
`ddpmkit eval` prints. Each evaluation is a line of OUTPUT_DIR/eval.jsonl (`runs.EvalLog`), scalars for the
trackers (eval/fid, eval/kid, ...), the progress line's fid and a log line with its cost. With --keep_best the
pipeline with the lowest FID is saved as OUTPUT_DIR/best (a staged save: complete or absent), its figures in its
model card. The history and the best so far are in every checkpoint (`state_dict`), so a resume keeps them and
drops what was logged after its checkpoint, as loss.jsonl does.

Several processes: only the main one evaluates. The others wait on a heartbeat of one-number broadcasts that the
main process sends between pieces of work (a sampler step, 50 images' features), never on one long collective:
an evaluation of any length stays inside the process group's timeout (torch's default for gloo: 30 minutes) as
long as each piece does (tests/test_train_eval.py: 6 s of work under a 3 s timeout).
"""
from __future__ import annotations

import copy
import logging
import math
import time
from typing import Callable

import numpy as np
import torch

from ddpmkit import runs
from ddpmkit.config import TrainConfig
from ddpmkit.errors import UserError
from ddpmkit.train_parts import TrainingHook

logger = logging.getLogger(__name__)

CHUNK = 50  # images per feature call between two heartbeats (the Inception's own batch)
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # as `ddpmkit eval`
ADVICE_SHARE = 0.1  # above this share of the training time, the log says which --eval_every keeps it near a tenth
FIGURES = ("fid", "kid", "kid_std", "precision", "recall")
# what the main process broadcasts while it works alone: a heartbeat, then how the work ended
WORKING, DONE, IMPROVED, FAILED = 0, 1, 2, 3


# ---------------------------------------------------------------------- the main process works, the others wait
class MainProcessWork:
    """Work done on the main process alone, the others waiting on its heartbeat (`beat`, called between pieces of
    the work): each wait is one broadcast, as long as one piece, whatever the work's length."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.flag = torch.zeros(1, device=accelerator.device)

    def _send(self, code: int) -> int:
        """The main process's code, on every process (one broadcast)."""
        from accelerate.utils import broadcast

        self.flag.fill_(code)
        return int(broadcast(self.flag, from_process=0).item())

    def beat(self, *_info) -> None:
        if self.accelerator.num_processes > 1:
            self._send(WORKING)

    def run(self, work: Callable[[Callable], bool]) -> bool:
        """`work(beat)` on the main process; its result (True or False) on every process. An error there raises
        on the others too (one line), so that none waits for ever. The training's generators come out of it as
        they went in: a run with evaluations trains the same weights as one without."""
        device = self.accelerator.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return self._run(work)

    def _run(self, work: Callable[[Callable], bool]) -> bool:
        acc = self.accelerator
        if acc.num_processes == 1:
            return work(self.beat)
        if not acc.is_main_process:
            while (code := self._send(WORKING)) == WORKING:
                pass
            if code == FAILED:
                raise UserError("the evaluation on the main process failed (its error is in its log): fix it, "
                                "then resume with --resume_from_checkpoint latest")
            return code == IMPROVED
        try:
            result = work(self.beat)
        except BaseException:
            self._send(FAILED)
            raise
        self._send(IMPROVED if result else DONE)
        return result


class ChunkedFeatures:
    """A feature extractor run CHUNK images at a time, with a heartbeat after each call (same identity: the same
    cache keys and floors as the extractor itself)."""

    def __init__(self, extractor, beat: Callable):
        self.extractor, self.beat, self.identity = extractor, beat, extractor.identity

    def __call__(self, images: torch.Tensor, progress: bool = False, desc: str = "features") -> np.ndarray:
        parts = []
        for start in range(0, images.shape[0], CHUNK):
            parts.append(self.extractor(images[start:start + CHUNK], progress=False, desc=desc))
            self.beat()
        return np.concatenate(parts)


def training_reference(data, count: int, config: TrainConfig):
    """`count` training images, drawn by the seeded permutation `ddpmkit eval` draws its reference with
    (`evaluation.dataset_images`, seed 0): the same images, so the same cached features and the same floor."""
    from ddpmkit.evaluation import ImageSet

    index = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:count]
    labels = data.labels[index] if data.labels is not None else None
    describe = {"dataset": config.dataset, "split": config.split, "image_size": config.image_size,
                "channels": config.channels, "count": len(index), "of": len(data), "selection_seed": 0}
    return ImageSet(data.images[index].contiguous(), labels, None, describe)


# ---------------------------------------------------------------------- the hook
class QualityDuringTraining(TrainingHook):
    """A `trainer.TrainingHook` (built by `trainer.build_hooks` when --eval_every > 0): FID and KID of the model
    being trained every --eval_every steps; with --keep_best, the best pipeline as OUTPUT_DIR/best.

    `features`: the feature extractor (default: the FID Inception, loaded by the main process when it first needs
    it; tests give a cheap one)."""

    def __init__(self, config: TrainConfig, accelerator, features=None):
        self.config, self.accelerator, self.features = config, accelerator, features
        self.records: list[dict] = []  # every evaluation of the run, over resumes (in every checkpoint)
        self.best: dict | None = None  # the record with the lowest FID so far
        self.eval_s = 0.0  # seconds spent evaluating (reference included), over resumes
        self.postfix: dict[str, str] = {}  # for the progress line (Trainer.log_step shows it)
        self.reference = self.reference_features = self.floor = None
        self.resumed_at: int | None = None  # the step of the checkpoint a resume loaded
        self.started = self.advised = self.saving_best = False
        if accelerator.is_main_process and features is None:
            from ddpmkit.evaluation import inception_path

            inception_path()  # without the evaluation extra: one line now, not after N steps

    # -------------------------------------------------------------- in every checkpoint
    def state_dict(self) -> dict:
        return {"records": self.records, "best": self.best, "eval_s": self.eval_s}

    def load_state_dict(self, state: dict) -> None:
        self.records, self.best, self.eval_s = list(state["records"]), state["best"], float(state["eval_s"])
        self.resumed_at = -1  # the step is known once the trainer has it (`_start`)

    # -------------------------------------------------------------- the TrainingHook methods
    def after_step(self, trainer) -> None:
        if not self.started:
            self._start(trainer)
        step = trainer.global_step
        if step % self.config.eval_every and step < trainer.total_steps:
            return
        improved = MainProcessWork(self.accelerator).run(lambda beat: self._evaluate(trainer, beat))
        if improved and self.config.keep_best:
            self.saving_best = True
            try:
                trainer.save(runs.best_pipeline_dir(trainer.output_dir), final=False)
            finally:
                self.saving_best = False

    def add_to_pipeline(self, trainer, staged, final: bool) -> None:
        """The evaluation figures in the model card (best/: the ones it was kept for) and, for best/, in its
        ddpmkit.json (what a resume compares with)."""
        from ddpmkit.hub import save_card

        record = self.best if self.saving_best else (self.records[-1] if self.records else None)
        if record is None:
            return
        card = staged / "README.md"
        save_card(staged, card.read_text() + "\n".join(card_lines(record, self.best, len(self.records),
                                                                  self.saving_best)) + "\n")
        if self.saving_best:
            runs.write_meta(staged, {**runs.read_meta(staged), "evaluation": record})

    def finish(self, trainer) -> None:
        if self.accelerator.is_main_process and self.best is not None:
            kept = f"; kept as {runs.best_pipeline_dir(trainer.output_dir)}" if self.config.keep_best else ""
            logger.info("lowest FID: %.2f at step %d of %d evaluations%s", self.best["fid"], self.best["step"],
                        len(self.records), kept)

    # -------------------------------------------------------------- the work
    def _start(self, trainer) -> None:
        """The history as the checkpoint left it (or a new one), and the reference features, once."""
        self.started = True
        if self.accelerator.is_main_process:
            log = runs.EvalLog(trainer.output_dir)
            if self.resumed_at is None:
                log.clear()  # a fresh run in an old folder starts a new history, as loss.jsonl does
            else:
                self.resumed_at = trainer.global_step - 1
                log.replace(self.records)
                self._adopt_best_on_disk(trainer)
        MainProcessWork(self.accelerator).run(lambda beat: self._prepare(trainer, beat))

    def _prepare(self, trainer, beat) -> bool:
        """The reference: --eval_images training images and their features (from the cache when it has them)."""
        from ddpmkit.evaluation import FeatureCache, Floors, InceptionFeatures, cached_features, floor_key

        c, started = self.config, time.perf_counter()
        if self.features is None:
            self.features = InceptionFeatures(device=self.accelerator.device)
        count = min(c.eval_images, len(trainer.data))
        if count < c.eval_images:
            logger.warning("--eval_images %d: the training data has %d images, so each evaluation uses %d",
                           c.eval_images, len(trainer.data), count)
        self.reference = training_reference(trainer.data, count, c)
        extractor = ChunkedFeatures(self.features, beat)
        self.reference_features, status = cached_features(self.reference, extractor, FeatureCache(), False)
        if trainer.data.source == c.dataset and not c.max_images:  # the whole dataset: its floor applies
            key = floor_key(c.dataset, c.image_size, c.channels, count, c.split, self.features.identity)
            self.floor = Floors().get(key)
        seconds = time.perf_counter() - started
        self.eval_s += seconds
        logger.info("evaluation reference: %d training images, features %s in %.1f s%s", count,
                    "read from the cache" if status == "reused" else "computed (and cached)", seconds,
                    f"; the floor at {count} images: FID {self.floor['fid']:.1f}" if self.floor else "")
        return False

    def _evaluate(self, trainer, beat) -> bool:
        """One evaluation (main process): figures of each set of weights, logged; True when the FID is the lowest."""
        started, step = time.perf_counter(), trainer.global_step
        record = {"step": step, "train_s": round(trainer.train_s, 1), "images": len(self.reference),
                  "weights": "ema" if trainer.ema is not None else "raw"}
        for prefix, pipe in self._pipelines(trainer):
            record.update({prefix + k: v for k, v in self._score(pipe, beat).items()})
        if self.floor:
            record.update(floor_fid=self.floor["fid"], floor_kid=self.floor["kid_mean"])
        seconds = time.perf_counter() - started
        self.eval_s += seconds
        run_s = trainer.train_s + seconds  # the run's wall clock so far, this evaluation included
        # milliseconds: a small evaluation on a fast CPU takes under 0.05 s, which would round to 0.0
        record.update(eval_s=round(seconds, 3), eval_share=round(self.eval_s / run_s, 4))
        self.records.append(record)
        runs.EvalLog(trainer.output_dir).append(record)
        self.accelerator.log({f"eval/{k}": v for k, v in record.items() if _is_scalar(k, v)}, step=step)
        improved = record["fid"] is not None and (self.best is None or record["fid"] < self.best["fid"])
        if improved:
            self.best = record
        self.postfix = {"fid": "n/a" if record["fid"] is None else f"{record['fid']:.1f}"}
        logger.info(log_line(record, run_s))
        self._advise(trainer, seconds, run_s)
        return improved

    def _pipelines(self, trainer) -> list[tuple[str, object]]:
        """('', the weights the pipeline saves) and, with --use_ema, ('raw_', the raw weights): copies, so that
        sampling never touches the weights being trained."""
        from diffusers import DDPMPipeline

        raw = DDPMPipeline(unet=copy.deepcopy(self.accelerator.unwrap_model(trainer.unet)),
                           scheduler=trainer.noise_scheduler)
        return [("", raw)] if trainer.ema is None else [("", trainer.pipeline()), ("raw_", raw)]

    def _score(self, pipe, beat) -> dict:
        """FID, KID (mean and spread), precision and recall of --eval_images samples (seed 0) of `pipe`, and the
        seconds its sampling and its features took; None for weights that are not finite (a diverged model is never
        kept as the best)."""
        from ddpmkit.evaluation import compute_metrics
        from ddpmkit.images import to_uint8_nchw
        from ddpmkit.sampling import sample

        if not all(torch.isfinite(p).all() for p in pipe.unet.parameters()):
            logger.warning("the weights are not finite: no figures for them")
            return dict.fromkeys(FIGURES)
        c, reference = self.config, self.reference
        labels = reference.labels.tolist() if reference.labels is not None and pipe.unet.config.num_class_embeds \
            else None  # a class-conditioned model: the classes in the data's proportions, as eval --per_class
        started = time.perf_counter()
        out = sample(pipe, scheduler=c.eval_scheduler, steps=c.eval_steps, num_images=len(reference), seed=0,
                     class_labels=labels, device=self.accelerator.device, callback=beat, progress=False)
        sampled = time.perf_counter()
        generated = ChunkedFeatures(self.features, beat)(to_uint8_nchw(out.images))
        m = compute_metrics(self.reference_features, generated, KID_SUBSETS, KID_SUBSET_SIZE)
        return {**dict(zip(FIGURES, (m.fid, m.kid_mean, m.kid_std, m.precision, m.recall))),
                "sampling_s": round(sampled - started, 3), "features_s": round(time.perf_counter() - sampled, 3)}

    def _advise(self, trainer, seconds: float, run_s: float) -> None:
        """Once a run: when evaluating takes more than a tenth of the training time, the --eval_every that would not
        (an evaluation of E seconds every N steps of t seconds: a share E / (N t + E))."""
        share = self.eval_s / run_s
        if self.advised or share <= ADVICE_SHARE or trainer.global_step >= trainer.total_steps:
            return
        self.advised = True
        step_s = max(run_s - self.eval_s, 1e-9) / trainer.global_step
        every = math.ceil(seconds * (1 - ADVICE_SHARE) / ADVICE_SHARE / step_s)
        logger.warning("evaluating takes %.0f%% of the training time so far (%.1f s an evaluation, %.2f s a step): "
                       "--eval_every %d (or fewer --eval_images) would keep it near a tenth", 100 * share, seconds,
                       step_s, every)

    def _adopt_best_on_disk(self, trainer) -> None:
        """A best/ saved after the checkpoint (a kill came later) stays the best until a lower FID replaces it."""
        on_disk = runs.read_meta(runs.best_pipeline_dir(trainer.output_dir)).get("evaluation")
        if on_disk and on_disk.get("fid") is not None and on_disk["step"] > self.resumed_at and (
                self.best is None or on_disk["fid"] < self.best["fid"]):
            logger.info("best/ holds step %d (FID %.2f), saved after the checkpoint: it stays the best until a lower "
                        "FID replaces it", on_disk["step"], on_disk["fid"])
            self.best = on_disk


# ---------------------------------------------------------------------- what is shown
def _is_scalar(key: str, value) -> bool:
    return key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)


def _figures(record: dict, prefix: str = "") -> str:
    if record.get(prefix + "fid") is None:
        return "no figures (weights not finite)"
    return (f"FID {record[prefix + 'fid']:.2f}, KID {record[prefix + 'kid']:.4f} ± "
            f"{record[prefix + 'kid_std']:.4f}")


def log_line(record: dict, run_s: float) -> str:
    """The log's line for one evaluation: the figures of each set of weights, the floor, and the cost."""
    what = f"{_figures(record)} ({record['weights']} weights)"
    if "raw_fid" in record:
        what += f"; raw weights: {_figures(record, 'raw_')}"
    floor = f"; floor FID {record['floor_fid']:.1f}" if "floor_fid" in record else ""
    return (f"step {record['step']}: {what} ({record['images']} images{floor}); evaluation took "
            f"{record['eval_s']:.1f} s, {100 * record['eval_share']:.0f}% of the training time so far "
            f"({run_s:.0f} s)")


def card_lines(record: dict, best: dict | None, evaluations: int, is_best: bool) -> list[str]:
    """The model card's section: the figures of this pipeline's evaluation (for best/: why it was kept)."""
    why = (f"Kept by `--keep_best`: the lowest FID of the {evaluations} evaluations so far." if is_best else
           f"The last of {evaluations} evaluations during training (`--eval_every`).")
    lines = ["", "## Quality during training", "", why, "",
             "| step | weights | FID | KID | images | floor FID |", "|---|---|---|---|---|---|"]
    floor = f"{record['floor_fid']:.1f}" if "floor_fid" in record else "not known"
    for prefix, weights in (("", record["weights"]), ("raw_", "raw")):
        if prefix + "fid" in record and record[prefix + "fid"] is not None:
            lines.append(f"| {record['step']} | {weights} | {record[prefix + 'fid']:.2f} | "
                         f"{record[prefix + 'kid']:.4f} ± {record[prefix + 'kid_std']:.4f} | {record['images']} | "
                         f"{floor} |")
    if best is not None and not is_best and best["step"] != record["step"]:
        lines += ["", f"The lowest FID so far: {best['fid']:.2f} at step {best['step']}."]
    lines += ["", "FID and KID against the training data, from samples of the evaluation's sampler (seed 0); at a "
              "few hundred images FID is biased high (compare it with the floor, and with itself over the run)."]
    return lines
