"""The one batching path: `ShuffledBatches` turns the uint8 cache into training batches in [-1, 1] (the course's
RandomHorizontalFlip + ToTensor + Normalize([0.5], [0.5]), done on the whole batch at once)."""
from __future__ import annotations

import numpy as np
import torch

from ddpmkit.data.store import ImageData


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

    `drop_last`: every batch has `batch_size` images (static shapes, for a step captured in a CUDA graph): an epoch's
    short last batch is left out (`dropped` images; the next epoch's order is a new permutation, so each image is
    still seen). Off, nothing changes: the same batches, order and `state_dict` as without it.
    """

    def __init__(self, data: ImageData, batch_size: int, seed: int, random_flip: bool = True,
                 device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1, drop_last: bool = False):
        self.seed, self.random_flip, self.rank, self.world_size = seed, random_flip, rank, world_size
        self.drop_last = drop_last
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
        if self.drop_last:
            return self.shard_size // self.batch_size
        return -(-self.shard_size // self.batch_size)

    @property
    def dropped(self) -> int:
        """Images per epoch and process left out by `drop_last` (0 without it)."""
        return self.shard_size - len(self) * self.batch_size if self.drop_last else 0

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
