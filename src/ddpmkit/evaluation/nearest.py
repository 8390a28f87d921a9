"""Memorization: each generated image's nearest training images, in FID Inception features and in pixels, and the
share of generated images that count as copies of a training image (`ddpmkit eval --nearest K`).

The rule, per space (the same words go in the printed lines and the JSON):
  a generated image counts as a copy when its distance to the nearest training image is below the 1st percentile
  of the training images' own nearest-neighbour distances (each training image to the nearest other one).
New images drawn from the data itself would fall below it about 1% of the time (a held-out image's distance to the
training set is distributed like a training image's distance to the others); a model that reproduces its training
images puts most of its samples there. A training image's exact duplicates (distance 0: the same picture under two
names) are passed over when its own nearest neighbour is found, so that duplicates in the data cannot set the bar
to 0. Distances are Euclidean: in the 2,048-d Inception features, and in pixels as the root mean square difference
of the uint8 images at the model's size, in [0, 1] units. Training with --random_flip (the default) shows the model
each image and its mirror image, so in pixels the mirror images are training images too (an image's own mirror is
not its neighbour); the Inception side compares the images as they are (its features change little under a mirror
image, and it would double the training set's extraction).

The training set searched is the one the model was trained on when its ddpmkit.json names the same dataset (its
`--max_images` first images), else the whole `--dataset`; at most `MAX_TRAINING_IMAGES` of it (a seeded sample
beyond that, said in a warning). Its features are cached like the reference's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ddpmkit.data import load_image_data
from ddpmkit.errors import UserError
from ddpmkit.evaluation.cache import FeatureCache, cached_features
from ddpmkit.evaluation.features import FeatureExtractor
from ddpmkit.evaluation.imagesets import ImageSet

logger = logging.getLogger(__name__)

COPY_PERCENTILE = 1.0  # the bar: this percentile of the training set's own nearest-neighbour distances
MAX_TRAINING_IMAGES = 10_000  # Inception features of 10,000 images take about 30 minutes on a 2-core CPU, once
GRID_ROWS = 16  # the closest pairs shown in the grid
RULE = ("a generated image is a copy when its distance to the nearest training image is below the "
        f"{COPY_PERCENTILE:g}st percentile of the training images' own nearest-neighbour distances")


@dataclass
class SpaceNeighbours:
    """One space's answer: each generated image's K nearest training images, the bar, and the copies under it."""

    nearest_index: np.ndarray  # (G, K) training-set indices, nearest first
    nearest_distance: np.ndarray  # (G, K)
    nearest_flipped: np.ndarray  # (G, K) bool: the match is the training image's mirror image (pixels only)
    train_nn: np.ndarray  # (N,) each training image's distance to its nearest other (not identical) one
    threshold: float
    copies: np.ndarray  # (G,) bool

    def summary(self) -> dict:
        g = len(self.copies)
        return {"threshold": self.threshold, "copies": int(self.copies.sum()), "share": float(self.copies.mean()) if g
                else 0.0, "median_nearest": float(np.median(self.nearest_distance[:, 0])) if g else None,
                "train_median_nearest": float(np.median(self.train_nn)),
                "nearest_index": self.nearest_index.tolist(),
                "nearest_distance": np.round(self.nearest_distance, 5).tolist(),
                **({"nearest_flipped": self.nearest_flipped.tolist()} if self.nearest_flipped.any() else {})}


@dataclass
class Nearest:
    """`ddpmkit eval --nearest K`: both spaces, what was searched, and the closest pairs' images for the grid."""

    k: int
    inception: SpaceNeighbours
    pixels: SpaceNeighbours
    training: dict  # what the training set was (dataset, count, flips, how it was chosen)
    generated: torch.Tensor = field(repr=False)  # uint8 (G, C, H, W)
    train_images: torch.Tensor = field(repr=False)  # uint8 (N, C, H, W)

    def to_dict(self) -> dict:
        return {"k": self.k, "rule": RULE, "percentile": COPY_PERCENTILE, "training_set": self.training,
                "inception": self.inception.summary(), "pixels": self.pixels.summary()}

    def closest_rows(self, rows: int = GRID_ROWS) -> list[int]:
        """The generated images closest to a copy: the smallest nearest distance relative to the bar, either space."""
        ratio = np.minimum(self.inception.nearest_distance[:, 0] / max(self.inception.threshold, 1e-12),
                           self.pixels.nearest_distance[:, 0] / max(self.pixels.threshold, 1e-12))
        return np.argsort(ratio, kind="stable")[:rows].tolist()

    def save_grid(self, path: str | Path, rows: int = GRID_ROWS, scale: int = 2) -> Path:
        """Rows of: generated | its K nearest in Inception features | its K nearest in pixels (mirrored when the
        mirror image is the match); the label gives each distance over its space's bar (below 1: a copy)."""
        from ddpmkit.images import labelled_rows

        gap = torch.full_like(self.generated[:1], 255)
        images, labels = [], []
        for i in self.closest_rows(rows):
            row = [self.generated[i:i + 1], gap]
            for space in (self.inception, self.pixels):
                for j, flipped in zip(space.nearest_index[i], space.nearest_flipped[i]):
                    image = self.train_images[j:j + 1]
                    row.append(image.flip(-1) if flipped else image)
                row.append(gap)
            images.append(torch.cat(row[:-1]).float() / 127.5 - 1)
            inc = self.inception.nearest_distance[i, 0] / max(self.inception.threshold, 1e-12)
            pix = self.pixels.nearest_distance[i, 0] / max(self.pixels.threshold, 1e-12)
            labels.append(f"#{i} i{inc:.2f} p{pix:.2f}{' copy' if min(inc, pix) < 1 else ''}")
        return labelled_rows(images, labels, path, scale=scale)


