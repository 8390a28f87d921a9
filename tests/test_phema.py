"""Post-hoc EMA (EDM2): the power-function profiles, their discrete update, and the least-squares reconstruction of an
EMA of any length from snapshots, against an EMA of that length tracked directly on the same trajectory."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpmkit import phema
from ddpmkit.errors import UserError


def test_sigma_rel_and_gamma_are_inverse_and_match_edm2():
    # EDM2 (section 3.1): sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94
    assert phema.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert phema.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.01, 0.05, 0.13, 0.25):
        assert phema.gamma_to_sigma_rel(phema.sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-9)
    for bad in (0.0, -0.1, 0.3):
        with pytest.raises(UserError, match="sigma_rel"):
            phema.sigma_rel_to_gamma(bad)


def test_the_update_is_the_power_function_average_of_the_trajectory():
    """After T steps the average is sum_tau w_tau theta_tau with w_tau = (1 - beta_tau) prod_{s > tau} beta_s, and
    those weights follow tau^gamma (normalised), as the continuous profile says."""
    T, gamma = 300, phema.sigma_rel_to_gamma(0.1)
    p = torch.nn.Parameter(torch.zeros(T))
    ema = phema.PowerFunctionEMA([p], (0.1,))
    for t in range(1, T + 1):  # step t's weights: the one-hot vector e_t, so the average is the weighting itself
        with torch.no_grad():
            p.zero_()
            p[t - 1] = 1.0
        ema.update()
    weights = ema.averages[0][0].double()
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-5)
    tau = torch.arange(1, T + 1, dtype=torch.float64)
    profile = tau ** gamma / (tau ** gamma).sum()
    assert (weights - profile).abs().sum().item() < 0.02  # the discrete weighting is the power function


@pytest.fixture(scope="module")
def run():
    """A trajectory like training's (a drift, an oscillation, noise), EMAs at 0.05 / 0.10 with snapshots every 40 steps,
    and EMAs tracked directly at other lengths on the same trajectory."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(64))
    tracked = phema.PowerFunctionEMA([p], (0.05, 0.10))
    direct = phema.PowerFunctionEMA([p], (0.03, 0.07, 0.15))
    snapshots = []
    for t in range(1, 401):
        with torch.no_grad():
            p.copy_(torch.sin(torch.arange(64) * 0.1 + t / 60) + 0.3 * torch.randn(64) + t / 400)
        tracked.update()
        direct.update()
        if t % 40 == 0:
            snapshots.append((t, tracked.snapshot(["w"])))
    return tracked, direct, snapshots


def test_reconstruction_at_a_tracked_length_is_that_ema(run):
    tracked, _, snapshots = run
    for k, sigma in enumerate((0.05, 0.10)):
        rebuilt = phema.reconstruct(snapshots, sigma)["w"]
        torch.testing.assert_close(rebuilt, tracked.averages[k][0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k, sigma, bound", [(0, 0.03, 0.05), (1, 0.07, 0.02), (2, 0.15, 0.02)])
def test_reconstruction_equals_an_ema_of_that_length_tracked_directly(run, k, sigma, bound):
    """Within 2% of how far apart the two tracked lengths are, between and above them (0.3% measured at 0.07), 5%
    below them (2.8% at 0.03: narrower than both tracked profiles is an extrapolation). The error is the least
    squares fit of power functions, not float rounding: a length can be chosen after training."""
    tracked, direct, snapshots = run
    rebuilt = phema.reconstruct(snapshots, sigma)["w"]
    spread = (tracked.averages[0][0] - tracked.averages[1][0]).norm()
    error = (rebuilt - direct.averages[k][0]).norm()
    assert error < bound * spread, (float(error), float(spread))
    # and it is not just one of the tracked ones
    assert min((rebuilt - a[0]).norm() for a in tracked.averages) > 5 * error


def test_coefficients_sum_to_one_and_reconstruct_at_an_earlier_step(run):
    tracked, direct, snapshots = run
    steps = [s for s, _ in snapshots]
    x = phema.coefficients(steps, [0.05] * len(steps), 400, 0.05)
    assert x.sum() == pytest.approx(1.0) and np.argmax(x) == len(steps) - 1
    earlier = phema.reconstruct(snapshots[:5], 0.10)  # the EMA as it was at step 200
    assert torch.allclose(earlier["w"], snapshots[4][1]["sigma_rel=0.1/w"], atol=1e-5)


def test_state_dict_round_trip_continues_exactly():
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(10))
    a = phema.PowerFunctionEMA([p], (0.05, 0.1))
    for _ in range(7):
        with torch.no_grad():
            p.add_(torch.randn(10))
        a.update()
    b = phema.PowerFunctionEMA([p], (0.05, 0.1))
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        with torch.no_grad():
            p.add_(torch.randn(10))
        a.update()
        b.update()
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a.averages, b.averages)) and a.step == b.step == 12
    with pytest.raises(UserError, match="same --posthoc_ema_sigma_rels"):
        phema.PowerFunctionEMA([p], (0.05,)).load_state_dict(a.state_dict())
    assert math.isclose(phema.beta(0.1, 1), 0.0)
