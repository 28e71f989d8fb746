"""The process group of a multi-process batch run (``torchrun`` / ``accelerate launch``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from volgen.errors import VolgenError

#: How long a rank waits for the others at the end of a multi-process run (ranks finish at different times).
BARRIER_TIMEOUT = timedelta(days=7)


@dataclass
class ProcessGroup:
    """This process's place in an accelerate/torchrun launch (rank 0 of 1 otherwise)."""

    rank: int = 0
    world: int = 1
    device: str = "auto"
    state: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


def process_group(device: str = "auto") -> ProcessGroup:
    """Join the process group when launched by ``torchrun``/``accelerate launch`` (``WORLD_SIZE`` > 1).

    Uses ``accelerate.PartialState``: gloo on CPU (``device="cpu"`` or no CUDA), NCCL with one GPU per rank
    otherwise. The barrier timeout is long (:data:`BARRIER_TIMEOUT`) because ranks finish their shards at
    different times.
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        world = 1
    if world <= 1:
        return ProcessGroup(device=device)
    import torch
    from accelerate import PartialState

    if device == "cuda" and not torch.cuda.is_available():
        raise VolgenError("--device cuda: no CUDA device is available")
    cpu = device == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=cpu, timeout=BARRIER_TIMEOUT)
    rank_device = "cpu" if cpu else str(state.device)
    return ProcessGroup(rank=state.process_index, world=state.num_processes, device=rank_device, state=state)
