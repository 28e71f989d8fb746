"""volgen's thread policy, one for the command line and the Python API.

PyTorch's CPU kernels run on OpenMP threads. By default (GNU OpenMP, the one PyTorch's Linux wheels ship)
an idle thread *spins* for a while before it sleeps. On a machine where another process keeps a core busy,
spinning threads and that process fight for the cores and every parallel region waits for the slowest
thread: volgen became up to 14x slower (see benchmarks/README.md, "Thread policy"). With
``OMP_WAIT_POLICY=PASSIVE`` waiting threads sleep instead; on an idle machine that costs nothing
measurable.

OpenMP reads ``OMP_WAIT_POLICY`` once, when its library is loaded, which happens when ``torch`` is first
imported. ``import volgen`` (which every volgen entry point does first: the ``volgen`` command, ``python -m
volgen``, ``from volgen.api import generate``) therefore sets it, unless the user has set it. When ``torch``
was imported before volgen the setting can no longer take effect: :func:`apply_thread_policy` then says so
in a logged warning (set the variable before starting Python, or import volgen before torch).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Literal

logger = logging.getLogger(__name__)

#: The environment variable OpenMP reads, and the value volgen chooses.
WAIT_POLICY_VARIABLE = "OMP_WAIT_POLICY"
WAIT_POLICY = "PASSIVE"

PolicySource = Literal["volgen", "user", "too late"]


@dataclass(frozen=True)
class ThreadPolicy:
    """The OpenMP wait policy in effect for this process.

    Attributes:
        wait_policy: The value of ``OMP_WAIT_POLICY`` OpenMP uses, or ``None`` for OpenMP's own default
            (spinning), which is the case when ``source`` is "too late".
        source: "volgen" (volgen set it before torch loaded), "user" (set in the environment by the
            user, left alone) or "too late" (torch, hence OpenMP, was loaded before volgen could set it).
    """

    wait_policy: str | None
    source: PolicySource


def apply_thread_policy(
    environ: dict[str, str] | None = None, *, torch_loaded: bool | None = None
) -> ThreadPolicy:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a value, before OpenMP reads it.

    Called once by ``import volgen``; calling it again is harmless.

    Args:
        environ: The environment to change (``os.environ`` when ``None``; a dict in tests).
        torch_loaded: Whether torch is already imported (looked up in ``sys.modules`` when ``None``).

    Returns:
        The policy in effect.
    """
    env = os.environ if environ is None else environ
    loaded = ("torch" in sys.modules) if torch_loaded is None else torch_loaded
    if WAIT_POLICY_VARIABLE in env:
        return ThreadPolicy(env[WAIT_POLICY_VARIABLE], "user")
    if loaded:
        # Setting it now would be a lie: OpenMP has read its environment already.
        if env.get("OMP_NUM_THREADS", "").strip() != "1":  # one thread never waits for another
            logger.warning(
                "torch was imported before volgen, so OpenMP threads spin while waiting; on a machine shared "
                "with other busy processes this can make volgen many times slower. Import volgen first or "
                "set %s=%s before starting Python.",
                WAIT_POLICY_VARIABLE,
                WAIT_POLICY,
            )
        return ThreadPolicy(None, "too late")
    env[WAIT_POLICY_VARIABLE] = WAIT_POLICY
    return ThreadPolicy(WAIT_POLICY, "volgen")
