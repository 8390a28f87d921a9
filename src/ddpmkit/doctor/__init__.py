"""`ddpmkit doctor`: why a model samples noise, in one line a check with what to do.

The checks, in the order they run (each prints "ok", "problem ... -> what to do" or "skip", and what it cost):
- data: a real training batch as the model sees it (in [-1, 1]; channels and size against the UNet; a grid of it),
  and, with a pipeline, whether its samples stay in [0, 1] (it was trained on [0, 1] data);
- overfit: a new model (as the run builds it) must lower the loss on one fixed batch in a few dozen steps at the run's
  learning rate, or the learning rate diverges or the model cannot learn;
- config: the saved scheduler's prediction type, schedule and T and the UNet's size against the training config,
  and which target (eps, x0, v) the UNet's outputs actually fit;
- ema: with --use_ema, KID of the EMA weights against the raw weights of the newest checkpoint, and the EMA's decay;
- sampler: ddpm at full steps against the default sampler, against the data's pixel statistics.

The pieces: `subject` (what is examined, opened once), `checks` (data, overfit, config), `sampled` (ema, sampler),
`core` (`doctor`, `DoctorReport`).
"""
from __future__ import annotations

from ddpmkit.doctor.checks import Finding
from ddpmkit.doctor.core import CHECKS, DoctorReport, doctor
from ddpmkit.doctor.sampled import pixel_statistics, statistics_gap
from ddpmkit.doctor.subject import Subject, open_subject

__all__ = ["CHECKS", "DoctorReport", "Finding", "Subject", "doctor", "open_subject", "pixel_statistics",
           "statistics_gap"]
