"""Per-step seeding: data order and noise depend only on (seed, step, rank)."""
from __future__ import annotations

import numpy as np
import torch

STREAM_DATA, STREAM_METHOD, STREAM_GLOBAL = 0, 1, 2


def step_seed(seed: int, step: int, rank: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank, stream]).generate_state(1, np.uint64)[0] >> 1)


def seed_step(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """Reseed the global RNG (dropout) and return the method's generator for this step."""
    torch.manual_seed(step_seed(seed, step, rank, STREAM_GLOBAL))
    gen = torch.Generator(device=device)
    gen.manual_seed(step_seed(seed, step, rank, STREAM_METHOD))
    return gen


class EpochSampler:
    """Global sample positions -> dataset indices: a fresh permutation per epoch from (seed, epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._cache: tuple[int, torch.Tensor] | None = None

    def _perm(self, epoch: int) -> torch.Tensor:
        if self._cache is None or self._cache[0] != epoch:
            gen = torch.Generator().manual_seed(step_seed(self.seed, epoch, 0, STREAM_DATA))
            self._cache = (epoch, torch.randperm(self.n, generator=gen))
        return self._cache[1]

    def indices(self, start: int, count: int) -> torch.Tensor:
        """Dataset indices of global positions start .. start + count - 1."""
        parts, pos = [], start
        while count > 0:
            epoch, offset = divmod(pos, self.n)
            take = min(count, self.n - offset)
            parts.append(self._perm(epoch)[offset:offset + take])
            pos, count = pos + take, count - take
        return torch.cat(parts)

    def batch(self, step: int, batch_size: int, rank: int, world_size: int) -> torch.Tensor:
        """This rank's slice of the global batch of `step`."""
        local = batch_size // world_size
        return self.indices(step * batch_size + rank * local, local)
