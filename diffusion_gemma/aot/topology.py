"""TPU topologies by the names users type, each chip's published peaks, and compile-only devices for them.

A Cloud TPU slice is named by its accelerator type: `v6e-8` is 8 chips, but `v5p-16` and `v4-16` count
TensorCores, two per chip (one JAX device per chip, "megacore"), so they are 8 chips. JAX's topology strings
(`v6e:2x4`, `v5p:2x2x2`) name the chip grid itself and are accepted as they are. `compile_devices` asks libtpu
for devices that can compile but never run, so a CPU host gets the real TPU executable's memory and cost
figures; nothing is allocated on them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from importlib import metadata


class TopologyError(ValueError):
    """An unknown topology name, or libtpu missing or mismatched; the message says what to type instead."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """One chip's published peaks (Cloud TPU system-architecture pages): dense bf16 FLOP/s, HBM bandwidth in
    bytes/s and the chip's bidirectional inter-chip interconnect (ICI) bandwidth in bytes/s. `hbm_bytes` is the
    HBM the TPU compiler lets a program allocate, as its refusal of a larger program states it (a little under
    the published 16 / 95 / 32 GB; tests/test_aot.py checks it against the installed libtpu). The v5e page gives
    its ICI both as 1,600 Gbps and as 400 GB/s bidirectional; v5p's is published in Gbps only (4,800) and is
    converted by the same rule (x 2 / 8)."""

    generation: str
    cores_per_chip: int  # TensorCores counted by the accelerator-type name
    grid_dims: int  # 2-D or 3-D torus
    peak_bf16_flops: float
    hbm_bytes: float
    hbm_bandwidth: float
    ici_bandwidth: float

    @property
    def ici_egress_bandwidth(self) -> float:
        """Bytes/s one chip can send: half the bidirectional figure."""
        return self.ici_bandwidth / 2


CHIPS = {
    "v5e": Chip("v5e", cores_per_chip=1, grid_dims=2, peak_bf16_flops=197e12, hbm_bytes=15.75 * 2**30,
                hbm_bandwidth=819e9, ici_bandwidth=400e9),
    "v5p": Chip("v5p", cores_per_chip=2, grid_dims=3, peak_bf16_flops=459e12, hbm_bytes=95.74 * 2**30,
                hbm_bandwidth=2765e9, ici_bandwidth=4800e9 * 2 / 8),
    "v6e": Chip("v6e", cores_per_chip=1, grid_dims=2, peak_bf16_flops=918e12, hbm_bytes=31.25 * 2**30,
                hbm_bandwidth=1638e9, ici_bandwidth=800e9),
}
_ALIASES = {"v5litepod": "v5e", "v6": "v6e", "trillium": "v6e"}

# Chip grids of the slice shapes Cloud TPU offers (chips -> grid); 2-D generations and 3-D ones.
_GRIDS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_GRIDS_3D = {1: "1x1x1", 2: "1x1x2", 4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
             256: "4x8x8", 512: "8x8x8"}

LIBTPU_INSTALL = 'pip install -e ".[tpu]"  (or: pip install "jax[tpu]==<your jax version>")'


@dataclasses.dataclass(frozen=True)
class Topology:
    """A slice: its name as given, JAX's topology string, the chip and the number of chips (= JAX devices)."""

    name: str
    jax_name: str
    chip: Chip
    num_chips: int


