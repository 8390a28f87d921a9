"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2
section 3 and NVlabs/edm2 `training/phema.py`): during training keep power-function EMAs of the weights at two
lengths and save snapshots of them; afterwards, reconstruct the EMA of any length by least squares.

A power-function EMA at step t averages the weights of steps tau <= t with weight proportional to tau^gamma. Its
length is given as sigma_rel, the standard deviation of that weighting relative to t:
sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))). Each step updates it with beta = (1 - 1/t)^(gamma + 1)
(t counts optimizer steps here). A snapshot (profile gamma_i at step t_i) is such an average; any wanted profile
is approximated by the combination of snapshots whose weighting is closest to it in L2 over tau, which has a closed
form for power functions (`correlation`).
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch

from ddpmkit.errors import UserError

DEFAULT_SIGMA_RELS = (0.05, 0.10)  # EDM2's two tracked profiles


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """gamma of the power function whose relative standard deviation is `sigma_rel` (EDM2 eq. 3, inverted)."""
    if not 0 < sigma_rel < 0.28:  # sigma_rel -> 1 / sqrt(12) = 0.289 as gamma -> 0 (a plain average)
        raise UserError(f"--sigma_rel must be between 0 and 0.28 (got {sigma_rel})")
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


def reconstruct(snapshots: list[tuple[int, dict[str, torch.Tensor]]], sigma_rel: float,
                step: int | None = None) -> dict[str, torch.Tensor]:
    """The EMA of length `sigma_rel` at `step` (default: the last snapshot's) from snapshots [(step, snapshot dict)]
    as `PowerFunctionEMA.snapshot` writes them. Returns parameter name -> tensor (float32)."""
    if not snapshots:
        raise UserError("no post-hoc EMA snapshots: train with --posthoc_ema (snapshots every "
                        "--posthoc_ema_every steps)")
    keys, steps, sigmas = [], [], []
    for snap_step, state in snapshots:
        for sigma in sorted({float(k.split("/", 1)[0].split("=", 1)[1]) for k in state}):
            keys.append((snap_step, sigma, state))
            steps.append(snap_step)
            sigmas.append(sigma)
    step = step or max(steps)
    weights = coefficients(steps, sigmas, step, sigma_rel)
    out: dict[str, torch.Tensor] = {}
    for w, (_, sigma, state) in zip(weights, keys):
        prefix = f"sigma_rel={sigma:g}/"
        for name, tensor in state.items():
            if name.startswith(prefix):
                plain = name[len(prefix):]
                out[plain] = out[plain] + float(w) * tensor.double() if plain in out else float(w) * tensor.double()
    return {name: tensor.float() for name, tensor in out.items()}
