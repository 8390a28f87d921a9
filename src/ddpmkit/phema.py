"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2
section 3 and NVlabs/edm2 `training/phema.py`): during training keep power-function EMAs of the weights at two
lengths and save snapshots of them; afterwards, reconstruct the EMA of any length by least squares.

A power-function EMA at step t averages the weights of steps tau <= t with weight proportional to tau^gamma. Its
length is given as sigma_rel, the standard deviation of that weighting relative to t:
sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))). Each step updates it with beta = (1 - 1/t)^(gamma + 1)
(t counts optimizer steps here). A snapshot (profile gamma_i at step t_i) is such an average; any wanted profile
is approximated by the combination of snapshots whose weighting is closest to it in L2 over tau, which has a closed
form for power functions (`correlation`).

Training keeps the profiles with `phema_hook.PostHocEMA` (`--posthoc_ema`), which writes the snapshots through
`runs`; here, a run's snapshots become a pipeline of any length (`ema_pipeline`, `save_ema_pipeline`: `ddpmkit ema`)
and lengths are compared by FID (`sweep`: `ddpmkit eval --sigma_rel`). docs/ema.md has the formulas and the costs.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from ddpmkit import runs
from ddpmkit.config import MAX_SIGMA_REL, parse_sigma_rels  # noqa: F401 - parse_sigma_rels: the API's
from ddpmkit.errors import UserError
from ddpmkit.models import bundled_models

DEFAULT_SIGMA_RELS = (0.05, 0.10)  # EDM2's two tracked profiles
FORMAT = "ddpmkit.phema/1"  # a snapshot file's metadata["format"]


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """gamma of the power function whose relative standard deviation is `sigma_rel` (EDM2 eq. 3, inverted)."""
    if not 0 < sigma_rel < MAX_SIGMA_REL:
        raise UserError(f"--sigma_rel must be between 0 and {MAX_SIGMA_REL} (got {sigma_rel:g})")
    t = sigma_rel ** -2  # (gamma + 2)^2 (gamma + 3) = t (gamma + 1): the largest real root of a cubic
    roots = np.roots([1, 7, 16 - t, 12 - t])
    return float(roots.real[abs(roots.imag) < 1e-9].max())


def gamma_to_sigma_rel(gamma: float) -> float:
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def beta(sigma_rel: float, step: int) -> float:
    """The EMA decay at optimizer step `step` (1-based): (1 - 1/step)^(gamma + 1); 0 at step 1 (the weights)."""
    return (1 - 1 / step) ** (sigma_rel_to_gamma(sigma_rel) + 1)


class PowerFunctionEMA:
    """Power-function EMAs of `parameters` at each sigma_rel, updated after every optimizer step.

    `state_dict()` / `load_state_dict()` hold the averages and the step, so that a resumed run continues them
    exactly (accelerate's `register_for_checkpointing` saves them with every checkpoint)."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], sigma_rels: Iterable[float] = DEFAULT_SIGMA_RELS):
        self.parameters = list(parameters)
        self.sigma_rels = [float(s) for s in sigma_rels]
        if not self.sigma_rels:
            raise UserError("--posthoc_ema needs at least one sigma_rel")
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.averages = [[p.detach().clone().float() for p in self.parameters] for _ in self.sigma_rels]
        self.step = 0

    @torch.no_grad()
    def update(self) -> None:
        """Fold in the current weights (call once after each optimizer step)."""
        self.step += 1
        current = [p.detach().float() for p in self.parameters]
        for gamma, average in zip(self.gammas, self.averages):
            weight = 1 - (1 - 1 / self.step) ** (gamma + 1)  # lerp weight of the new weights: 1 at step 1
            torch._foreach_lerp_(average, current, weight)

    def snapshot(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The averages as one flat state dict: 'sigma_rel=0.05/<parameter name>' -> tensor (CPU, float32)."""
        return {f"sigma_rel={s:g}/{name}": tensor.detach().cpu().clone() for s, average in
                zip(self.sigma_rels, self.averages) for name, tensor in zip(names, average)}

    def state_dict(self) -> dict:
        return {"step": self.step, "sigma_rels": self.sigma_rels, "averages": self.averages}

    def load_state_dict(self, state: dict) -> None:
        if [float(s) for s in state["sigma_rels"]] != self.sigma_rels:
            raise UserError(f"the checkpoint's post-hoc EMA tracks sigma_rel {state['sigma_rels']}, this run "
                            f"{self.sigma_rels}: resume with the same --posthoc_ema_sigma_rels")
        self.step = int(state["step"])
        for mine, saved in zip(self.averages, state["averages"]):
            for a, b in zip(mine, saved):
                a.copy_(b.to(a.device))


