"""Multi-process runs on JAX's distributed runtime: who initialises it, and the agreements the trainer needs.

A multi-host job runs one process per host (or per group of local devices); every process executes the same
program over the global mesh. `initialize` is called once by the training CLI before any JAX computation: explicit
flags for a manual launch, JAX's own cluster detection on SLURM, Open MPI and multi-host TPU slices, nothing for a
plain single process. The trainer then uses a barrier, compiles its step on every process before the first
collective, and stops every process after the same step on SIGTERM. `generate` and `convert` stay
single-process tools (the sampler runs on one host's devices, the converter streams tensors on the host).
"""

from __future__ import annotations

import itertools
import os
import signal
from typing import Mapping

import jax


_BARRIER_COUNT = itertools.count()  # the same sequence of barriers on every process gives unique, agreed names


class DistributedSetupError(ValueError):
    """Inconsistent multi-process flags; the message names them."""


def launch_kind(coordinator_address: str | None = None, num_processes: int | None = None,
                process_id: int | None = None, environ: Mapping[str, str] = os.environ) -> str | None:
    """'manual' (explicit flags, all three required), 'slurm', 'mpi' or 'tpu' (JAX detects the arguments), or
    None for a single process. A one-task SLURM or MPI job counts as a single process."""
    given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
             "--process_id": process_id}
    if any(value is not None for value in given.values()):
        missing = [name for name, value in given.items() if value is None]
        if missing:
            raise DistributedSetupError(f"a manual multi-process launch needs {', '.join(given)}; missing "
                                        f"{', '.join(missing)}")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise DistributedSetupError(f"--process_id={process_id} is not in [0, --num_processes={num_processes})")
        return "manual"
    if "SLURM_JOB_ID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    if int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "mpi"
    if environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        return "tpu"
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, environ: Mapping[str, str] = os.environ) -> str | None:
    """Start `jax.distributed` if this is a multi-process launch (see `launch_kind`, which is returned). Must run
    before any JAX computation."""
    kind = launch_kind(coordinator_address, num_processes, process_id, environ)
    if kind == "manual":
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    elif kind is not None:
        jax.distributed.initialize()
    return kind


def barrier(name: str, timeout_s: float = 1800.0) -> None:
    """Wait until every process gets here, through the coordination service (no device collective, so no
    communicator to set up). A no-op for one process; `name` must be unique per barrier."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed  # the client Orbax's barriers use too

    jax_distributed.global_state.client.wait_at_barrier(name, int(timeout_s * 1000))


def compile_together(jitted, *args) -> None:
    """Several processes: compile `jitted` for `args` now (the next call reuses it), then meet at a barrier, so
    that the processes start its collectives together. JAX's CPU collectives (gloo) give the processes 30 s to
    join a new communicator, and compilation alone can differ by more than that on a busy host."""
    if jax.process_count() > 1:
        jitted.lower(*args).compile()
        barrier(f"compiled_{getattr(jitted, '__name__', 'function')}_{next(_BARRIER_COUNT)}")


class StopSignal:
    """SIGTERM (a preemption notice) -> stop at a step that every process agrees on. One process: a Python
    handler sets a flag, read at the end of each step. Several: JAX's preemption service, which
    `jax.distributed.initialize` attaches to SIGTERM, spreads the notice to all processes and picks the first
    step they can all still reach (`reached_preemption_sync_point`), so a signal to any one process stops all of
    them after the same step, with no per-step collective."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if jax.process_count() == 1:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): no signal handling
                self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def should_stop(self, step: int) -> bool:
        """Call once per step, on every process, with the number of steps done."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        self.requested = multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
