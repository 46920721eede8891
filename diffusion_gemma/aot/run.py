"""The ahead-of-time report of one run's programs on one topology: lower, compile (with progress), report, and
optionally search the largest batch that fits. `__main__` is its command line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import os
import re
import sys
import tempfile
import threading
import time
from importlib import metadata
from typing import Any, Callable, Iterator

from diffusion_gemma import atomic_write
from diffusion_gemma.aot import programs as programs_lib, report, search
from diffusion_gemma.aot.topology import Topology, compile_devices
from diffusion_gemma.training import setup
from diffusion_gemma.training.config import TrainConfig

# XLA's SPMD partitioner logs this when a sharding change inside the program can only be done by gathering the
# whole array on every device and slicing it again: memory and time the annotations should have avoided.
SPMD_WARNING = re.compile(r"Involuntary full rematerialization.*")
PROGRESS_EVERY_S = 30.0


@dataclasses.dataclass(frozen=True)
class Compiled:
    """A compiled program, or (`executable` None) XLA's refusal to compile it because it does not fit HBM."""

    executable: Any
    seconds: float
    spmd_warnings: tuple[str, ...]
    out_of_memory: report.OutOfMemory | None = None


def compile_program(program: programs_lib.LoweredProgram, log: Callable[[str], None]) -> Compiled:
    """Compile with a progress line every `PROGRESS_EVERY_S` seconds, keeping XLA's SPMD warnings (which it
    writes to the process's stderr, below Python) for the report. The TPU compiler refuses a program whose
    buffers exceed the chip's HBM: that answer ("does not fit", with XLA's figures) is a result, not an error."""
    import jax

    began = time.perf_counter()
    executable, out_of_memory = None, None
    with _progress(f"compiling {program.description}", log), _captured_stderr() as captured:
        try:
            executable = program.compile()
        except jax.errors.JaxRuntimeError as err:
            out_of_memory = report.OutOfMemory.parse(str(err))
            if out_of_memory is None:
                raise
    seconds = time.perf_counter() - began + program.compiled_in_s
    text = captured()
    warnings = tuple(sorted({match.group(0).strip() for match in SPMD_WARNING.finditer(text)}))
    return Compiled(executable, seconds, warnings, out_of_memory)


@contextlib.contextmanager
def _progress(what: str, log: Callable[[str], None]) -> Iterator[None]:
    log(f"{what} ...")
    done = threading.Event()
    began = time.perf_counter()

    def tick():
        while not done.wait(PROGRESS_EVERY_S):
            log(f"  ... still compiling, {time.perf_counter() - began:.0f} s")

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()


@contextlib.contextmanager
def _captured_stderr() -> Iterator[Callable[[], str]]:
    """File descriptor 2 goes to a temporary file while the block runs; its text is then available and also
    written back to the real stderr, so nothing XLA says is lost."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        text = [""]
        try:
            yield lambda: text[0]
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text[0] = sink.read().decode(errors="replace")
            if text[0]:
                sys.stderr.write(text[0])
                sys.stderr.flush()


def compile_and_report(config: TrainConfig, topology: Topology, *, programs: list[str], sampler_batch_sizes: list[int],
                       prompt_length: int, find_max_batch: bool, max_probes: int, config_name: str,
                       log: Callable[[str], None], hlo_dir: str | None = None,
                       max_batch_by: str = "peak") -> dict[str, Any]:
    """Compile `programs` ("train", "sampler") of the run `config` for `topology` and report each; `hlo_dir`:
    also keep each compiled program's HLO text there (gzipped), to analyse again without compiling."""
    devices = compile_devices(topology)
    model_config = setup.model_config_for(config)
    result: dict[str, Any] = dict(
        config=config_name, topology=dict(name=topology.name, jax_name=topology.jax_name, chips=topology.num_chips,
                                          chip=dataclasses.asdict(topology.chip)),
        mesh=dict(data=config.mesh.data, expert=config.mesh.expert), model=dict(
            layers=model_config.num_layers, experts=model_config.num_experts, top_k=model_config.top_k,
            dtype=model_config.dtype, param_dtype=model_config.param_dtype, remat=model_config.remat,
            moe_impl=model_config.moe_impl),
        versions={name: _version(name) for name in ("jax", "jaxlib", "libtpu", "flax", "optax")}, programs=[])

    def reported(program: programs_lib.LoweredProgram, lower_s: float) -> dict[str, Any]:
        compiled = compile_program(program, log)
        if compiled.out_of_memory is not None:
            entry = report.refused_report(program, compiled.out_of_memory, topology, compile_s=compiled.seconds)
            entry.update(lower_s=round(lower_s, 1), spmd_warnings=list(compiled.spmd_warnings))
            log(report.format_report(entry, topology))
            return entry
        entry = report.program_report(program, compiled.executable, topology, compile_s=compiled.seconds,
                                      layer_loop_trips=model_config.scan_repeats, num_layers=model_config.num_layers)
        entry.update(lower_s=round(lower_s, 1), spmd_warnings=list(compiled.spmd_warnings))
        if hlo_dir:
            entry["hlo_file"] = _save_hlo(compiled.executable, hlo_dir, f"{topology.jax_name.replace(':', '_')}_"
                                          f"{program.name}_{len(result['programs'])}")
        log(report.format_report(entry, topology))
        for warning in compiled.spmd_warnings:
            log(f"  SPMD warning: {warning}")
        return entry

    if "train" in programs:
        program, lower_s = _lowered(lambda: programs_lib.train_step(config, devices), "the training step", log)
        result["programs"].append(reported(program, lower_s))
        if find_max_batch:
            result["max_batch"] = _search_batch(config, topology, devices, result["programs"][-1], max_probes, log,
                                                by=max_batch_by)
    if "sampler" in programs:
        for batch_size in sampler_batch_sizes:
            (encode, denoise), lower_s = _lowered(
                lambda: programs_lib.sampler_steps(config, devices, batch_size=batch_size,
                                                   prompt_length=prompt_length),
                f"the sampler at batch {batch_size}", log)
            result["programs"].append(reported(encode, lower_s))
            result["programs"].append(reported(denoise, 0.0))
    return result