# ---------------------------------------------------------------------------- reconstruction
def correlation(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """<p_a, p_b>: the integral over tau of two normalised power-function weightings, p(tau) = (gamma + 1) tau^gamma /
    t^(gamma + 1) on 0 < tau <= t (EDM2's `power_function_correlation`). Broadcasts."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    t_ratio = t_a / t_b
    t_exp = np.where(t_a < t_b, gamma_b, -gamma_a)
    t_max = np.maximum(t_a, t_b)
    return (gamma_a + 1) * (gamma_b + 1) * t_ratio ** t_exp / ((gamma_a + gamma_b + 1) * t_max)


def coefficients(snapshot_steps, snapshot_sigma_rels, step: float, sigma_rel: float) -> np.ndarray:
    """Weights of the snapshots whose combination is the EMA of length `sigma_rel` at `step` (least squares in the
    weighting over training time; EDM2's `solve_posthoc_coefficients`), normalised to sum to 1."""
    t = np.asarray(snapshot_steps, dtype=np.float64)
    g = np.asarray([sigma_rel_to_gamma(s) for s in snapshot_sigma_rels], dtype=np.float64)
    a = correlation(t[:, None], g[:, None], t[None, :], g[None, :])
    b = correlation(t, g, np.float64(step), np.float64(sigma_rel_to_gamma(sigma_rel)))
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    return x / x.sum()


def fit_error(snapshot_steps, snapshot_sigma_rels, step: float, sigma_rel: float, weights) -> float:
    """How far the snapshots' combination is from the wanted weighting: ||sum_i w_i p_i - p|| / ||p|| in L2 over
    training time (0 at a tracked length at a snapshot's step; it grows away from the tracked lengths and with
    fewer snapshots). The weights' own error is at most this times how much they moved."""
    t = np.asarray(snapshot_steps, dtype=np.float64)
    g = np.asarray([sigma_rel_to_gamma(s) for s in snapshot_sigma_rels], dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    gamma = np.float64(sigma_rel_to_gamma(sigma_rel))
    pp = correlation(step, gamma, step, gamma)
    squared = pp - 2 * w @ correlation(t, g, step, gamma) + w @ correlation(t[:, None], g[:, None], t[None, :],
                                                                              g[None, :]) @ w
    return float(np.sqrt(max(squared, 0.0) / pp))


def _solve(profiles: list[tuple[int, list[float]]], sigma_rel: float, step: int | None
           ) -> tuple[list[tuple[int, float, float]], dict]:
    """For snapshots [(step, the sigma_rels it holds)]: the terms [(snapshot index, sigma_rel, weight)] of the EMA
    of length `sigma_rel` at `step` (default: the last snapshot's), and what was made (`info`)."""
    if not profiles:
        raise UserError("no post-hoc EMA snapshots: train with --posthoc_ema (snapshots every "
                        "--posthoc_ema_every steps)")
    pairs = [(i, s) for i, (_, sigma_rels) in enumerate(profiles) for s in sigma_rels]
    steps, sigmas = [profiles[i][0] for i, _ in pairs], [s for _, s in pairs]
    step = step or max(steps)
    weights = coefficients(steps, sigmas, step, sigma_rel)
    info = {"sigma_rel": sigma_rel, "step": int(step), "snapshot_steps": [int(s) for s, _ in profiles],
            "tracked_sigma_rels": sorted(set(sigmas)),
            "fit_error": round(fit_error(steps, sigmas, step, sigma_rel, weights), 6)}
    return [(i, s, float(w)) for (i, s), w in zip(pairs, weights)], info


def _combine(terms: list[tuple[int, float, float]], load: Callable[[int], dict[str, torch.Tensor]]
             ) -> dict[str, torch.Tensor]:
    """sum of weight * profile over the terms, in float64; `load(i)` gives snapshot i, each read once (a run's
    snapshots need not fit in memory together)."""
    out: dict[str, torch.Tensor] = {}
    for index in sorted({i for i, _, _ in terms}):
        state = load(index)
        for _, sigma, weight in (term for term in terms if term[0] == index):
            prefix = f"sigma_rel={sigma:g}/"
            for name, tensor in state.items():
                if name.startswith(prefix):
                    plain = name[len(prefix):]
                    out[plain] = out[plain] + weight * tensor.double() if plain in out else weight * tensor.double()
    return {name: tensor.float() for name, tensor in out.items()}


def reconstruct(snapshots: list[tuple[int, dict[str, torch.Tensor]]], sigma_rel: float,
                step: int | None = None) -> dict[str, torch.Tensor]:
    """The EMA of length `sigma_rel` at `step` (default: the last snapshot's) from snapshots [(step, snapshot dict)]
    as `PowerFunctionEMA.snapshot` writes them. Returns parameter name -> tensor (float32)."""
    profiles = [(t, sorted({float(k.split("/", 1)[0].split("=", 1)[1]) for k in state})) for t, state in snapshots]
    terms, _ = _solve(profiles, sigma_rel, step)
    return _combine(terms, lambda i: snapshots[i][1])


# ---------------------------------------------------------------------------- a run's snapshots -> a pipeline
@dataclass
class RunSnapshot:
    """One snapshot file of a run: its step, the lengths it holds and its metadata (the model's configs)."""

    step: int
    path: Path
    sigma_rels: list[float]
    metadata: dict[str, str]


def run_snapshots(run: str | os.PathLike, step: int | None = None) -> list[RunSnapshot]:
    """The snapshots of a run trained with --posthoc_ema (those up to `step`), oldest first. `run` is its
    --output_dir (or the pipeline folder inside it, with --model_save_name)."""
    folder = Path(run)
    if not folder.is_dir():
        what = "a bundled pipeline, not a run" if str(run) in bundled_models() else "not a folder"
        raise UserError(f"{run} is {what}: give the --output_dir of a run trained with --posthoc_ema")
    found = runs.phema_snapshots(folder)
    if not found and (folder / "model_index.json").exists():
        found = runs.phema_snapshots(folder.parent)  # the pipeline of a run with --model_save_name
    if not found:
        raise UserError(f"{run} has no post-hoc EMA snapshots ({runs.PHEMA_DIR}/step_*.safetensors): train with "
                        "--posthoc_ema, and give the run's --output_dir")
    if step is not None:
        if not found[0][0] <= step <= found[-1][0]:
            raise UserError(f"--step {step} is outside the snapshots of {run}: use a step from {found[0][0]} to "
                            f"{found[-1][0]}")
        found = [(s, path) for s, path in found if s <= step]
    snapshots = []
    for s, path in found:
        metadata = runs.read_phema_metadata(path)
        if metadata.get("format") != FORMAT:
            raise UserError(f"{path} is not a ddpmkit post-hoc EMA snapshot: move it out of {path.parent}")
        snapshots.append(RunSnapshot(s, path, json.loads(metadata["sigma_rels"]), metadata))
    return snapshots


def ema_pipeline(run: str | os.PathLike, sigma_rel: float, step: int | None = None):
    """The EMA of length `sigma_rel` at `step` (default: the last snapshot's) of a run trained with --posthoc_ema,
    as a DDPMPipeline with the run's scheduler (float32, on the CPU). Returns (pipeline, info): `info` says what
    was made (length, step, the snapshots used, `fit_error`)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    sigma_rel = parse_sigma_rels([sigma_rel])[0]
    snapshots = run_snapshots(run, step)
    terms, info = _solve([(s.step, s.sigma_rels) for s in snapshots], sigma_rel, step)
    state = _combine(terms, lambda i: runs.read_phema_tensors(snapshots[i].path))
    metadata = snapshots[-1].metadata
    unet = UNet2DModel.from_config(json.loads(metadata["unet_config"]))
    missing, unexpected = unet.load_state_dict(state, strict=False)
    missing = set(missing) - {name for name, _ in unet.named_buffers()}
    if missing or unexpected:
        raise UserError(f"the snapshots of {run} do not fit their UNet config ({len(missing)} weights missing, "
                        f"{len(unexpected)} unknown): were they copied from another run?")
    scheduler = DDPMScheduler.from_config(json.loads(metadata["scheduler_config"]))
    info["run"] = str(snapshots[0].path.parent.parent)  # the run folder (OUTPUT_DIR/phema/step_N.safetensors)
    info["model"] = json.loads(metadata.get("ddpmkit", "{}"))  # class names, null class, dataset, base model
    info["train_config"] = json.loads(metadata.get("train_config", "{}"))
    return DDPMPipeline(unet=unet.eval(), scheduler=scheduler), info


def _made(info: dict) -> dict:
    """What an EMA is (length, step, snapshots, fit), without the run's model metadata."""
    return {k: v for k, v in info.items() if k not in ("model", "train_config")}


def describe(info: dict) -> str:
    """'the EMA of sigma_rel 0.07 at step 1000 (from 16 snapshots of 0.05, 0.1; its weighting within 0.38%)'."""
    tracked = ", ".join(f"{s:g}" for s in info["tracked_sigma_rels"])
    fit = (f"its weighting within {100 * info['fit_error']:.2f}%" if info["fit_error"] >= 1e-5
           else "a tracked length at a snapshot: exact")
    return (f"the EMA of sigma_rel {info['sigma_rel']:g} at step {info['step']} (from {len(info['snapshot_steps'])} "
            f"snapshots of {tracked}; {fit})")


def save_ema_pipeline(run: str | os.PathLike, sigma_rel: float, out: str | os.PathLike, step: int | None = None
                      ) -> tuple[Path, dict]:
    """`ema_pipeline` saved to `out` as a normal pipeline folder (complete or absent): the weights, the run's
    scheduler, ddpmkit.json (with `posthoc_ema`: what was made) and a model card. Returns (folder, info)."""
    from ddpmkit.hub import model_card_text, save_card

    out = Path(out)
    _check_ema_out(out, run)  # before the reconstruction: a wrong --out costs nothing
    pipe, info = ema_pipeline(run, sigma_rel, step)
    _check_ema_out(out, info["run"])
    train_config = info["train_config"]
    losses = [r for r in runs.LossLog(info["run"]).finite() if r["step"] <= info["step"]]

    def write(staged: Path) -> None:
        pipe.save_pretrained(staged)
        runs.write_meta(staged, {**info["model"], "step": info["step"], "train_config": train_config,
                                 "posthoc_ema": _made(info)})
        runs.write_train_config(staged, train_config)
        command = (f"ddpmkit ema {shlex.quote(str(run))} --sigma_rel {info['sigma_rel']:g} --step {info['step']} "
                   f"--out {shlex.quote(str(out))}")
        section = ["", "## Post-hoc EMA", "", f"These weights are {describe(info)}, reconstructed after training "
                   "(EDM2's post-hoc EMA, Karras et al. 2024) with:", "", "```bash", command, "```", ""]
        save_card(staged, model_card_text(out, train_config, losses=losses, staged=staged) + "\n".join(section))

    return runs.save_staged(out, write), info


def _check_ema_out(out: Path, run: str | os.PathLike) -> None:
    """`out` is new, empty, or a pipeline `ddpmkit ema` made (made again: replaced); anything else would be lost."""
    if not out.exists():
        return
    if out.resolve() == Path(run).resolve():
        raise UserError(f"--out {out} is the run folder: give a new folder for the EMA pipeline")
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / "model_index.json").exists()):
        raise UserError(f"--out {out} exists and is not a pipeline folder: give a new folder")
    if (out / "model_index.json").exists() and "posthoc_ema" not in runs.read_meta(out):
        raise UserError(f"--out {out} holds a pipeline that 'ddpmkit ema' did not make, which would be replaced: give "
                        "a new folder (or delete that one first)")


# ---------------------------------------------------------------------------- choosing the length by FID
@dataclass
class EMASweep:
    """The figures of the EMA of each length, reconstructed from one run's snapshots and evaluated alike."""

    run: str
    step: int
    results: list = field(default_factory=list)  # [(sigma_rel, evaluation.EvalResult)], in the order asked
    seconds: float = 0.0

    def best(self):
        """(sigma_rel, result) of the lowest FID."""
        return min(self.results, key=lambda pair: pair[1].fid)

    def lines(self) -> list[str]:
        """What `ddpmkit eval --sigma_rel` prints: one line per length, the floor, the counts and the best."""
        out = [f"sigma_rel {s:<6g} FID {r.fid:8.3f}   KID {r.kid_mean:.5f} ± {r.kid_std:.5f}   precision "
               f"{r.precision:.3f}   recall {r.recall:.3f}" for s, r in self.results]
        first = self.results[0][1]
        if first.floor:
            out.append(f"floor            FID {first.floor['fid']:8.3f}   KID {first.floor['kid_mean']:.5f}   (two "
                       f"disjoint samples of the dataset at {first.floor['count']} images)")
        ref = first.settings.get("reference", {})
        out.append(f"images     {first.num_generated} per length, {first.num_reference} reference "
                   f"({ref.get('dataset', 'reference')}, {ref.get('image_size')}x{ref.get('image_size')}); the EMAs at "
                   f"step {self.step}")
        s, r = self.best()
        out.append(f"best       sigma_rel {s:g} (FID {r.fid:.3f}): make it a pipeline with 'ddpmkit ema "
                   f"{shlex.quote(self.run)} --sigma_rel {s:g} --out DIR'")
        out.append(f"time       {self.seconds:.1f} s")
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Every length's figures and settings (as `EvalResult.save` writes one), and the best, as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"run": self.run, "step": self.step, "best_sigma_rel": self.best()[0], "seconds": self.seconds,
                "results": [{"sigma_rel": s, **r.to_dict()} for s, r in self.results]}
        path.write_text(json.dumps(data, indent=1) + "\n")
        return path


