"""What is kept between evaluations: reference features on disk, and the floors (measured here, or shipped).

Features are cached under a key made of the images' bytes, the size, the count, the resize method and the
network's hash (everything that changes them): a changed input recomputes, a corrupt file is recomputed with a
warning. A floor is the FID/KID of two disjoint samples of one dataset at a count, keyed by the dataset, split,
size, channels, count, network and resize; `write_shipped_floors` writes the ones that ship with ddpmkit.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from ddpmkit.data import slug
from ddpmkit.evaluation.features import FeatureExtractor
from ddpmkit.evaluation.imagesets import ImageSet
from ddpmkit.evaluation.metrics import Metrics

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
FLOORS_FILE = Path(__file__).resolve().parents[1] / "eval_floors.json"  # floors measured for the docs, shipped


def default_cache_dir() -> Path:
    """$DDPMKIT_CACHE, else $XDG_CACHE_HOME/ddpmkit, else ~/.cache/ddpmkit."""
    if os.environ.get("DDPMKIT_CACHE"):
        return Path(os.environ["DDPMKIT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "ddpmkit"


def _eval_folder(cache_dir: str | Path | None) -> Path:
    return (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / "eval"


def _write_json(path: Path, data: dict) -> None:
    """Whole or not at all: a temporary file beside it, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


class FeatureCache:
    """Reference features on disk (`<cache>/eval/`), keyed by the images' bytes, size, count, resize and network."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = _eval_folder(folder)

    def key(self, image_set: ImageSet, identity: dict) -> str:
        text = json.dumps([CACHE_VERSION, image_set.content_hash(), tuple(image_set.images.shape), identity],
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def path(self, image_set: ImageSet, identity: dict) -> Path:
        d = image_set.describe
        name = f"{slug(str(d.get('dataset', 'images')))[:60] or 'data'}-{d.get('image_size')}px-{len(image_set)}"
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


def cached_features(image_set: ImageSet, extractor: FeatureExtractor, cache: FeatureCache | None,
                    progress: bool = True, desc: str = "features") -> tuple[np.ndarray, str]:
    """Features of one image set, from the cache when it holds them (then 'reused'), else extracted
    ('computed') and kept there. Without a cache: always extracted."""
    if cache is not None:
        cached = cache.load(image_set, extractor.identity)
        if cached is not None:
            return cached, "reused"
    features = extractor(image_set.images, progress=progress, desc=desc)
    if cache is not None:
        cache.save(image_set, extractor.identity, features)
    return features, "computed"


# --------------------------------------------------------------------------- floors
def floor_key(dataset: str, image_size: int, channels: int, count: int, split: str, identity: dict) -> str:
    return f"{dataset}|{split}|{image_size}px|{channels}ch|{count}|{identity.get('sha256', '')[:16]}|{identity.get('resize')}"


def floor_entry(metrics: Metrics, count: int, split_fraction: float | None, measured: str) -> dict:
    """What a floor records: the four figures, the count a side, the split and the date it was measured."""
    return {"fid": metrics.fid, "kid_mean": metrics.kid_mean, "kid_std": metrics.kid_std,
            "precision": metrics.precision, "recall": metrics.recall, "count": count,
            "split_fraction": split_fraction, "measured": measured}


def _read_floors(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        logger.warning("ignoring the unreadable floors file %s", path)
        return {}


class Floors:
    """FID/KID of two disjoint samples of one dataset at a count: measured ones (cache) and shipped ones."""

    def __init__(self, cache_folder: str | Path | None = None):
        self.path = _eval_folder(cache_folder) / "floors.json"

    def get(self, key: str) -> dict | None:
        return _read_floors(self.path).get(key) or _read_floors(FLOORS_FILE).get(key)

    def put(self, key: str, value: dict) -> None:
        floors = _read_floors(self.path)
        floors[key] = value
        try:
            _write_json(self.path, floors)
        except OSError as err:
            logger.warning("could not record the floor in %s (%s)", self.path, err.strerror or err)


def write_shipped_floors(floors: dict[str, dict], path: Path = FLOORS_FILE) -> Path:
    """Add `floors` (floor_key -> floor_entry) to the floors that ship with ddpmkit (src/ddpmkit/eval_floors.json),
    which `ddpmkit eval` prints beside a model's FID; the entries already there for other keys stay."""
    _write_json(path, {**_read_floors(path), **floors})
    return path
