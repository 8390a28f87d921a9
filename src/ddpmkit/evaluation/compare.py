"""The core of evaluation, in clean-fid's shape: two image sets -> features (a dataset's from the cache) -> FID,
KID, precision and recall; and the floor, which is the same comparison between two disjoint halves of one dataset.

Nothing here knows about models: `ddpmkit.evaluation.model` samples a model and hands its images to `compare`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from ddpmkit.errors import UserError
from ddpmkit.evaluation.cache import FeatureCache, cached_features, floor_entry
from ddpmkit.evaluation.features import FeatureExtractor
from ddpmkit.evaluation.imagesets import ImageSet, dataset_halves
from ddpmkit.evaluation.metrics import PR_K, Metrics, compute_metrics

logger = logging.getLogger(__name__)


@dataclass
class Comparison:
    """The figures of two image sets, the features they came from, and whether the reference's were cached."""

    metrics: Metrics
    reference_features: np.ndarray
    generated_features: np.ndarray
    reference_cache: str  # "reused" (read from the cache) or "computed"
    timings: dict[str, float] = field(default_factory=dict)


def compare(reference: ImageSet, generated: ImageSet, extractor: FeatureExtractor, cache: FeatureCache | None = None,
            *, cache_generated: bool = False, kid_subsets: int = 100, kid_subset_size: int = 1000, k: int = PR_K,
            progress: bool = True, desc: tuple[str, str] = ("features (reference)", "features")) -> Comparison:
    """FID, KID, precision and recall of `generated` against `reference`, every figure from the same features.

    The reference's features come from `cache` when it holds them; the generated side's too with
    `cache_generated` (a second dataset: the same images every run), never for samples of a model."""
    started = time.perf_counter()
    real, status = cached_features(reference, extractor, cache, progress, desc[0])
    fake, _ = cached_features(generated, extractor, cache if cache_generated else None, progress, desc[1])
    extracted = time.perf_counter()
    metrics = compute_metrics(real, fake, kid_subsets, kid_subset_size, k)
    timings = {"features": extracted - started, "metrics": time.perf_counter() - extracted}
    return Comparison(metrics, real, fake, status, timings)


def measure_floor(dataset: str, image_size: int, channels: int, count: int, extractor: FeatureExtractor,
                  cache: FeatureCache | None, measured: str, *, kid_subsets: int = 100, kid_subset_size: int = 1000,
                  k: int = PR_K, progress: bool = True, **select) -> dict | None:
    """The floor at `count`: two disjoint halves of the dataset, `count` images each, compared (a `floor_entry`).
    It is the best score any model can get against that data at that count; None when a half is too small."""
    try:
        a, b = dataset_halves(dataset, image_size, channels, count, **select)
    except UserError as err:  # a half too small for the figures: no floor; the evaluation itself stands
        logger.warning("no floor: %s", err)
        return None
    n = min(len(a), len(b))
    if n < count:
        logger.warning("the floor needs 2 x %d images; %s has %d per half: no floor at this count", count, dataset, n)
        return None
    comparison = compare(a, b, extractor, cache, cache_generated=True, kid_subsets=kid_subsets,
                         kid_subset_size=kid_subset_size, k=k, progress=progress,
                         desc=("features (floor)", "features (floor)"))
    return floor_entry(comparison.metrics, n, 0.5, measured)