def _save_hlo(executable, directory: str, stem: str) -> str:
    path = os.path.join(directory, f"{stem}.hlo.txt.gz")
    os.makedirs(directory, exist_ok=True)
    with atomic_write.atomic_path(path, overwrite=True) as tmp, gzip.open(tmp, "wt") as f:
        f.write(executable.as_text())
    return path


def _lowered(make: Callable[[], Any], what: str, log: Callable[[str], None]) -> tuple[Any, float]:
    log(f"lowering {what} ...")
    began = time.perf_counter()
    out = make()
    seconds = time.perf_counter() - began
    log(f"  lowered in {seconds:.0f} s")
    return out, seconds


def _search_batch(config: TrainConfig, topology: Topology, devices: list, first: dict[str, Any], max_probes: int,
                  log: Callable[[str], None], by: str = "peak") -> dict[str, Any]:
    """The largest global batch (a multiple of the devices times the accumulation steps, so every device gets
    whole micro-batch rows) whose training step fits one chip's HBM, judged `by` XLA's peak (what the compiler
    checks) or the buffer sum (every buffer live at once: conservative); a refusal never fits."""
    granule = topology.num_chips * config.grad_accum_steps
    first_memory = first["memory"]
    if "required" in first_memory:
        first_bytes = first_memory["required"]
    else:
        first_bytes = first_memory["peak"] if by == "peak" and first_memory.get("peak") else first_memory["total"]
    measured = {config.data.global_batch_size: first_bytes}

    def measure(batch: int) -> float:
        if batch not in measured:
            resized = dataclasses.replace(config, data=dataclasses.replace(config.data, global_batch_size=batch))
            program, _ = _lowered(lambda: programs_lib.train_step(resized, devices), f"the training step at batch "
                                  f"{batch}", log)
            compiled = compile_program(program, log)
            measured[batch] = (compiled.out_of_memory.required if compiled.out_of_memory is not None
                               else report.Memory.of(compiled.executable).bytes_by(by))
            log(f"  batch {batch}: {measured[batch] / report.GB:.2f} GB per device by the {by} "
                f"({'fits' if measured[batch] <= topology.chip.hbm_bytes else 'does not fit'})")
        return measured[batch]

    found = search.largest_fitting_batch(measure, topology.chip.hbm_bytes, start=config.data.global_batch_size,
                                         granule=granule, max_probes=max_probes)
    bound = "exactly" if found.exact else "at least (the search ran out of probes)"
    log(f"largest global batch that fits {topology.name}: {found.largest} ({bound}; smallest that did not fit: "
        f"{found.smallest_failing})")
    return dict(largest=found.largest, smallest_failing=found.smallest_failing, exact=found.exact, granule=granule,
                by=by, probes=[dataclasses.asdict(probe) for probe in found.probes])


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
