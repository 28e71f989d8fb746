"""Per-step randomness: every random draw of a step comes from generators seeded by ``(seed, stream, step)``.

Which slices form the batch, the timesteps, the noise, the ablation and the augmentation of each sample are
functions of the run seed and the step (and a sample's position in the global batch), never of a running
iterator: a resumed run repeats an uninterrupted one, and N processes draw the same global batch as one."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from volgen.errors import ConfigError

# Independent random streams derived from (seed, stream, step).
STREAM_DATA = 0
STREAM_NOISE = 1
STREAM_ABLATION = 2
STREAM_AUGMENT = 3
STREAM_EDGE = 4
STREAM_DROPOUT = 5
STREAM_ERASE = 6
STREAM_INPLANE = 7
STREAM_FULL_MASK = 8


def step_seed(seed: int, stream: int, step: int, *more: int) -> int:
    """A 63-bit seed for one random stream of one step (or epoch), independent of the others; ``more``
    splits it further (e.g. by process)."""
    entropy = [int(seed), int(stream), int(step), *(int(m) for m in more)]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 ^ int(state[1])) & ((1 << 63) - 1)


def seeded_generator(seed: int, stream: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(step_seed(seed, stream, step))


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields this process's share of each step's global batch, derived from ``(seed, step)`` only.

    Args:
        num_samples: Dataset length.
        batch_size: Global batch size (all processes together).
        seed: Run seed.
        start_step: First step (0-based) to yield; ``end_step`` is exclusive.
        weights: Per-sample weights (draw with replacement, ``WeightedRandomSampler``-style) or ``None``
            (uniform: seeded permutations, every sample once per epoch).
        rank, world_size: This process's slice of the global batch.
        augment_seeds: Yield ``(index, seed)`` pairs instead of bare indices: the seed of each sample's
            augmentation, derived from ``(seed, step, position in the global batch)``; ``samples_per_draw``
            consecutive positions share one.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int,
        start_step: int,
        end_step: int,
        weights: torch.Tensor | None = None,
        rank: int = 0,
        world_size: int = 1,
        augment_seeds: bool = False,
        samples_per_draw: int = 1,
    ) -> None:
        if batch_size % world_size:
            raise ConfigError(
                None, f"training.batch_size {batch_size} must be divisible by {world_size} processes"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.start_step = start_step
        self.end_step = end_step
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.rank = rank
        self.world_size = world_size
        self.augment_seeds = augment_seeds
        self.samples_per_draw = samples_per_draw
        self._permutations: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._permutations:
            if len(self._permutations) > 2:
                self._permutations.pop(min(self._permutations))
            gen = seeded_generator(self.seed, STREAM_DATA, epoch)
            self._permutations[epoch] = torch.randperm(self.num_samples, generator=gen)
        return self._permutations[epoch]

    def global_indices(self, step: int) -> list[int]:
        """Dataset indices of the whole global batch of ``step``."""
        if self.weights is not None:
            gen = seeded_generator(self.seed, STREAM_DATA, step)
            return torch.multinomial(self.weights, self.batch_size, replacement=True, generator=gen).tolist()
        positions = range(step * self.batch_size, (step + 1) * self.batch_size)
        return [int(self._permutation(p // self.num_samples)[p % self.num_samples]) for p in positions]

    def local_slice(self) -> slice:
        share = self.batch_size // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)

    def __iter__(self):
        local = self.local_slice()
        for step in range(self.start_step, self.end_step):
            indices = self.global_indices(step)
            if not self.augment_seeds:
                yield indices[local]
                continue
            base, group = step * self.batch_size, self.samples_per_draw
            positions = range(local.start, local.stop)
            yield [
                (indices[p], step_seed(self.seed, STREAM_AUGMENT, base + p // group * group))
                for p in positions
            ]

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)


def step_noise(
    step: int,
    *,
    seed: int,
    batch_size: int,
    shape: tuple[int, ...],
    num_train_timesteps: int,
    num_classes: int,
    ablation_p: float,
    offset_noise: float = 0.0,
    full_mask_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global batch's noise ``(B, *shape)``, timesteps ``(B,)`` and ablation ``(B, C)`` of one step.

    ``offset_noise > 0`` adds a per-sample, per-channel constant ``offset_noise * N(0, 1)`` to the noise.
    ``full_mask_p > 0`` spares that share of the samples from ablation (every class kept and flagged
    specified, as in a generation from a whole mask), drawn from a stream of its own so that runs without it
    are unchanged.
    """
    from volgen.conditioning import draw_ablation

    gen = seeded_generator(seed, STREAM_NOISE, step)
    timesteps = torch.randint(0, num_train_timesteps, (batch_size,), generator=gen)
    noise = torch.randn((batch_size, *shape), generator=gen)
    if offset_noise > 0:
        noise = noise + offset_noise * torch.randn((batch_size, shape[0], 1, 1), generator=gen)
    removed = draw_ablation(
        batch_size, num_classes, ablation_p, generator=seeded_generator(seed, STREAM_ABLATION, step)
    )
    if full_mask_p > 0:
        whole = torch.rand(batch_size, generator=seeded_generator(seed, STREAM_FULL_MASK, step)) < full_mask_p
        removed[whole] = False
    return noise, timesteps, removed


