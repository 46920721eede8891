"""What a compiled program costs on one chip: memory against HBM, FLOPs, HBM traffic, collectives, and the roofline
lower bound on its time.

Memory comes from XLA's own buffer assignment (`memory_analysis()`: arguments, outputs and temporaries against the
HBM the compiler may use, code listed beside them; an output that reuses a donated argument's buffer is counted
once). The TPU compiler refuses a program that does not fit, and that refusal is reported as such. FLOPs, HBM bytes
and collective bytes come from the compiled HLO weighted by loop trip counts (`hlo_stats`), since XLA's
`cost_analysis()` may count a loop body once and does not see custom kernels; XLA's figures are kept beside ours.
The roofline bound is the largest of compute (FLOPs / peak), memory (HBM bytes / bandwidth) and interconnect
(collective bytes sent / the chip's send bandwidth) time: a step cannot run faster, and the MFU that bound implies
is an upper bound on what the program can reach on that chip.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from diffusion_gemma.aot import hlo_stats
from diffusion_gemma.aot.topology import Topology

GB = 1e9


FIT_FIGURES = ("peak", "sum")


@dataclasses.dataclass(frozen=True)
class Memory:
    """Per-device bytes of a compiled program (XLA's buffer assignment). `peak`: XLA's own peak-memory figure,
    where the backend reports one (None otherwise). The sum counts every buffer live at once; the peak follows
    their live ranges, so on TPU it can be far below the sum (a 2-layer tiny LoRA step at batch 16 on v6e-8:
    4.6 MB against 37.9 MB), and it is what the TPU compiler holds against HBM: it compiles the programs whose
    peak fits (experiments/benchmarks/README.md). `fits` keeps the sum, a reading that holds however the buffers
    share space; `peak_fits` is the compiler's."""

    argument: int
    output: int
    alias: int
    temporary: int
    code: int
    peak: int | None = None

    @property
    def total(self) -> int:
        """The sum of the buffers (a donated argument reused by an output counted once). The executable's code is
        not among them: a program whose buffers fill the usable HBM exactly compiles, its code on top."""
        return self.argument + self.output - self.alias + self.temporary

    def bytes_by(self, figure: str) -> int:
        """The figure a fit is judged by: "sum" (`total`) or "peak" (XLA's, the sum where none is reported)."""
        if figure not in FIT_FIGURES:
            raise ValueError(f"unknown memory figure {figure!r} (valid: {', '.join(FIT_FIGURES)})")
        return self.peak if figure == "peak" and self.peak is not None else self.total

    @classmethod
    def of(cls, compiled) -> "Memory":
        stats = compiled.memory_analysis()
        return cls(argument=stats.argument_size_in_bytes, output=stats.output_size_in_bytes,
                   alias=stats.alias_size_in_bytes, temporary=stats.temp_size_in_bytes,
                   code=stats.generated_code_size_in_bytes, peak=getattr(stats, "peak_memory_in_bytes", None) or None)


@dataclasses.dataclass(frozen=True)
class OutOfMemory:
    """The TPU compiler's refusal of a program that does not fit HBM: what it needs (a lower bound: XLA stops at
    the first buffer class that overflows) and what it has, in bytes, with its own message."""

    required: float
    available: float
    message: str

    # "... the total memory required for HLO temporaries (73.42G) exceeds available HBM (31.25G)" or
    # "... Used 40.50G of 31.25G hbm. Exceeded hbm capacity by 9.25G."
    _PATTERNS = (re.compile(r"required for [^(]*\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)"),
                 re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm"))

    @classmethod
    def parse(cls, message: str) -> "OutOfMemory | None":
        """The refusal in an XLA error message; None for any other error."""
        if "RESOURCE_EXHAUSTED" not in message:
            return None
        for pattern in cls._PATTERNS:
            if match := pattern.search(message):
                return cls(required=_bytes(match.group(1), match.group(2)),
                           available=_bytes(match.group(3), match.group(4)),
                           message=" ".join(message.split())[:500])
        return None


def _bytes(number: str, unit: str) -> float:
    """XLA's human-readable sizes are binary (G = 2**30)."""
    return float(number) * 1024.0 ** "_KMGT".index(unit or "_") if unit else float(number)


def fits(memory: Memory, topology: Topology) -> bool:
    return memory.total <= topology.chip.hbm_bytes


def peak_fits(memory: Memory, topology: Topology) -> bool | None:
    """The compiler's own reading (None where no peak is reported)."""
    return None if memory.peak is None else memory.peak <= topology.chip.hbm_bytes


@dataclasses.dataclass(frozen=True)
class Roofline:
    """Lower bounds (seconds) on one call of a program from each resource, and the MFU the largest implies."""

    compute_s: float
    memory_s: float
    interconnect_s: float
    model_flops_per_device: float
    peak_flops: float

    @property
    def bound_s(self) -> float:
        return max(self.compute_s, self.memory_s, self.interconnect_s)

    @property
    def bound_by(self) -> str:
        times = {"compute": self.compute_s, "memory": self.memory_s, "interconnect": self.interconnect_s}
        return max(times, key=times.get)

    @property
    def mfu_at_bound(self) -> float:
        return self.model_flops_per_device / (self.peak_flops * self.bound_s) if self.bound_s else 0.0


def compute_flops(stats: hlo_stats.HloStats, expert_flops_per_device: float) -> float:
    """FLOPs a device must execute at least: every dense op of the program, plus the routed experts' analytic
    work in place of the ragged expert kernels, whose static count assumes every row of their worst-case buffers
    (`HloStats.ragged_flops`). A program without ragged kernels keeps its own count."""
    if not stats.ragged_flops:
        return stats.flops
    return stats.flops - stats.ragged_flops + min(expert_flops_per_device, stats.ragged_flops)


def hbm_traffic(stats: hlo_stats.HloStats, expert_flops_per_device: float) -> float:
    """HBM bytes a device moves at least: the ragged expert kernels' rows scaled, like their FLOPs, from the
    worst-case buffers to the routed rows (their expert weights are read whole either way)."""
    if not stats.ragged_flops:
        return stats.hbm_bytes
    routed = min(1.0, expert_flops_per_device / stats.ragged_flops)
    return stats.hbm_bytes - stats.ragged_row_bytes * (1.0 - routed)


def roofline(stats: hlo_stats.HloStats, topology: Topology, model_flops: float,
             expert_flops: float = 0.0) -> Roofline:
    chip = topology.chip
    flops = compute_flops(stats, expert_flops / topology.num_chips)
    traffic = hbm_traffic(stats, expert_flops / topology.num_chips)
    return Roofline(compute_s=flops / chip.peak_bf16_flops, memory_s=traffic / chip.hbm_bandwidth,
                    interconnect_s=stats.total_collective_bytes / chip.ici_egress_bandwidth,
                    model_flops_per_device=model_flops / topology.num_chips, peak_flops=chip.peak_bf16_flops)


def program_report(program, compiled, topology: Topology, *, compile_s: float, layer_loop_trips: int | None = None,
                   num_layers: int | None = None) -> dict[str, Any]:
    """Everything the CLI prints and writes about one compiled program, as plain JSON-able values."""
    xla = compiled.cost_analysis() or {}
    xla = xla[0] if isinstance(xla, (list, tuple)) else xla
    return report_from(program, Memory.of(compiled), hlo_stats.analyze(compiled.as_text()), xla, topology,
                       compile_s=compile_s, layer_loop_trips=layer_loop_trips, num_layers=num_layers)


def report_from(program, memory: Memory, stats: hlo_stats.HloStats, xla: dict, topology: Topology, *,
                compile_s: float, layer_loop_trips: int | None = None, num_layers: int | None = None
                ) -> dict[str, Any]:
    """`program_report` from its parts: XLA's buffer sizes, the HLO's counts and XLA's own cost figures (so a
    kept HLO file can be reported again without compiling)."""
    bound = roofline(stats, topology, program.model_flops, getattr(program, "expert_flops", 0.0))
    report = dict(
        program=program.name, description=program.description, compile_s=round(compile_s, 1),
        memory=dict(dataclasses.asdict(memory), total=memory.total, hbm=topology.chip.hbm_bytes,
                    fits=fits(memory, topology), headroom=topology.chip.hbm_bytes - memory.total,
                    peak_fits=peak_fits(memory, topology)),
        flops_per_device=stats.flops, ragged_flops_per_device_upper_bound=stats.ragged_flops,
        compute_flops_per_device=compute_flops(stats, getattr(program, "expert_flops", 0.0) / topology.num_chips),
        hbm_bytes_per_device=hbm_traffic(stats, getattr(program, "expert_flops", 0.0) / topology.num_chips),
        hbm_bytes_per_device_upper_bound=stats.hbm_bytes,
        xla_cost_analysis=dict(flops=xla.get("flops"), bytes_accessed=xla.get("bytes accessed"),
                               note="XLA's own count: may count a loop body once; custom kernels unseen"),
        model_flops=program.model_flops, tokens=program.tokens,
        flops_ratio_hlo_to_model=(compute_flops(stats, getattr(program, "expert_flops", 0.0) / topology.num_chips)
                                  * topology.num_chips / program.model_flops) if program.model_flops else None,
        opaque_kernels=len(stats.opaque_kernels),
        collectives={kind: dict(bytes=total, count=count) for kind, (total, count) in _by_kind(stats).items()},
        collective_bytes_per_device=stats.total_collective_bytes,
        loops=[dict(trips=loop.trips, executions=loop.executions) for loop in stats.loops],
        unknown_trip_loops=list(stats.unknown_trip_loops),
        roofline=dict(compute_s=bound.compute_s, memory_s=bound.memory_s, interconnect_s=bound.interconnect_s,
                      bound_s=bound.bound_s, bound_by=bound.bound_by, mfu_at_bound=bound.mfu_at_bound))
    if layer_loop_trips and num_layers:
        report["per_layer_collectives"] = per_layer_collectives(stats, layer_loop_trips, num_layers)
    return report


def refused_report(program, out_of_memory: OutOfMemory, topology: Topology, *, compile_s: float) -> dict[str, Any]:
    """The report of a program the compiler refused for HBM: it does not fit, and by how much at least."""
    return dict(program=program.name, description=program.description, compile_s=round(compile_s, 1),
                memory=dict(fits=False, required=out_of_memory.required, available=out_of_memory.available,
                            hbm=topology.chip.hbm_bytes, headroom=out_of_memory.available - out_of_memory.required),
                model_flops=program.model_flops, tokens=program.tokens, compiler_message=out_of_memory.message)


def _by_kind(stats: hlo_stats.HloStats) -> dict[str, tuple[float, int]]:
    """Kind -> (bytes sent per device, executions) per call."""
    counts: dict[str, int] = {}
    for collective in stats.collectives:
        counts[collective.kind] = counts.get(collective.kind, 0) + collective.executions
    return {kind: (total, counts[kind]) for kind, total in stats.collective_bytes_by_kind().items()}


def per_layer_collectives(stats: hlo_stats.HloStats, layer_loop_trips: int, num_layers: int) -> dict[str, Any]:
    """Bytes sent per device, per layer and stack pass, by kind: the collectives inside the scanned layer loops (a
    loop of `layer_loop_trips` trips, each trip a repeat of the layer pattern), divided over the layers of every
    pass (forward or backward) such a loop makes."""
    passes = sum(loop.executions for loop in stats.loops if loop.trips == layer_loop_trips)
    by_kind: dict[str, float] = {}
    for collective in stats.collectives:
        if layer_loop_trips in collective.loop_trips:
            by_kind[collective.kind] = by_kind.get(collective.kind, 0.0) + collective.wire_bytes * collective.executions
    scale = 1.0 / (passes * num_layers) if passes else 0.0
    return dict(stack_passes=passes, bytes_by_kind={kind: total * scale for kind, total in by_kind.items()})


def format_report(report: dict[str, Any], topology: Topology) -> str:
    """The human-readable block the CLI prints for one program."""
    memory = report["memory"]
    if "roofline" not in report:  # refused by the compiler
        return (f"{report['description']} on {topology.name} ({topology.num_chips} x TPU {topology.chip.generation}): "
                f"DOES NOT FIT: the compiler needs at least {_gib(memory['required'])} per device, "
                f"{_gib(memory['available'])} of HBM available (refused after {report['compile_s']:.0f} s)")
    bound = report["roofline"]
    lines = [f"{report['description']} on {topology.name} ({topology.num_chips} x TPU {topology.chip.generation}), "
             f"compiled in {report['compile_s']:.0f} s",
             f"  memory per device: arguments {_gb(memory['argument'])}, outputs {_gb(memory['output'])} "
             f"(aliased {_gb(memory['alias'])}), temporaries {_gb(memory['temporary'])}, code {_gb(memory['code'])}",
             f"  total {_gb(memory['total'])} of {_gb(memory['hbm'])} HBM with every buffer live at once: "
             + (f"fits, {_gb(memory['headroom'])} headroom" if memory["fits"]
                else f"DOES NOT FIT, {_gb(-memory['headroom'])} over"),
             "  XLA's peak (buffers by live range, what the compiler checks): "
             + (f"{_gb(memory['peak'])}, {'within' if memory['peak'] <= memory['hbm'] else 'OVER'} HBM"
                if memory.get("peak") else "not reported"),
             f"  per device and call: {report['compute_flops_per_device'] / 1e12:.3f} TFLOP, HBM traffic "
             f"{_gb(report['hbm_bytes_per_device'])}, collectives {_gb(report['collective_bytes_per_device'])} sent"]
    if report["ragged_flops_per_device_upper_bound"]:
        lines.append(f"    (expert kernels counted at the routed rows; over their whole worst-case buffers they "
                     f"would be {report['ragged_flops_per_device_upper_bound'] / 1e12:.3f} TFLOP)")
    if report["flops_ratio_hlo_to_model"]:
        lines.append(f"  compiled FLOPs / model FLOPs: {report['flops_ratio_hlo_to_model']:.2f} (remat recompute, "
                     f"attention scores and the like above the analytic 2 x active parameters per token and pass)")
    for kind, entry in sorted(report["collectives"].items()):
        lines.append(f"    {kind}: {entry['count']} per call, {_gb(entry['bytes'])}")
    if report.get("per_layer_collectives", {}).get("stack_passes"):
        per_layer = report["per_layer_collectives"]
        parts = ", ".join(f"{kind} {total / 1e6:.1f} MB" for kind, total in sorted(per_layer["bytes_by_kind"].items()))
        lines.append(f"  per layer and stack pass ({per_layer['stack_passes']} passes): {parts or 'none'}")
    lines.append(f"  roofline: compute {bound['compute_s'] * 1e3:.1f} ms, memory {bound['memory_s'] * 1e3:.1f} ms, "
                 f"interconnect {bound['interconnect_s'] * 1e3:.1f} ms -> at least {bound['bound_s'] * 1e3:.1f} ms "
                 f"({bound['bound_by']}-bound), MFU at most {100 * bound['mfu_at_bound']:.1f}%")
    if report["unknown_trip_loops"]:
        lines.append(f"  warning: {len(report['unknown_trip_loops'])} loop(s) with a data-dependent trip count were "
                     f"counted once")
    return "\n".join(lines)


def _gb(count: float) -> str:
    return f"{count / GB:.2f} GB"


def _gib(count: float) -> str:
    return f"{count / 2**30:.2f} GiB"
