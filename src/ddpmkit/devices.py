"""The one rule for where ddpmkit computes: a CUDA GPU when there is one, else Apple's MPS, else the CPU.

`train`, `finetune`, `sample`, `eval`, `serve` and the Python API all call `resolve_device`; `--device` (or the
`device=` argument) overrides the rule, and a device asked for that is not there is one line saying what to use.
The choice is logged once per process and device by `announce`, when the work starts (so that a mistake found
before then is still the only line printed).
"""
from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

from ddpmkit.errors import UserError

if TYPE_CHECKING:
    import torch
# torch is imported inside the functions: config.py reads CHOICES and HELP, and `ddpmkit --help` must not wait for it

logger = logging.getLogger(__name__)

CHOICES = ("auto", "cpu", "cuda", "mps")  # what --device takes (cuda:N too)
HELP = "auto (default): a CUDA GPU when there is one, else Apple's MPS, else the CPU; or cpu, cuda, mps"


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def default_device() -> "torch.device":
    """CUDA when available, else MPS when torch offers it, else the CPU."""
    import torch

    if cuda_available():
        return torch.device("cuda")
    if mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(requested: "str | torch.device | None" = None, flag: str = "--device") -> "torch.device":
    """None or 'auto' -> `default_device()`; 'cpu', 'cuda', 'cuda:N', 'mps' -> that device when it is there."""
    import torch

    if isinstance(requested, torch.device):
        requested = str(requested)
    text = (requested or "auto").strip().lower()
    if text == "auto":
        return default_device()
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UserError(f"{flag} {requested!r} is not a device: use one of {', '.join(CHOICES)}") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"{flag} {requested!r} is not supported: use one of {', '.join(CHOICES)}")
    if device.type == "cuda" and not cuda_available():
        raise UserError(f"{flag} {requested}, but no CUDA GPU is visible: use {flag} cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"{flag} {requested}: this machine has {torch.cuda.device_count()} GPU(s) "
                        f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if device.type == "mps" and not mps_available():
        raise UserError(f"{flag} mps, but torch has no MPS backend here: use {flag} cpu or auto")
    return device


def announce(device: "torch.device | str", what: str = "computing") -> None:
    """Log the device once per process (and per `what`): call it when the work starts."""
    import torch

    _log_once(str(torch.device(device)), what)


@functools.lru_cache(maxsize=None)
def _log_once(device: str, what: str) -> None:
    kind = device.split(":")[0]
    why = {"cuda": "a CUDA GPU", "mps": "Apple's MPS", "cpu": "the CPU"}[kind]
    if kind == "cpu" and (cuda_available() or mps_available()):
        why += ", as asked"
    elif kind == "cpu":
        why += ": no GPU is visible"
    logger.info("%s on %s (%s; --device overrides)", what, device, why)
