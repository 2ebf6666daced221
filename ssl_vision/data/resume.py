"""Mid-epoch resume: the training loader can continue part-way through an epoch.

Every checkpoint holds the datamodule's ``state_dict`` (epoch, shuffle seed, batches trained), and a
resumed run replays the rest of that epoch in the same order without reading the batches already
trained on. The pieces: ``EpochPosition`` (shared state), ``RecordedSeedSampler`` (records the
epoch's shuffle seed), ``ResumableLoader`` (skips the trained batches by index only).
"""

from __future__ import annotations

import itertools

import torch
from torch.utils.data import DataLoader, RandomSampler


def train_batches_done(trainer) -> int:
    """Training batches finished in the current epoch, 0 once the epoch is complete: where a checkpoint
    saved now stands inside its epoch (Lightning's own batch counter, the one its loop resumes from)."""
    done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
    return 0 if done >= trainer.num_training_batches else done


class EpochPosition:
    """Shared by the training loader, its sampler and the datamodule: the current epoch's shuffle seed
    and, after a resume from a checkpoint taken part-way through epoch ``resume_epoch``, that epoch's
    seed and the number of its batches already trained on. Every iterator made while the trainer is in
    that epoch replays it (Lightning makes more than one before the first batch, and loader workers
    draw indexes as soon as an iterator exists)."""

    def __init__(self, current_epoch):
        self.current_epoch = current_epoch
        self.seed: int | None = None
        self.resume_epoch: int | None = None
        self.resume_seed: int | None = None
        self.resume_batches = 0

    def resuming(self) -> bool:
        # <=: Lightning makes the resumed epoch's iterator before it restores its loops (epoch 0 then)
        return self.resume_epoch is not None and self.current_epoch() <= self.resume_epoch


class RecordedSeedSampler(RandomSampler):
    """``RandomSampler`` that draws its per-epoch seed from the global RNG exactly as ``RandomSampler``
    does (same order as a plain shuffled loader) and records it, so a resumed run can replay the epoch.
    Under DDP Lightning replaces it with a ``DistributedSampler`` (order from seed + epoch)."""

    def __init__(self, data_source, position: EpochPosition):
        super().__init__(data_source)
        self.position = position

    def __iter__(self):
        if self.position.resuming() and self.position.resume_seed is not None:
            seed = self.position.resume_seed
        else:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
        self.position.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        yield from super().__iter__()


class _SkipBatches:
    """The loader's batch sampler, starting after the batches a resumed epoch has already trained on
    (index lists only: the skipped images are never read)."""

    def __init__(self, batches, position: EpochPosition):
        self.batches, self.position = batches, position

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        skip = self.position.resume_batches if self.position.resuming() else 0
        yield from itertools.islice(iter(self.batches), skip, None)


class ResumableLoader(DataLoader):
    """A ``DataLoader`` whose next epoch can start part-way (``position.resume_batches``)."""

    def __init__(self, *args, position: EpochPosition, **kwargs):
        super().__init__(*args, **kwargs)
        self.position = position

    @property
    def _index_sampler(self):
        return _SkipBatches(super()._index_sampler, self.position)