def nearest_lines(found: dict) -> list[str]:
    """What `ddpmkit eval --nearest` prints after the figures (from `Nearest.to_dict()`, as saved in the JSON)."""
    t, g = found["training_set"], len(found["pixels"]["nearest_index"])
    flips = " and their mirror images in pixels" if t.get("flips") else ""
    out = [f"nearest    the {found['k']} nearest of {t['count']} training images ({t['dataset']}, {t['chosen']})"
           f"{flips} to each of {g} generated, in Inception features and in pixels"]
    for name, s in (("Inception", found["inception"]), ("pixels", found["pixels"])):
        out.append(f"copies     {100 * s['share']:.1f}% in {name} ({s['copies']} of {g}): nearest distance median "
                   f"{s['median_nearest']:.4g}, bar {s['threshold']:.4g} (the training images' own median "
                   f"{s['train_median_nearest']:.4g})")
    out.append(f"rule       {found['rule']} (about {found['percentile']:g}% of new images from the data itself)")
    if found.get("grid"):
        out.append(f"grid       {found['grid']}: generated | {found['k']} nearest in Inception | {found['k']} "
                   "nearest in pixels, closest first")
    return out


# --------------------------------------------------------------------------- the rule
def copy_threshold(train_nn: np.ndarray, percentile: float = COPY_PERCENTILE) -> float:
    """The bar: `percentile` of the training images' own nearest-neighbour distances (numpy's linear interpolation)."""
    if len(train_nn) < 2:
        raise UserError("--nearest needs at least 2 training images to know how close they are to each other")
    return float(np.percentile(train_nn, percentile))


def is_copy(nearest: np.ndarray, threshold: float) -> np.ndarray:
    """Strictly below the bar (an image exactly at it is as close as 1% of the training images are to each other)."""
    return np.asarray(nearest) < threshold


# --------------------------------------------------------------------------- distances
def _neighbours(query: torch.Tensor, train: torch.Tensor, k: int, mirror: torch.Tensor | None = None,
                exclude_self: bool = False, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k smallest distances from each query row to the training rows (float64), their indices and whether the
    mirror image matched. `mirror`: the training rows' mirror images, compared too. `exclude_self`: the query is
    the training set, and a row is never its own neighbour, nor are its exact duplicates (distance 0)."""
    out_d, out_i, out_f = [], [], []
    # cdist takes the matrix-product route (|a|^2 + |b|^2 - 2ab): an exact duplicate comes out at rounding size
    duplicate = 1e-6 * float(train.norm(dim=1).max()) if exclude_self else 0.0
    for start in range(0, query.shape[0], chunk):
        q = query[start:start + chunk]
        d = torch.cdist(q, train)
        flipped = torch.zeros_like(d, dtype=torch.bool)
        if mirror is not None:
            dm = torch.cdist(q, mirror)
            flipped = dm < d
            d = torch.minimum(d, dm)
        if exclude_self:
            rows = torch.arange(q.shape[0])
            d[rows, rows + start] = float("inf")
            d[d <= duplicate] = float("inf")  # exact duplicates of a training image are the same picture
        values, index = d.topk(min(k, d.shape[1]), dim=1, largest=False)
        out_d.append(values)
        out_i.append(index)
        out_f.append(flipped.gather(1, index))
    return torch.cat(out_d), torch.cat(out_i), torch.cat(out_f)


def space_neighbours(generated: np.ndarray | torch.Tensor, train: np.ndarray | torch.Tensor, k: int,
                     train_mirror: np.ndarray | torch.Tensor | None = None,
                     percentile: float = COPY_PERCENTILE) -> SpaceNeighbours:
    """Nearest training rows of each generated row, the training set's own nearest-neighbour distances, the bar and
    the copies, in one space (rows are features, or flattened pixels)."""
    g = torch.as_tensor(np.asarray(generated), dtype=torch.float64)
    t = torch.as_tensor(np.asarray(train), dtype=torch.float64)
    m = torch.as_tensor(np.asarray(train_mirror), dtype=torch.float64) if train_mirror is not None else None
    d, i, f = _neighbours(g, t, k, m)
    own, _, _ = _neighbours(t, t, 1, m, exclude_self=True)
    train_nn = own[:, 0].numpy()
    train_nn = train_nn[np.isfinite(train_nn)]  # an image whose only neighbours are its duplicates
    threshold = copy_threshold(train_nn, percentile)
    return SpaceNeighbours(i.numpy(), d.numpy(), f.numpy(), train_nn, threshold, is_copy(d[:, 0].numpy(), threshold))


def pixel_rows(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float64 rows scaled so that the Euclidean distance is the RMS difference in [0, 1]."""
    flat = images.reshape(images.shape[0], -1).double() / 255
    return flat / flat.shape[1] ** 0.5


# --------------------------------------------------------------------------- the training set
def training_set(dataset: str, image_size: int, channels: int, trained_with: dict | None = None,
                 max_images: int = MAX_TRAINING_IMAGES, **select) -> tuple[ImageSet, bool]:
    """The images the model was trained on (its ddpmkit.json's `--max_images` of the same dataset) or the whole
    dataset, at the model's size; and whether it trained with mirror images (--random_flip)."""
    config = trained_with or {}
    same = config.get("dataset") == dataset
    first = config.get("max_images") if same else None
    data = load_image_data(dataset, image_size, channels, image_column=select.get("image_column"),
                           split=select.get("split", "train"), cache_dir=select.get("data_cache_dir"),
                           max_images=first)
    images = data.images if torch.is_tensor(data.images) else data.images[:]
    chosen = f"the first {len(images)}, as trained" if first else ("all, as trained" if same else "all")
    if len(images) > max_images:
        logger.warning("%s has %d images: looking for copies among a seeded sample of %d only", dataset,
                       len(images), max_images)
        keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:max_images].sort().values
        images, chosen = images[keep], f"a seeded sample of {max_images}"
    flips = bool(config.get("random_flip", True)) if same else True
    describe = {"dataset": dataset, "image_size": image_size, "channels": channels, "count": len(images),
                "chosen": chosen, "flips": flips, "split": select.get("split", "train")}
    return ImageSet(images.contiguous(), None, None, describe), flips


