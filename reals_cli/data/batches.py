"""A batch order that is a pure function of (seed, step, rank): resuming needs only the step.

Each epoch is a fresh seeded permutation of the dataset, split over ranks by
striding (every rank gets the same number of batches, no index twice in an
epoch); a run resumed at step s continues with exactly the batches an
uninterrupted run would have seen from step s on.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    def __init__(self, size: int, batch_size: int, seed: int, start_step: int = 0, rank: int = 0, world: int = 1):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start_step, self.rank, self.world = start_step, rank, world
        self.per_epoch = size // (batch_size * world)
        if self.per_epoch == 0:
            from ..errors import UserError

            raise UserError(
                f"{size} training images are fewer than one global batch ({batch_size} x {world} processes); "
                f"lower --batch-size or add images"
            )

        self._epoch, self._mine = -1, torch.empty(0, dtype=torch.long)

    def batch(self, step: int) -> list[int]:
        epoch, offset = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
            self._epoch, self._mine = epoch, order[self.rank :: self.world][: self.per_epoch * self.batch_size]
        return self._mine[offset * self.batch_size : (offset + 1) * self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1
