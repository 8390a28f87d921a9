"""Run configuration: one dataclass per command, each default on its own line with the reason.

The CLI is generated from these fields (`metadata["help"]`, `metadata["aliases"]`), so a flag and
the Python keyword argument always have the same name.
"""
from __future__ import annotations

import dataclasses
import json
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ddpmkit import devices
from ddpmkit.errors import UserError


def opt(default: Any, help: str, aliases: tuple[str, ...] = (), choices: tuple | None = None, **kw):
    """A dataclass field that also carries its CLI help, aliases and choices."""
    meta = {"help": help, "aliases": aliases, "choices": choices, **kw}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


SCRATCH_IMAGE_SIZE = 32  # --image_size of a run from scratch when not given (the course's); a fine-tune: its model's
DEFAULT_MODEL = "emoji32"  # the bundled model: the default --model of sample and eval (ddpmkit/pretrained/)
MIXED_PRECISION = ("no", "bf16", "fp16")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
BETA_SCHEDULES = ("squaredcos_cap_v2", "linear", "scaled_linear")
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "cosine",
    "cosine_with_restarts",
    "linear",
    "polynomial",
)


# post-hoc EMA lengths (--posthoc_ema_sigma_rels, ddpmkit ema/eval --sigma_rel): sigma_rel -> 1 / sqrt(12) = 0.289
# as the power function's gamma -> 0 (a plain average of all steps)
MAX_SIGMA_REL = 0.28
MAX_SEED = 2**32 - 1  # numpy's range, which accelerate's set_seed and dpm++sde's Brownian tree need


def check_seed(seed: int | None) -> None:
    """A seed is an integer from 0 to MAX_SEED (None: not given)."""
    if seed is not None and not (isinstance(seed, numbers.Integral) and 0 <= seed <= MAX_SEED):
        raise UserError(f"--seed must be an integer from 0 to {MAX_SEED} (got {seed!r})")


def parse_sigma_rels(value: str | Iterable[float], flag: str = "--sigma_rel") -> list[float]:
    """'0.05,0.10' (or numbers) -> [0.05, 0.1]: at least one, each in (0, 0.28), none twice; else one line naming
    `flag`."""
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        sigma_rels = [float(item) for item in items if str(item).strip()]
    except ValueError:
        raise UserError(f"{flag} takes lengths separated by commas, such as 0.05,0.10 (got {value!r})") from None
    if not sigma_rels:
        raise UserError(f"{flag} needs at least one length, such as 0.05,0.10")
    for s in sigma_rels:
        if not 0 < s < MAX_SIGMA_REL:
            raise UserError(f"{flag}: each length must be between 0 and {MAX_SIGMA_REL} (got {s:g})")
    if len(set(sigma_rels)) < len(sigma_rels):
        raise UserError(f"{flag} gives a length twice ({value})")
    return sigma_rels