def sweep(run: str | os.PathLike, sigma_rels: str | Iterable[float], step: int | None = None,
          **evaluate_kwargs) -> EMASweep:
    """`evaluation.evaluate` the EMA of each length in `sigma_rels` ('0.05,0.07,0.10' or numbers) at `step`
    (default: the last snapshot's) of a run trained with --posthoc_ema, with the same settings for each
    (`evaluate_kwargs`: dataset, num_images, sampler, seed, ...; the reference features are computed once and
    cached). Each EMA is saved to a temporary pipeline folder first, so that it is evaluated as `ddpmkit ema`
    would write it (with the run's class names)."""
    from ddpmkit.evaluation import evaluate

    sigma_rels = parse_sigma_rels(sigma_rels)
    last = run_snapshots(run, step)[-1]  # no snapshots, or a step outside them: one line before anything is sampled
    if evaluate_kwargs.get("dataset") is None:  # the data the run was trained on
        evaluate_kwargs["dataset"] = json.loads(last.metadata.get("ddpmkit", "{}")).get("dataset") or "emoji"
    started, result = time.perf_counter(), EMASweep(str(run), 0)
    for sigma_rel in sigma_rels:
        with tempfile.TemporaryDirectory(prefix="ddpmkit-ema-") as tmp:
            folder, info = save_ema_pipeline(run, sigma_rel, Path(tmp) / "ema", step)
            figures = evaluate(str(folder), **evaluate_kwargs)
        figures.settings["model"].update(name=str(run), posthoc_ema=_made(info))
        result.step = info["step"]
        result.results.append((sigma_rel, figures))
    result.seconds = time.perf_counter() - started
    return result
