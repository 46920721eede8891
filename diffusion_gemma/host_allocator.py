"""Large host buffers on transparent huge pages, for CPU training.

XLA:CPU allocates each step's large temporary buffers with malloc. glibc serves allocations above its mmap
threshold (32 MiB at most) with fresh mmaps, so every step faults its buffers in again, 4 KiB at a time, and a
sizeable share of a CPU run's time goes to the kernel. glibc >= 2.35 can advise transparent huge pages for
those mappings (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`); measured effects are in the experiment READMEs under
experiments/. Tunables are read when a process starts, so the training CLI re-executes itself once with the
setting, and says so in one line.

It does so only where it helps and cannot disturb anything: a CPU-backend, single-process launch. On an
accelerator the big buffers live in device memory, and a multi-process launch is left exactly as its launcher
started it. `DIFFUSION_GEMMA_HUGE_PAGES=1` asks for the re-exec on any launch, `=0` never does it; a hugetlb
tunable the user set already is kept as it is. The decision reads flags and the environment only (it runs
before JAX picks a backend).
"""

from __future__ import annotations

import glob
import os
import sys
from typing import Iterable, Mapping, Sequence

TUNABLES = "GLIBC_TUNABLES"
HUGE_PAGES = "glibc.malloc.hugetlb=1"
SWITCH = "DIFFUSION_GEMMA_HUGE_PAGES"
_THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
# Device files of accelerators JAX would use instead of the CPU: NVIDIA GPUs, TPUs (/dev/accel*, or VFIO
# groups on newer TPU VMs), AMD GPUs (ROCm's /dev/kfd).
ACCELERATOR_DEVICE_PATTERNS = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*", "/dev/kfd")
# Set on TPU VMs even where the device files are not visible (containers).
ACCELERATOR_ENV = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID", "TPU_WORKER_HOSTNAMES")


class HugePagesSwitchError(ValueError):
    """`DIFFUSION_GEMMA_HUGE_PAGES` set to something other than 0 or 1."""


def glibc_version() -> tuple[int, ...]:
    """(2, 36) for glibc 2.36; () when the C library is not glibc."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):
        return ()
    return tuple(int(part) for part in version.split(".") if part.isdigit()) if name == "glibc" else ()


def transparent_huge_pages() -> str:
    """The kernel's THP mode ("always", "madvise" or "never"; "" where unknown)."""
    try:
        with open(_THP_MODE_FILE) as f:
            text = f.read()
    except OSError:
        return ""
    return text[text.find("[") + 1: text.find("]")] if "[" in text else ""


def accelerator_evidence(environ: Mapping[str, str],
                         patterns: Iterable[str] = ACCELERATOR_DEVICE_PATTERNS) -> list[str]:
    """What says this host has an accelerator (device files, TPU variables), without starting any backend."""
    found = [path for pattern in patterns for path in sorted(glob.glob(pattern))]
    return found + [name for name in ACCELERATOR_ENV if environ.get(name)]


def cpu_backend(environ: Mapping[str, str], accelerators: Sequence[str]) -> bool:
    """Whether JAX will run on the CPU: `JAX_PLATFORMS` says so (cpu only), or it is unset and no accelerator
    is in sight."""
    platforms = [name.strip().lower() for name in environ.get("JAX_PLATFORMS", "").split(",") if name.strip()]
    if platforms:
        return set(platforms) == {"cpu"}
    return not accelerators


def wants_huge_pages(environ: Mapping[str, str], *, single_process: bool, accelerators: Sequence[str],
                     platform: str, glibc: tuple[int, ...], thp: str) -> bool:
    """Whether to re-execute with the tunable. Never when the switch is 0, a hugetlb tunable is set already,
    or the tunable cannot act (not Linux, glibc < 2.35, THP disabled); always when the switch is 1; otherwise
    for a CPU-backend, single-process launch only."""
    switch = environ.get(SWITCH, "").strip()
    if switch not in ("", "0", "1"):
        raise HugePagesSwitchError(f"{SWITCH}={environ[SWITCH]!r}: expected 1 (re-execute with huge-page malloc), "
                                   "0 (never) or unset (CPU-backend, single-process launches only)")
    if switch == "0" or "glibc.malloc.hugetlb" in environ.get(TUNABLES, ""):
        return False
    if platform != "linux" or glibc < (2, 35) or thp not in ("always", "madvise"):
        return False
    return switch == "1" or (single_process and cpu_backend(environ, accelerators))


def with_huge_pages(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with the tunable appended to any the user already set."""
    env = dict(environ)
    env[TUNABLES] = ":".join(part for part in (env.get(TUNABLES, ""), HUGE_PAGES) if part)
    return env


def reexec_with_huge_pages(prog: str, *, single_process: bool) -> None:
    """Replace this process by the same command line with the tunable set (same PID, so process managers see
    nothing), printing one line, if `wants_huge_pages` says so; otherwise return."""
    if not wants_huge_pages(os.environ, single_process=single_process, accelerators=accelerator_evidence(os.environ),
                            platform=sys.platform, glibc=glibc_version(), thp=transparent_huge_pages()):
        return
    print(f"{prog}: re-executing with {TUNABLES}={HUGE_PAGES} (huge pages for XLA:CPU's large host buffers; "
          f"{SWITCH}=0 turns this off)", flush=True)
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], with_huge_pages(os.environ))
