"""`doctor`: open what was given, run the checks asked for, each timed; a problem in one check never stops the others."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ddpmkit import runs
from ddpmkit.doctor.checks import Finding, check_config, check_data, check_overfit, problem
from ddpmkit.doctor.sampled import check_ema, check_sampler
from ddpmkit.doctor.subject import Subject, open_subject
from ddpmkit.errors import UserError

logger = logging.getLogger(__name__)

# name -> what it costs on a 2-core CPU for the tiny preset at 32x32 (docs/doctor.md has the measured times)
CHECKS = {
    "data": "a batch and its grid (seconds); with a pipeline, 8 samples with ddpm at full steps (shared with sampler)",
    "overfit": "40 AdamW steps on 16 images (seconds to a minute)",
    "config": "the saved configs and one UNet call on 16 noised images at 5 timesteps (seconds)",
    "ema": "64 samples each of the EMA and the raw weights (ddim, 25 steps) and KID against 64 training images "
           "(about a minute: 192 images through the Inception)",
    "sampler": "8 samples with ddpm at full steps (1,000 UNet calls) and with the default sampler (a minute)",
}


@dataclass
class DoctorReport:
    """The findings, in the order the checks ran; `problems` are the ones to act on."""

    subject: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.status == "problem"]

    def lines(self) -> list[str]:
        """What `ddpmkit doctor` prints: one line a check, then the count of problems."""
        count = len(self.problems)
        summary = f"{count} problem{'s' * (count != 1)} found in {self.subject}" if count else \
            f"no problem found in {self.subject}"
        return [f.line() for f in self.findings] + [summary]


def doctor(target=None, *, checks: tuple[str, ...] | list[str] = tuple(CHECKS), report_dir: str | Path = "doctor",
           scheduler: str = "auto", features=None, device: str | None = None, **overrides) -> DoctorReport:
    """Check a run folder, a pipeline (folder, bundled name, Hub id or object) or, with no `target`, a training
    config given as `ddpmkit train`'s keyword arguments (`overrides`; with a target they go over its saved config,
    e.g. `lr=1e-3` to try another learning rate). `checks`: any of CHECKS. `report_dir`: where the grids go.
    `scheduler`: the sampler compared with ddpm. `features`: the KID feature extractor (default: the Inception)."""
    unknown = [name for name in checks if name not in CHECKS]
    if unknown:
        raise UserError(f"unknown check(s) {', '.join(unknown)}: use any of {', '.join(CHECKS)}")
    subject = open_subject(target, overrides, device)
    report_dir = Path(report_dir)
    runs.check_writable(report_dir, "--report_dir")
    run = {"data": check_data, "overfit": check_overfit, "config": check_config,
           "ema": partial(check_ema, features=features), "sampler": partial(check_sampler, scheduler=scheduler)}
    report = DoctorReport(_describe(subject))
    for name in CHECKS:
        if name in checks:
            report.findings.append(_timed(name, run[name], subject, report_dir))
    return report


def _timed(name: str, check, subject: Subject, report_dir: Path) -> Finding:
    """One check, timed; a UserError inside it is that check's problem (its message says what to do)."""
    started = time.perf_counter()
    logger.info("doctor: %s (%s)", name, CHECKS[name])
    try:
        finding = check(subject, report_dir)
    except UserError as err:
        finding = problem(name, str(err), "see above")
    finding.seconds = time.perf_counter() - started
    return finding


def _describe(subject: Subject) -> str:
    what = {"run": "the run", "pipeline": "the pipeline", "config": "the training config"}[subject.kind]
    return what if subject.kind == "config" else f"{what} {subject.name}"
