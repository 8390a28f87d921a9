"""`ddpmkit` subcommands: parse, validate, call the library (same names as the Python API).

The parser is built here from `arguments` (one flag per config field, the sample and eval flags) and each
subcommand is a function in `commands` that calls the library: nothing here computes anything itself.

A mistake in the input prints one line (`ddpmkit: error: ...`) and exits with status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

from ddpmkit.cli.arguments import (DOCTOR_DESCRIPTION, EMA_DESCRIPTION, EVAL_DESCRIPTION, add_config_arguments,
                                   add_doctor_arguments, add_ema_arguments, add_eval_arguments, add_sample_arguments,
                                   add_schedule_arguments, add_serve_arguments, config_from_args,
                                   scheduler_defaults_text)
from ddpmkit.cli.commands import (cmd_doctor, cmd_ema, cmd_eval, cmd_models, cmd_sample, cmd_schedule, cmd_schedulers,
                                  cmd_serve, cmd_train)
from ddpmkit.config import FINETUNE_DEFAULTS, TrainConfig
from ddpmkit.errors import Interrupted, UserError

__all__ = ["Parser", "build_parser", "config_from_args", "main"]


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and exit status 2."""

    def error(self, message: str):
        raise UserError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ddpmkit", description="Train, fine-tune, sample and guide pixel-space diffusion models.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("train", help="train a diffusion UNet from scratch (or from --init_from)",
                       description="The course's Unit 1 training loop; saves a DDPMPipeline folder.")
    add_config_arguments(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="fine-tune a pretrained pipeline (the course's finetune_model.py)",
                       description="Same loop as 'train', starting from --start_model; lr 1e-5 by default.")
    add_config_arguments(p, TrainConfig, defaults=FINETUNE_DEFAULTS, required=("init_from",))
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="generate images with any scheduler", description=scheduler_defaults_text())
    add_sample_arguments(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="FID, KID and precision/recall against a dataset (offline FID Inception)",
                       description=EVAL_DESCRIPTION)
    add_eval_arguments(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("ema", help="make the EMA of any length from a run trained with --posthoc_ema, as a pipeline",
                       description=EMA_DESCRIPTION)
    add_ema_arguments(p)
    p.set_defaults(func=cmd_ema)

    p = sub.add_parser("doctor", help="why a model samples noise: data range, overfitting one batch, the saved "
                       "scheduler against the training config, EMA against raw weights, ddpm against the default "
                       "sampler", description=DOCTOR_DESCRIPTION)
    add_doctor_arguments(p)
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("models", help="list the bundled models, the pipeline folders under --models_dir and "
                       "Hub pipelines in the local cache, with sizes and classes")
    p.add_argument("--models_dir", default=None, help="folder to search for pipeline folders, 3 levels deep "
                   "(default: the current folder)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("serve", help="a web app (Gradio) to sample and guide in the browser; needs ddpmkit[ui]",
                       description="Start the app on localhost (docs/ui.md). Ctrl-C or SIGTERM stops it.")
    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("schedulers", help="list the schedulers (samplers) by name")
    p.set_defaults(func=cmd_schedulers)

    p = sub.add_parser("schedule", help="plot the noise schedule and an image noised at 8 timesteps")
    add_schedule_arguments(p)
    p.set_defaults(func=cmd_schedule)
    return parser


def _setup_logging(quiet: bool) -> None:
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
    logging.basicConfig(level=logging.WARNING, format=f"{prefix}%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ddpmkit").setLevel(logging.WARNING if quiet or prefix else logging.INFO)
    for noisy in ("diffusers", "accelerate", "datasets", "huggingface_hub", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"  # tqdm's own switch; images.bars_enabled honours it for ddpmkit's bars


# the flags that name where a command writes: a folder, or a file whose folder is made for it
_OUTPUT_FLAGS = {"output_dir": False, "out": True, "report_dir": False, "cache_dir": False, "nearest_grid": True}


def _new_output_folders(args: argparse.Namespace) -> list[Path]:
    """The topmost folder, not there yet, of each place the command is told to write."""
    new = []
    for name, is_file in _OUTPUT_FLAGS.items():
        value = getattr(args, name, None)
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            continue
        path = Path(value).expanduser().absolute()
        path = path.parent if is_file and path.suffix else path
        missing = None
        while not path.exists() and path != path.parent:
            path, missing = path.parent, path
        if missing is not None:
            new.append(missing)
    return new


def _remove_if_empty(folders: list[Path]) -> None:
    """After a failed command: remove the folders it made for its output if nothing was written in them."""
    for folder in folders:
        if folder.is_dir() and not any(p.is_file() or p.is_symlink() for p in folder.rglob("*")):
            shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _setup_logging(args.quiet)
        new_folders = _new_output_folders(args)
        try:
            return args.func(args) or 0
        except BaseException:
            _remove_if_empty(new_folders)
            raise
    except UserError as err:
        print(f"ddpmkit: error: {err}", file=sys.stderr)
        return err.exit_code
    except Interrupted as err:  # SIGINT / SIGTERM: a checkpoint was saved; the message says how to resume
        if os.environ.get("RANK", "0") == "0":
            print(f"ddpmkit: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:  # the user's file system: permission denied, disk full, read-only folder
        print(f"ddpmkit: error: {err.strerror or err}{f': {err.filename}' if err.filename else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ddpmkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