def parse(name: str) -> Topology:
    """`v5p-16`, `v6e-8`, `v5litepod-4` (accelerator types) or `v6e:2x4`, `v5p:2x2x2` (JAX's strings)."""
    text = name.strip().lower()
    if match := re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", text):
        generation, grid = _generation(match.group(1), name), match.group(2)
        chip = CHIPS[generation]
        if len(grid.split("x")) != chip.grid_dims:
            raise TopologyError(f"topology {name!r}: {generation} chips form a {chip.grid_dims}-D grid "
                                f"(e.g. {generation}:{_example_grid(chip)})")
        return Topology(name, f"{generation}:{grid}", chip, math.prod(int(d) for d in grid.split("x")))
    if match := re.fullmatch(r"([a-z0-9]+)-(\d+)", text):
        generation = _generation(match.group(1), name)
        chip = CHIPS[generation]
        count = int(match.group(2))
        if count % chip.cores_per_chip:
            raise TopologyError(f"topology {name!r}: {generation} names count TensorCores, {chip.cores_per_chip} per "
                                f"chip, so the number must be a multiple of {chip.cores_per_chip}")
        chips = count // chip.cores_per_chip
        grids = _GRIDS_3D if chip.grid_dims == 3 else _GRIDS_2D
        if chips not in grids:
            sizes = ", ".join(f"{generation}-{c * chip.cores_per_chip}" for c in sorted(grids))
            raise TopologyError(f"topology {name!r}: no {generation} slice of {chips} chips (known: {sizes}; or give "
                                f"the chip grid as {generation}:AxB{'xC' if chip.grid_dims == 3 else ''})")
        return Topology(name, f"{generation}:{grids[chips]}", chip, chips)
    raise TopologyError(f"unknown topology {name!r}; expected an accelerator type such as v5p-16 or v6e-8, or a chip "
                        f"grid such as v6e:2x4 (generations: {', '.join(sorted(CHIPS))})")


def _generation(text: str, name: str) -> str:
    generation = _ALIASES.get(text, text)
    if generation not in CHIPS:
        raise TopologyError(f"unknown TPU generation {text!r} in topology {name!r} (known: "
                            f"{', '.join(sorted(CHIPS))})")
    return generation


def _example_grid(chip: Chip) -> str:
    return "2x2x2" if chip.grid_dims == 3 else "2x4"


def check_libtpu() -> str:
    """The installed libtpu's version, after checking it is the one this JAX asks for (its `tpu` extra)."""
    try:
        installed = metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        raise TopologyError(f"compiling for a TPU topology needs libtpu, which is not installed: {LIBTPU_INSTALL}") \
            from None
    wanted = _jax_libtpu_requirement()
    if wanted and not re.fullmatch(wanted.replace(".", r"\.").replace("*", ".*"), installed):
        raise TopologyError(f"libtpu {installed} is installed but jax {metadata.version('jax')} needs "
                            f"libtpu=={wanted}: {LIBTPU_INSTALL}")
    return installed


def _jax_libtpu_requirement() -> str | None:
    """'0.0.42.*' from jax's `Requires-Dist: libtpu==0.0.42.*; extra == "tpu"`, or None if it names none."""
    for requirement in metadata.requires("jax") or ():
        if match := re.match(r"libtpu\s*==\s*([^;\s]+)\s*;.*extra\s*==\s*['\"]tpu['\"]", requirement):
            return match.group(1)
    return None


def prepare_environment(topology: Topology | None = None) -> None:
    """Before jax is imported: keep the host's own backend on CPU (the compile-only devices need no TPU runtime,
    and a TPU backend would try to claim chips this host does not have) and let several processes load libtpu
    at once (its lock file would otherwise serialise them, e.g. parallel tests). With the `topology`, tell
    libtpu which slice this is and that the host is alone, which it otherwise asks a TPU VM's metadata server
    for and warns about at length. Variables already set are left alone (a real TPU VM sets its own)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if topology is not None:
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type(topology))
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def accelerator_type(topology: Topology) -> str:
    """Cloud TPU's name of the slice: `v5p-16` for 8 v5p chips."""
    return f"{topology.chip.generation}-{topology.num_chips * topology.chip.cores_per_chip}"


def compile_devices(topology: Topology) -> list:
    """The topology's compile-only TPU devices (one per chip)."""
    check_libtpu()
    from jax.experimental import topologies

    description = topologies.get_topology_desc(platform="tpu", topology_name=topology.jax_name)
    devices = list(description.devices)
    if len(devices) != topology.num_chips:
        raise TopologyError(f"libtpu made {len(devices)} devices for {topology.jax_name}, expected "
                            f"{topology.num_chips} (one per chip)")
    return devices
