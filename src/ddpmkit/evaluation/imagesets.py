"""Image sets: uint8 images (N, C, H, W) and what they are, from a dataset, a folder of images or a tensor.

A dataset's images are drawn by a seeded permutation, so every evaluation at N images compares with the same
reference; with a split fraction the permutation is cut into two disjoint parts (the floor's two sides).
Folders are read by `ddpmkit.data`, the opener training uses: a decompression bomb, a truncated or a
non-image file is skipped and named in one summary line, never a traceback.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ddpmkit.data import IMAGE_EXTENSIONS, decode_image, load_image_data
from ddpmkit.data.decode import DECODE_ERRORS
from ddpmkit.errors import UserError
from ddpmkit.evaluation.metrics import MIN_IMAGES
from ddpmkit.images import to_uint8_nchw

logger = logging.getLogger(__name__)


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
    if available < MIN_IMAGES:
        where = f" in part {part!r} of --split_fraction {split_fraction}" if split_fraction is not None else ""
        raise UserError(f"dataset {dataset} has {available} image{'s' * (available != 1)}{where}: FID, precision "
                        f"and recall need at least {MIN_IMAGES} on each side (give a larger dataset)")
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


def dataset_halves(dataset: str, image_size: int, channels: int, count: int, **select) -> tuple[ImageSet, ImageSet]:
    """The floor's two sides: `count` images from each of two disjoint halves of one dataset (`dataset_images`
    with split fraction 0.5). The first N of a larger count are exactly the images of count N."""
    return tuple(dataset_images(dataset, image_size, channels, count, split_fraction=0.5, part=part, **select)
                 for part in ("a", "b"))


def is_pipeline_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "model_index.json").exists() or (path / "unet").is_dir())


def _first_image_size(files: list[Path], channels: int) -> int | None:
    """The larger side of the first file that decodes as training decodes it; a decompression bomb, a truncated
    or a non-image file is passed over here and reported by `load_image_data`."""
    for file in files:
        try:
            decode_image(file, 1, channels)  # the safe opener: a bomb is refused before it is decoded
        except DECODE_ERRORS:
            continue
        with Image.open(file) as image:  # the header only, of a file that just decoded
            return max(image.size)
    return None


def folder_images(folder: str | Path, image_size: int | None = None, channels: int = 3,
                  count: int | None = None) -> ImageSet:
    """Every image of a folder (any tool made them), at `image_size` (default: the first usable image's size)."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise UserError(f"--images {folder} is not a folder: point it at a folder of generated images")
    if is_pipeline_folder(path):
        raise UserError(f"--images {folder} is a pipeline folder, not a folder of images: use --model {folder} to "
                        "sample it and evaluate the samples")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise UserError(f"no images in folder {folder}: it needs png, jpg, webp, bmp, gif or tiff files")
    image_size = image_size or _first_image_size(files, channels)
    if image_size is None:
        raise UserError(f"no readable image in folder {folder}: none of its {len(files)} image files could be "
                        "decoded (empty, truncated, not an image, or too many pixels)")
    data = load_image_data(str(path), image_size, channels, max_images=count)
    images = data.images if torch.is_tensor(data.images) else data.images[:]  # over --cache_max_gb: decode now
    return ImageSet(images, None, None, {"images": str(path), "image_size": image_size, "count": len(data),
                                         "skipped": data.skipped})


def tensor_images(images: torch.Tensor, image_size: int | None = None) -> ImageSet:
    """A tensor of images (uint8, or float in [-1, 1]) as an image set."""
    images = to_uint8_nchw(images)
    return ImageSet(images, describe={"images": "tensor", "count": images.shape[0],
                                      "image_size": image_size or int(images.shape[-1])})


def open_images(images: str | os.PathLike | torch.Tensor, image_size: int | None = None,
                count: int | None = None) -> ImageSet:
    """Images already made: a folder (its first `count` images) or a tensor; at least MIN_IMAGES of them."""
    if torch.is_tensor(images):
        image_set = tensor_images(images, image_size)
    elif isinstance(images, (str, os.PathLike)):
        image_set = folder_images(images, image_size, count=count)
    else:
        raise UserError(f"images must be a folder or a tensor of images (got a {type(images).__name__})")
    if len(image_set) < MIN_IMAGES:
        raise UserError(f"FID, precision and recall need at least {MIN_IMAGES} images on each side (got "
                        f"{len(image_set)} to evaluate)")
    return image_set
