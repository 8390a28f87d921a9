"""One image -> uint8 (C, H, W): opened safely (an image over Pillow's pixel limit is refused before it is decoded),
first frame, EXIF orientation, transparency on white, 16-bit scaled to 8 bits, resized like torchvision's Resize."""
from __future__ import annotations

import io
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_OPEN_LOCK = threading.Lock()  # Image.open warns about large images through the (process-global) warnings filters
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
ORIENTATION_TAG = 0x0112  # EXIF Orientation
DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError)  # what a bad file raises


class ImageRefused(ValueError):
    """An image ddpmkit will not decode (too many pixels: a decompression bomb)."""


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
    grayscale scaled to 8 bits (65535 -> 255), float grayscale in [0, 1] too (1.0 -> 255); CMYK, palette and
    grayscale converted to RGB.
    """
    if isinstance(data, Image.Image):
        return _convert(data, image_size, channels)
    with _open(data) as image:  # closed at once: an animation would otherwise keep its file open
        return _convert(image, image_size, channels)


def _convert(image: Image.Image, image_size: int, channels: int) -> np.ndarray:
    image.load()
    if image.getexif().get(ORIENTATION_TAG, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "F":  # Pillow would clip (65535 to 255, 0.7 to 0), not scale
        wide = np.nan_to_num(np.asarray(image, dtype=np.float64))
        # 16-bit: 65535 -> 255; float (a TIFF): [0, 1] -> 0..255, larger values read as 0..255
        divisor = 257.0 if image.mode != "F" else 1 / 255.0 if wide.max() <= 1.0 else 1.0
        image = Image.fromarray(np.clip(np.rint(wide / divisor), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    image = image.convert("RGB" if channels == 3 else "L")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def why_bad(err: Exception, item) -> str:
    """Why an item could not be decoded, in a few words (for the one summary line)."""
    if isinstance(err, ImageRefused):
        return str(err)
    if isinstance(err, UnidentifiedImageError):
        if isinstance(item, (str, Path)) and Path(item).is_file() and Path(item).stat().st_size == 0:
            return "empty file"
        return "not an image"
    return f"truncated or corrupt ({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})"
