"""The figures, from two feature arrays (real, generated): FID, KID, precision and recall.

- FID (Heusel et al. 2017): |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), float64.
- KID (Binkowski et al. 2018): unbiased MMD^2 with the kernel (x.y / d + 1)^3, mean and std over subsets.
- Precision and recall (Kynkaenniemi et al. 2019): k-NN balls (k = 3) around each real / generated feature.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ddpmkit.errors import UserError

PR_K = 3  # precision and recall: each image's k-th nearest neighbour sets its ball
MIN_IMAGES = PR_K + 1  # images a side for all four figures (FID's covariance needs 2, the k-NN balls k + 1)


def covariance_factor(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """mean, a factor F with F.T @ F = the covariance, and the covariance's trace (float64).

    With fewer images than dimensions F is the centred features / sqrt(n - 1) (n x d), exact and small;
    otherwise the symmetric square root of the covariance from `eigh` (d x d).
    """
    f = np.asarray(features, dtype=np.float64)
    mu = f.mean(axis=0)
    centred = (f - mu) / math.sqrt(max(f.shape[0] - 1, 1))
    if f.shape[0] <= f.shape[1]:
        return mu, centred, float((centred * centred).sum())
    sigma = centred.T @ centred
    values, vectors = np.linalg.eigh(sigma)
    return mu, (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T, float(np.trace(sigma))


def frechet_distance_factors(a: tuple, b: tuple) -> float:
    """FID's Frechet distance (Dowson & Landau 1982) from two `covariance_factor`s.

    tr((S1 S2)^1/2) is the sum of the singular values of F1 F2^T (S = F^T F): no square root of a
    rank-deficient matrix, so it stays exact when there are fewer images than feature dimensions.
    """
    (mu1, f1, trace1), (mu2, f2, trace2) = a, b
    trace_sqrt = np.linalg.svd(f1 @ f2.T, compute_uv=False).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + trace1 + trace2 - 2 * trace_sqrt, 0.0))


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    return frechet_distance_factors(covariance_factor(real), covariance_factor(fake))


def kid_from_features(real: np.ndarray, fake: np.ndarray, num_subsets: int = 100, subset_size: int = 1000,
                      seed: int = 0) -> tuple[float, float]:
    """KID: unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3, mean and std over random subsets
    (Binkowski et al. 2018; 100 subsets of 1,000 as torchmetrics). A subset takes at most half the smaller
    side, so that the subsets differ and the std says how much the figure moves; the mean is unbiased at any
    subset size. Up to 5,000 images a side the three kernel matrices are computed once and each subset is a
    gather."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    m = min(subset_size, max(min(real.shape[0], fake.shape[0]) // 2, 2))
    if m < 2:
        raise UserError("KID needs at least 2 images on each side")
    d = real.shape[1]
    kernel = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    full = max(real.shape[0], fake.shape[0]) <= 5000
    if full:
        kxx_all, kyy_all, kxy_all = kernel(real, real), kernel(fake, fake), kernel(real, fake)
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(num_subsets):
        i = rng.choice(real.shape[0], m, replace=False)
        j = rng.choice(fake.shape[0], m, replace=False)
        if full:
            kxx, kyy, kxy = kxx_all[np.ix_(i, i)], kyy_all[np.ix_(j, j)], kxy_all[np.ix_(i, j)]
        else:
            kxx, kyy, kxy = kernel(real[i], real[i]), kernel(fake[j], fake[j]), kernel(real[i], fake[j])
        off = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))  # noqa: E731
        scores.append(off(kxx) + off(kyy) - 2 * kxy.mean())
    scores = np.asarray(scores)
    return float(scores.mean()), float(scores.std())


def _pairwise(a: torch.Tensor, b: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    return torch.cat([torch.cdist(a[i:i + chunk], b) for i in range(0, a.shape[0], chunk)])


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = PR_K) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): the share of generated features inside the
    union of k-NN balls of the real ones (precision), and of real features inside the generated ones' (recall)."""
    r = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    if min(r.shape[0], f.shape[0]) <= k:
        raise UserError(f"precision/recall with k = {k} needs at least {k + 1} images on each side (give more images)")

    def radii(x: torch.Tensor) -> torch.Tensor:  # distance to the k-th nearest other point (column 0 is itself)
        return _pairwise(x, x).kthvalue(k + 1, dim=1).values

    def coverage(manifold: torch.Tensor, radius: torch.Tensor, probe: torch.Tensor) -> float:
        inside = (_pairwise(probe, manifold) <= radius[None, :] * (1 + 1e-9)).any(dim=1)
        return float(inside.double().mean())

    return coverage(r, radii(r), f), coverage(f, radii(f), r)


@dataclass
class Metrics:
    fid: float
    kid_mean: float
    kid_std: float
    precision: float | None = None
    recall: float | None = None


def compute_metrics(real: np.ndarray, fake: np.ndarray, kid_subsets: int = 100, kid_subset_size: int = 1000,
                    k: int = PR_K, with_pr: bool = True) -> Metrics:
    """All four figures from one pair of feature arrays."""
    kid = kid_from_features(real, fake, kid_subsets, kid_subset_size)
    pr = precision_recall(real, fake, k) if with_pr else (None, None)
    return Metrics(fid_from_features(real, fake), *kid, *pr)