def find_nearest(generated: ImageSet, generated_features: np.ndarray, train: ImageSet, extractor: FeatureExtractor,
                 cache: FeatureCache | None, k: int, flips: bool = True, progress: bool = True) -> Nearest:
    """Both spaces for `generated` (its Inception features already extracted) against the training set `train`
    (its features from the cache, or extracted once and kept there)."""
    if k < 1:
        raise UserError(f"--nearest must be at least 1 (got {k})")
    if generated.images.shape[1:] != train.images.shape[1:]:
        raise UserError(f"the generated images are {tuple(generated.images.shape[1:])} and the training images "
                        f"{tuple(train.images.shape[1:])}: compare them at the model's size (drop --image_size)")
    if k > len(train):  # what is shown is what was found: all of them
        logger.info("--nearest %d: the training set has %d images, so %d nearest are shown", k, len(train), len(train))
        k = len(train)
    train_features, _ = cached_features(train, extractor, cache, progress, "features (training set)")
    inception = space_neighbours(generated_features, train_features, k)
    mirror = pixel_rows(train.images.flip(-1)) if flips else None
    pixels = space_neighbours(pixel_rows(generated.images), pixel_rows(train.images), k, mirror)
    return Nearest(k, inception, pixels, dict(train.describe), generated.images, train.images)


def check_nearest(k: int, vs_dataset: str | None) -> None:
    """What fails before anything is sampled: a negative K, or --nearest on a second dataset (no training set)."""
    if k < 0:
        raise UserError(f"--nearest must be 0 (off) or more (got {k})")
    if k and vs_dataset is not None:
        raise UserError("--nearest looks for copies of training images among generated images: use it with --model "
                        "or --images, not --vs_dataset")


def look_for_copies(k: int, generated: ImageSet, generated_features: np.ndarray, dataset: str, model_name: str | None,
                    extractor: FeatureExtractor, cache: FeatureCache | None, grid: str | Path | None = None,
                    progress: bool = True, **select) -> dict:
    """`evaluate(nearest=K)`: the training set (as the model's ddpmkit.json says it trained, else all of `dataset`),
    both spaces, the grid of the closest pairs when `grid` names a file; returns what goes in the JSON."""
    from ddpmkit.models import model_meta

    try:
        trained_with = model_meta(model_name).get("train_config") if model_name else None
    except UserError:  # a damaged ddpmkit.json: search the whole dataset
        trained_with = None
    _, channels, size, _ = generated.images.shape
    train, flips = training_set(dataset, size, channels, trained_with if isinstance(trained_with, dict) else None,
                                **select)
    found = find_nearest(generated, generated_features, train, extractor, cache, k, flips, progress)
    out = found.to_dict()
    if grid is not None:
        out["grid"] = str(found.save_grid(grid))
    return out
