"""Stopping on SIGINT/SIGTERM after the step under way, with a checkpoint."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import torch

logger = logging.getLogger(__name__)


class StopOnSignal:
    """While active, the first SIGINT/SIGTERM only asks the training loop to stop; a second one stops at once.

    The loop checks :meth:`agreed` after every step: it saves a checkpoint there and raises
    ``KeyboardInterrupt``, so ``volgen train --resume`` continues from that very step. With several processes
    the main process's request decides for all (every rank stops after the same step). Outside the main
    thread nothing is installed.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning(
            "%s: stopping after this step with a checkpoint (send it again to stop at once)",
            signal.Signals(signum).name,
        )

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def agreed(self, accelerator: Any) -> bool:
        """Whether to stop after this step (the main process's request, broadcast to every process)."""
        if accelerator.num_processes == 1:
            return self.requested
        from accelerate.utils import broadcast

        flag = torch.tensor([self.requested], device=accelerator.device)
        return bool(broadcast(flag, from_process=0).item())