@dataclass
class TrainConfig:
    """Everything `ddpmkit train` (and `ddpmkit finetune`) needs; the defaults are the course's."""

    # --- data ---
    dataset: str = opt("emoji", "built-in 'emoji' (or 'emoji:CATEGORY'), 'fashion_mnist', a Hub dataset id, an image folder, "
                       "a save_to_disk folder, or a .parquet/.arrow file", aliases=("--dataset_name",))
    split: str = opt("train", "dataset split to read (Hub and save_to_disk datasets)")
    image_column: str | None = opt(None, "image column; found automatically when it is 'image', 'img' or the only image feature")
    image_size: int | None = opt(None, "training resolution: images are resized to image_size x image_size "
                                 f"(default: {SCRATCH_IMAGE_SIZE} from scratch, as in the course; a fine-tune: the "
                                 "start model's own size)", aliases=("--resolution",))
    channels: int = opt(3, "3 for RGB, 1 for grayscale", choices=(1, 3))
    random_flip: bool = opt(True, "random horizontal flip, per sample and per batch (the course's RandomHorizontalFlip)")
    cache_dir: str | None = opt(None, "keep the decoded, resized uint8 images on disk here, so the next run skips decoding")
    cache_max_gb: float | None = opt(None, "most memory the decoded images may take; beyond it they are decoded from "
                                     "the source for every batch (default: half the available memory)")
    max_images: int | None = opt(None, "use at most this many images (handy for quick tries)")
    class_column: str | None = opt(None, "train a class-conditioned model on this label column ('label' for the "
                                   "emoji categories, fashion_mnist's classes and an image folder's sub-folders)")
    cond_drop_prob: float = opt(0.1, "share of labels replaced by the null class in training, for classifier-free guidance")
    # --- model ---
    preset: str = opt("tiny", "UNet2DModel preset: 'tiny' (CPU-sized), 'small', or 'course32' (the course's exact model)")
    unet_config: str | None = opt(None, "a JSON file with any UNet2DModel config; overrides --preset")
    init_from: str | None = opt(None, "start from this pretrained pipeline (Hub id or folder) instead of a new UNet: fine-tuning",
                                aliases=("--start_model",))
    beta_schedule: str = opt("squaredcos_cap_v2", "noise schedule of a new model (the course trains with squaredcos_cap_v2)",
                             choices=BETA_SCHEDULES)
    num_train_timesteps: int = opt(1000, "number of diffusion steps T of a new model")
    prediction_type: str | None = opt(None, "what the UNet predicts: epsilon (the course), sample or v_prediction; "
                                      "a fine-tune keeps the pretrained model's unless set", choices=PREDICTION_TYPES)
    snr_gamma: float | None = opt(None, "Min-SNR-gamma loss weighting (Hang et al. 2023; diffusers' training scripts "
                                  "use 5.0): each timestep's loss is weighted by min(SNR, gamma)/SNR (epsilon) or "
                                  "min(SNR, gamma)/(SNR + 1) (v_prediction); off by default, as in the course")
    # --- optimisation ---
    batch_size: int = opt(64, "images per optimizer micro-batch and process (the course uses 64)",
                          aliases=("--train_batch_size",))
    lr: float | None = opt(None, "AdamW learning rate; 4e-4 from scratch and 1e-5 for a fine-tune, as in the course",
                           aliases=("--learning_rate",))
    num_epochs: int | None = opt(None, "passes over the data (ignored when --max_steps is given)")
    max_steps: int | None = opt(None, "optimizer steps to run; without it and --num_epochs: 30 epochs")
    grad_accumulation_steps: int = opt(1, "micro-batches per optimizer step; the loss is divided by it",
                                       aliases=("--gradient_accumulation_steps",))
    lr_scheduler: str = opt("constant", "learning-rate schedule (diffusers' get_scheduler)", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = opt(0, "linear warm-up steps of the learning rate")
    adam_weight_decay: float = opt(1e-2, "AdamW weight decay (PyTorch's default)")
    max_grad_norm: float = opt(1.0, "clip the gradient norm to this (0 turns it off)")
    use_ema: bool = opt(False, "keep an exponential moving average of the weights; the saved pipeline holds the EMA weights")
    ema_max_decay: float = opt(0.9999, "largest EMA decay; it warms up from 0 as in diffusers' train_unconditional.py")
    skip_nonfinite: int = opt(0, "skip up to this many steps whose loss is NaN or infinite (no update) instead of "
                              "stopping at the first; costs one read of the loss before each update")
    mixed_precision: str = opt("no", "no, bf16 or fp16 (fp16 needs a GPU); bf16 on a CPU without native bf16 "
                               "(no avx512_bf16/AMX) falls back to fp32 with a warning: it is slower there",
                               choices=MIXED_PRECISION)
    # off by default: the captured step's gain on a GPU is not measured yet (docs/performance.md)
    compile: bool = opt(False, "speed the training step up. On a CUDA GPU: the whole step (forward, backward, "
                        "clipping, AdamW, EMA) is captured in CUDA graphs after 3 eager steps and replayed; batches "
                        "have a static shape, so each epoch's short last batch is left out (logged); with several "
                        "processes, --grad_accumulation_steps or fp16 it compiles as on a CPU. On a CPU: "
                        "torch.compile of the UNet's forward, a one-time compile of minutes (a C++ compiler is "
                        "needed), measured 0.92x eager on 2 cores (docs/performance.md)")
    channels_last: bool = opt(False, "channels-last memory format for the UNet's weights and activations "
                              "(docs/performance.md: measured on a CPU it does not speed up training)")
    device: str = opt("auto", devices.HELP + "; several GPUs: accelerate launch or torchrun", choices=devices.CHOICES)
    seed: int | None = opt(0, "seed for the model's initial weights, data order, flips, timesteps and noise")
    # --- the captured training step (--compile on CUDA; ddpmkit.capture) ---
    compile_kernels: bool = opt(False, "with --compile on a CUDA GPU: also compile the UNet with torch.compile "
                                "(inductor's fused kernels) inside the captured step; a one-time compile of a "
                                "minute or more; its gain is not measured yet (docs/performance.md)")
    # --- post-hoc EMA ---
    posthoc_ema: bool = opt(False, "EDM2's post-hoc EMA (Karras et al. 2024): keep power-function EMAs of the weights "
                            "at the --posthoc_ema_sigma_rels lengths and write snapshots of them to OUTPUT_DIR/phema, "
                            "from which 'ddpmkit ema' makes the EMA of any length after training and 'ddpmkit eval "
                            "--sigma_rel' compares lengths by FID; costs one copy of the weights per length in memory "
                            "and on disk per snapshot (docs/ema.md)")
    posthoc_ema_every: int | None = opt(None, "write a post-hoc EMA snapshot every N optimizer steps, and one at the "
                                        "end (default: the run's steps / 16, rounded up: 16 snapshots match any "
                                        "length from 0.03 to 0.2 within 4 percent of its weighting, 0.4 at 0.07; more "
                                        "fit better and take more disk; docs/ema.md)")
    posthoc_ema_sigma_rels: str = opt("0.05,0.10", "the EMA lengths tracked while training, as sigma_rel (the "
                                      "standard deviation of the averaging window relative to the steps so far; "
                                      "EDM2's two): lengths between and near them are reconstructed best")
    # --- quality during training ---
    eval_every: int = opt(0, "every N optimizer steps (and at the last) sample --eval_images images and log their FID "
                          "and KID against the training data: OUTPUT_DIR/eval.jsonl, TensorBoard/W&B, the progress "
                          "line, with the cost (0: off). On a 2-core CPU, tiny at 32x32, batch 64: an evaluation costs "
                          "about 66 training steps (EMA and raw weights), so N >= 660 keeps it under a tenth of the "
                          "training time; the log says so when it is more (docs/performance.md)")
    eval_images: int = opt(200, "images sampled at each evaluation, and training images as its reference "
                           "(the floor at 200 is shipped for emoji 32x32: FID 94; a trend, not a figure to quote)")
    eval_scheduler: str = opt("deis", "sampler of the evaluations (deis: 15 model calls, the fast one of "
                              "docs/samplers.md; every evaluation samples from the same noise, seed 0, so the figures "
                              "move with the model)")
    eval_steps: int | None = opt(None, "steps of --eval_scheduler (default: its own, 15 for deis)")
    keep_best: bool = opt(False, "keep the pipeline with the lowest FID so far as OUTPUT_DIR/best (needs --eval_every; "
                          "the final pipeline is saved as usual)")
    # --- output ---
    output_dir: str = opt("runs/ddpm", "run folder: the final pipeline, logs, sample grids and checkpoints")
    model_save_name: str | None = opt(None, "save the pipeline in output_dir/model_save_name instead of output_dir itself")
    log_every: int = opt(10, "read the loss from the device every N steps (one host synchronisation per N steps, "
                         "not per step; loss.jsonl still gets every step; a stop signal waits for the next read "
                         "with several processes)")
    log_samples_every: int = opt(0, "write a grid of samples every N steps (0: only at the end)")
    save_model_every: int = opt(0, "save a loadable pipeline every N steps at {pipeline dir}/step_N (0: off)")
    checkpointing_steps: int = opt(0, "save the full training state every N steps to output_dir/checkpoints (0: off)")
    checkpoints_total_limit: int = opt(2, "keep only this many newest training-state checkpoints")
    resume_from_checkpoint: str | None = opt(None, "'latest' (the newest complete checkpoint; none yet: start a new "
                                             "run) or a checkpoint folder: continue a run that stopped, exactly")
    num_sample_images: int = opt(16, "images in each logged sample grid")
    sample_scheduler: str = opt("ddim", "scheduler for the logged sample grids")
    sample_steps: int = opt(40, "steps for the logged sample grids (DDIM 40, as in the course's fine-tuning script)")
    wandb_project: str | None = opt(None, "also log to this Weights & Biases project (WANDB_MODE=offline works)")
    push_to_hub: bool = opt(False, "upload the final pipeline to the Hub")
    hub_model_id: str | None = opt(None, "Hub repo id for --push_to_hub (user/name)")
    hub_private: bool = opt(False, "create the Hub repo as private")

    def validate(self) -> "TrainConfig":
        """Check values a user can get wrong; raise UserError with what to do. Fills in a from-scratch run's
        --image_size (a fine-tune's is its model's: train_parts.load_pretrained)."""
        if self.image_size is None and not self.init_from:
            self.image_size = SCRATCH_IMAGE_SIZE
        positive = ("image_size", "batch_size", "grad_accumulation_steps", "num_train_timesteps", "num_sample_images",
                    "sample_steps", "checkpoints_total_limit", "log_every")
        for name in positive:
            value = getattr(self, name)
            if value is not None and value < 1:  # None: a fine-tune's size, read from its model later
                raise UserError(f"--{name} must be at least 1 (got {value})")
        for name in ("max_steps", "num_epochs", "max_images"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name} must be at least 1 (got {value})")
        for name in ("log_samples_every", "save_model_every", "checkpointing_steps", "lr_warmup_steps", "skip_nonfinite"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be 0 or more (got {getattr(self, name)})")
        if self.compile and self.device != "cuda" and not torch_cuda_available() and not _cxx_compiler():
            raise UserError("--compile on a CPU needs a C++ compiler (g++ or clang++): install one "
                            "(apt-get install g++) or leave --compile off")
        if self.compile_kernels and not self.compile:
            raise UserError("--compile_kernels compiles inside the captured step: add --compile")
        check_seed(self.seed)
        if self.lr is not None and not self.lr > 0:
            raise UserError(f"--lr must be a positive number (got {self.lr})")
        if self.cache_max_gb is not None and not self.cache_max_gb > 0:
            raise UserError(f"--cache_max_gb must be a positive number of gigabytes (got {self.cache_max_gb})")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise UserError(f"--snr_gamma must be a positive number, such as 5.0 (got {self.snr_gamma})")
        if self.max_grad_norm < 0:
            raise UserError(f"--max_grad_norm must be 0 (off) or more (got {self.max_grad_norm})")
        if self.device.startswith("cuda:"):
            raise UserError(f"--device {self.device}: training takes one GPU per process; choose it with "
                            f"CUDA_VISIBLE_DEVICES={self.device[5:]} and --device cuda (several GPUs: accelerate launch)")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise UserError(f"--{f.name} must be one of {', '.join(map(str, choices))} (got {value!r})")
        if not 0 <= self.cond_drop_prob < 1:
            raise UserError(f"--cond_drop_prob must be in [0, 1) (got {self.cond_drop_prob})")
        if self.posthoc_ema:
            parse_sigma_rels(self.posthoc_ema_sigma_rels, "--posthoc_ema_sigma_rels")
            if self.posthoc_ema_every is not None and self.posthoc_ema_every < 1:
                raise UserError(f"--posthoc_ema_every must be at least 1 (got {self.posthoc_ema_every})")
        elif self.posthoc_ema_every is not None or self.posthoc_ema_sigma_rels != "0.05,0.10":
            raise UserError("--posthoc_ema_every and --posthoc_ema_sigma_rels need --posthoc_ema")
        self._validate_evaluation()
        if self.push_to_hub and not self.hub_model_id:
            raise UserError("--push_to_hub needs --hub_model_id user/name")
        return self

    def _validate_evaluation(self) -> None:
        """--eval_every and its options (quality during training)."""
        from ddpmkit.schedulers import AUTO, scheduler_names

        if self.eval_every < 0:
            raise UserError(f"--eval_every must be 0 (off) or more (got {self.eval_every})")
        if self.eval_images < 4:  # precision and recall compare each image with its 3 nearest
            raise UserError(f"--eval_images must be at least 4 (got {self.eval_images})")
        if self.eval_steps is not None and self.eval_steps < 1:
            raise UserError(f"--eval_steps must be at least 1 (got {self.eval_steps})")
        if self.eval_scheduler not in (AUTO, *scheduler_names()):
            raise UserError(f"--eval_scheduler must be one of {AUTO}, {', '.join(scheduler_names())} "
                            f"(got {self.eval_scheduler!r})")
        if self.keep_best and not self.eval_every:
            raise UserError("--keep_best needs --eval_every N: the best pipeline is chosen by the FID measured "
                            "every N steps")

    def learning_rate(self) -> float:
        """--lr, else the course's two learning rates: 4e-4 from scratch, 1e-5 for a fine-tune."""
        return self.lr if self.lr is not None else (1e-5 if self.init_from else 4e-4)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


# `ddpmkit finetune`: its own defaults where they differ from TrainConfig's (a small fine-tune that fits a CPU)
FINETUNE_DEFAULTS = {"output_dir": "runs/finetune", "model_save_name": "finetuned", "batch_size": 8, "num_epochs": 2}


def make_config(cls, overrides: dict) -> Any:
    """Build a config dataclass from keyword arguments, with a clear error for an unknown name."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise UserError(f"unknown option(s) {', '.join(unknown)} for {cls.__name__}")
    return cls(**overrides)


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _cxx_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend would call (CXX, else c++, g++ or clang++ on PATH)."""
    import shutil

    return next((found for name in (os.environ.get("CXX"), "c++", "g++", "clang++") if name
                 and (found := shutil.which(name))), None)