def step_edge_cuts(step: int, *, seed: int, batch_size: int, p: float, context_slices: int) -> torch.Tensor:
    """The global batch's edge cuts ``(B,)`` of one step (see :func:`volgen.data.apply_edge_cuts`).

    Each sample is cut with probability ``p``: the anatomy starts ``d`` slices above (``+d``) or below
    (``-d``) its centre, ``d`` uniform in ``1 .. max(1, context_slices)``; uncut samples are ``0``.
    """
    cuts = torch.zeros(batch_size, dtype=torch.int64)
    if p <= 0:
        return cuts
    gen = seeded_generator(seed, STREAM_EDGE, step)
    chosen = torch.rand(batch_size, generator=gen) < p
    depth = torch.randint(1, max(1, context_slices) + 1, (batch_size,), generator=gen)
    side = torch.randint(0, 2, (batch_size,), generator=gen) * 2 - 1
    return torch.where(chosen, depth * side, cuts)


def seed_step_dropout(seed: int, step: int, rank: int) -> None:
    """Seeds torch's global generators (which dropout draws from) for one step of one process.

    Dropout masks then depend on ``(seed, step, rank)`` only, so a resumed run repeats an uninterrupted one;
    each process of a multi-process run draws its own masks for its share of the batch.
    """
    torch.manual_seed(step_seed(seed, STREAM_DROPOUT, step, rank))


def step_erasures(step: int, *, seed: int, batch_size: int, p: float) -> torch.Tensor:
    """Which samples of one step's global batch have ``data.erase_classes`` erased, ``(B,)`` bool (see
    :func:`volgen.data.erase_classes`); each with probability ``p``."""
    if p <= 0:
        return torch.zeros(batch_size, dtype=torch.bool)
    return torch.rand(batch_size, generator=seeded_generator(seed, STREAM_ERASE, step)) < p


def step_inplane_cuts(
    step: int, *, seed: int, batch_size: int, p: float, weights: Sequence[float] | None = None
) -> torch.Tensor:
    """The global batch's in-plane cuts ``(B, 7)`` of one step (see :func:`volgen.data.apply_inplane_cuts`).

    Each sample is cut with probability ``p``: column 0 is its kind (half-plane, ellipse, erosion or band,
    drawn in proportion to ``weights``, one per kind; ``None``: a quarter each; -1: not cut), columns 1-6
    uniforms in [0, 1) that place and size the region.
    """
    from volgen.data import CUT_KINDS

    cuts = torch.zeros(batch_size, 7)
    cuts[:, 0] = -1
    if p <= 0:
        return cuts
    weights = torch.ones(CUT_KINDS) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    gen = seeded_generator(seed, STREAM_INPLANE, step)
    chosen = torch.rand(batch_size, generator=gen) < p
    kinds = torch.multinomial(weights, batch_size, replacement=True, generator=gen).float()
    cuts[:, 0] = torch.where(chosen, kinds, cuts[:, 0])
    cuts[:, 1:] = torch.rand(batch_size, 6, generator=gen)
    return cuts
