"""Multi-process runs on JAX's distributed runtime: who initialises it, and the agreements the trainer needs.

A multi-host job runs one process per host (or per group of local devices); every process executes the same
program over the global mesh. `initialize` is called once by the training CLI before any JAX computation: explicit
flags for a manual launch, JAX's own cluster detection on SLURM, Open MPI and multi-host TPU slices, nothing for a
plain single process. The trainer then uses a barrier, compiles its step on every process before the first
collective, stops every process at the same point on SIGTERM or Ctrl-C (`StopSignal`), and lets process 0's
clock decide the time-based checkpoints (`agree_with_process_0`). `generate` and `convert` stay single-process
tools (the sampler runs on one host's devices, the converter streams tensors on the host).
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
from typing import Any, Callable, Mapping

import jax
import numpy as np


_BARRIER_COUNT = itertools.count()  # the same sequence of barriers on every process gives unique, agreed names
_STOP_CHECK_COUNT = itertools.count(1)  # likewise the preemption sync points, increasing for the process's life


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


def compile_together(jitted, *args):
    """Compile `jitted` for `args` now and return the executable (call it with arguments of the same shapes and
    shardings). Several processes then meet at a barrier, so that they start its collectives together: JAX's CPU
    collectives (gloo) give the processes 30 s to join a new communicator, and compilation alone can differ by
    more than that on a busy host."""
    compiled = jitted.lower(*args).compile()
    if jax.process_count() > 1:
        barrier(f"compiled_{getattr(jitted, '__name__', 'function')}_{next(_BARRIER_COUNT)}")
    return compiled


def agree_with_process_0(value: bool) -> bool:
    """Process 0's `value` on every process (one small broadcast); the value itself for one process. For
    decisions every process must take alike but only one can make, e.g. from its own clock."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.bool_(value)))


def run_interruptibly(fn: Callable[[], Any], poll_s: float = 0.05) -> Any:
    """`fn()`, run in a helper thread while the main thread waits in short sleeps. Python runs signal handlers
    (a `StopSignal`'s) only in the main thread, between bytecodes, and JAX runs a program that calls back to
    the host (the sampler asking `should_stop`) synchronously in the calling thread: called directly, a
    SIGTERM during the sampler's loop would be seen only once the loop ends. Away from the main thread
    (no handlers there) `fn` runs directly."""
    if threading.current_thread() is not threading.main_thread():
        return fn()
    outcome: dict[str, Any] = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as err:  # re-raised in the caller's thread
            outcome["error"] = err

    helper = threading.Thread(target=target, name="run_interruptibly", daemon=True)
    helper.start()
    while helper.is_alive():
        helper.join(poll_s)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class StopSignal:
    """SIGTERM (a preemption notice) or Ctrl-C (SIGINT) -> a graceful stop at a point every process agrees on;
    the trainer then saves a checkpoint for the step it reached. A second Ctrl-C aborts at once: the first one
    puts the previous SIGINT handler back (Python's raises KeyboardInterrupt).

    One process: Python handlers set a flag, which `check` reads. Several: JAX's preemption service, which
    `jax.distributed.initialize` attaches to SIGTERM, spreads the notice to all processes and picks the first
    check they can all still reach (`reached_preemption_sync_point`), so a signal to any one process stops all
    of them at the same check, with no per-check collective. Every process must therefore call `check` the same
    number of times (once per step, once per evaluation batch). Ctrl-C on one process is turned into a SIGTERM
    to itself, i.e. into the same agreed stop; its second Ctrl-C aborts that process alone (the others then
    fail at their next collective).

    `reason` names the signal ("SIGINT" / "SIGTERM"; a process told by another one reports "SIGTERM")."""

    def __init__(self):
        self.requested = False
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        several = jax.process_count() > 1
        # Several processes: SIGTERM belongs to JAX's preemption service (a C++ handler), left alone.
        wanted = (signal.SIGINT,) if several else (signal.SIGTERM, signal.SIGINT)
        try:
            for signum in wanted:
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker thread): no signal handling
            self._restore()
        return self

    def _handle(self, signum, frame):
        if self.reason is None:
            self.reason = signal.Signals(signum).name
        if signum == signal.SIGINT:  # the next Ctrl-C aborts at once
            signal.signal(signal.SIGINT, _or_default(self._previous.pop(signal.SIGINT, None)))
            if jax.process_count() > 1:
                os.kill(os.getpid(), signal.SIGTERM)  # to the preemption service, which tells every process
                return
        self.requested = True

    def check(self) -> bool:
        """Stop now? Once True, stays True. Several processes: call it at the same points on every process."""
        if self.requested or jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        if multihost_utils.reached_preemption_sync_point(next(_STOP_CHECK_COUNT)):
            self.requested = True
            self.reason = self.reason or "SIGTERM"
        return self.requested

    def _restore(self):
        for signum, previous in self._previous.items():
            signal.signal(signum, _or_default(previous))
        self._previous = {}

    def __exit__(self, *exc):
        self._restore()


def _or_default(handler):
    """`signal.signal` reports a handler installed outside Python as None, which it does not accept back."""
    return signal.SIG_DFL if handler is None else handler
