"""Data modules of (condition, sample_id) pairs.

Sample ``i`` of a run gets condition ``conditions[i % len(conditions)]`` and its
own noise stream seeded from ``(seed, i)``. Under several processes every rank
takes the ids ``rank, rank + world, ...``: no padding duplicates, every id once.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from tsf.data.prompts import conditions_or_prompts
from tsf.errors import ConfigError


class ConditionSampleIds(Dataset):
    def __init__(self, conditions: Sequence[Any], num_samples: int) -> None:
        self.conditions, self.num_samples = list(conditions), num_samples

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.conditions[i % len(self.conditions)], i


class ShardSampler(Sampler[int]):
    """Indices ``rank::world`` in order: an unpadded, deterministic shard. The split of Lightning's
    ``UnrepeatedDistributedSampler`` (a test shows it), which lives outside Lightning's public API
    (docs/architecture.md, "Several processes")."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def collate(items: list[tuple[Any, int]]) -> dict[str, Any]:
    return {"conditions": [c for c, _ in items], "sample_ids": torch.tensor([i for _, i in items], dtype=torch.long)}


class SampleIdsDataModule(L.LightningDataModule):
    """The outputs of a sampling run.

    Args:
        num_samples: number of outputs N (sample ids ``0 .. N-1``).
        conditions: conditions cycled over the sample ids (a digit class, a prompt, or ``null``
            for none).
        prompts: instead of ``conditions``, the prompts: a list (``["a red apple", "a photo of a cat"]``),
            a shipped set's name (``animals``), a text file (one prompt per line) or
            ``hf:<dataset>[:<split>[:<column>]]`` (see :func:`tsf.data.prompts.load_prompts`).
        seed: the run seed; sample ``i`` draws its noise from ``(seed, i)``.
        batch_size: outputs per ``sampler.sample`` call (particles multiply it); results do
            not depend on it.
    """

    def __init__(self, num_samples: int = 64, conditions: Optional[list[Any]] = None, seed: int = 0,
                 batch_size: int = 64, prompts: Optional[Union[list[str], str]] = None) -> None:
        super().__init__()
        if num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.num_samples = int(num_samples)
        self.prompts = prompts
        conditions = conditions_or_prompts(conditions, prompts)
        self.conditions = list(conditions) if conditions else [None]
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.dataset = ConditionSampleIds(self.conditions, self.num_samples)

    def sample_conditions(self) -> list[Any]:
        """The condition of every sample id, in id order."""
        return [self.dataset[i][0] for i in range(self.num_samples)]

    def test_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return DataLoader(self.dataset, batch_size=self.batch_size,
                          sampler=ShardSampler(self.num_samples, rank, world), collate_fn=collate)

    predict_dataloader = test_dataloader
