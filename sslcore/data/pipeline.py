"""The streaming input pipeline: ``torch.utils.data`` loaders over item datasets, each rank reading its shard.

* **Global order from the run's seed.**  The trainer draws each epoch's permutation of the training set
  from the run's generator (in the main process, before the epoch's loader iterator exists), and
  :class:`ShardBatchSampler` cuts step ``s`` of it into the global batch ``perm[s B:(s + 1) B]`` and
  this rank's contiguous ``1/W`` of that.  So every rank reads, decodes and moves only its shard, the
  order does not depend on the number of workers, and a resume needs only the permutation and the
  step (the checkpoint's ``position``).
* **Workers decode, the device augments.**  Items are stored-format images (uint8 or float, one size);
  workers (``--workers``) read and decode them, the batch is pinned on CUDA and moved with
  ``non_blocking``; the random views are made on the device (:mod:`.augment`).
* **Batched reads.**  Item datasets implement ``__getitems__`` (a batch of indices in one call), so an
  in-memory set is one indexing per step, not one Python call per image.
"""
from __future__ import annotations

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler

from ..functional import to_float


class TensorItems(Dataset):
    """Items of an in-memory tensor ``[N, ...]``: ``__getitems__(indices)`` gives ``(index, x[index])``."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return index, self.x[index]


class ShardBatchSampler(Sampler[list[int]]):
    """Per step, this rank's indices: ``perm[s B + r b:s B + (r + 1) b]`` with the global batch ``B``, ``b = B / W``.

    :meth:`set_epoch` gives the epoch's permutation and the first step to read (a resumed epoch starts
    mid-way).  Only whole global batches are read (drop-last), so every step sees ``B`` samples.
    """

    def __init__(self, n: int, batch_size: int, *, world: int = 1, rank: int = 0):
        if batch_size % world:
            raise ValueError(f"the global batch ({batch_size}) must split evenly over {world} processes")
        self.steps, self.batch_size, self.world, self.rank = n // batch_size, batch_size, world, rank
        self.perm, self.first = torch.arange(n), 0

    def set_epoch(self, perm: torch.Tensor, first_step: int = 0) -> None:
        self.perm, self.first = perm, first_step

    def __len__(self) -> int:
        return self.steps - self.first

    def __iter__(self):
        per_rank = self.batch_size // self.world
        for s in range(self.first, self.steps):
            start = s * self.batch_size + self.rank * per_rank
            yield self.perm[start:start + per_rank].tolist()


class ItemError:
    """A batch that could not be read, returned by an item dataset in place of the batch: a loader worker's
    raised error would reach the main process as its traceback text; this message is raised as it is."""

    def __init__(self, message: str):
        self.message = message


class _Loader(DataLoader):
    """A ``DataLoader`` that raises an :class:`ItemError` batch as a ``ValueError`` with its message."""

    def __iter__(self):
        for batch in super().__iter__():
            if isinstance(batch, ItemError):
                raise ValueError(batch.message)
            yield batch


def _as_is(batch):
    """The collate step: ``__getitems__`` already returns the batch."""
    return batch


def _check_workers(items: Dataset, workers: int) -> None:
    """Items decoded on the GPU (an image folder's ``decoder=nvjpeg``) load in the main process only."""
    if workers and getattr(items, "decoder", None) == "nvjpeg":
        raise ValueError(f"--workers {workers}: imagefolder decoder=nvjpeg decodes on the GPU in the main process "
                         "(CUDA cannot start in forked loader workers): use --workers 0")


def loader(items: Dataset, batch_sampler: Sampler, *, workers: int = 0, device: torch.device | None = None,
           prefetch: int = 2) -> DataLoader:
    """A ``DataLoader`` over ``items`` (a dataset with ``__getitems__``) in the sampler's batches: ``workers``
    processes (kept across epochs), ``prefetch`` batches ahead per worker, pinned memory for CUDA."""
    _check_workers(items, workers)
    return _Loader(items, batch_sampler=batch_sampler, num_workers=workers, collate_fn=_as_is,
                      pin_memory=device is not None and device.type == "cuda",
                      prefetch_factor=prefetch if workers else None, persistent_workers=workers > 0)


def sequential_loader(items: Dataset, batch_size: int, *, workers: int = 0,
                      device: torch.device | None = None) -> DataLoader:
    """The items in order, in batches of ``batch_size`` (the last one may be smaller): for features."""
    _check_workers(items, workers)
    return _Loader(items, batch_sampler=BatchSampler(SequentialSampler(items), batch_size, drop_last=False),
                      num_workers=workers, collate_fn=_as_is, pin_memory=device is not None and device.type == "cuda")


__all__ = ["ItemError", "ShardBatchSampler", "TensorItems", "loader", "sequential_loader", "to_float"]
