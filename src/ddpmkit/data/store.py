"""Every image of a source decoded once into the uint8 cache (`ImageData`), on a few threads; a file that cannot be used
is skipped and reported in one line. Beyond --cache_max_gb the images are decoded from the source for every batch
instead (`DiskImages`)."""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ddpmkit.data.decode import DECODE_ERRORS, ImageRefused, decode_image, why_bad
from ddpmkit.errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class ImageData:
    """Decoded images of one source: `images` uint8 (N, C, H, W) (a tensor, or `DiskImages` beyond the cache cap),
    optional int64 `labels` (N,)."""

    images: torch.Tensor | "DiskImages"
    labels: torch.Tensor | None = None
    class_names: list[str] | None = None
    source: str = ""
    skipped: int = 0

    def __len__(self) -> int:
        return self.images.shape[0]


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
        except (ImageRefused, *DECODE_ERRORS) as err:
            return k, why_bad(err, item)
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
    if not bad or len(bad) == total:  # none readable: read_images' error says it, on one line
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
