"""Ahead-of-time compilation for TPU topologies on this CPU host (`python -m diffusion_gemma.aot`): topology names,
the libtpu check, the batch search, the trainer's step / LoRA step / sampler steps compiled for a real TPU
executable, the report's arithmetic, and the CLI's one-line errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from importlib import metadata

import pytest

from diffusion_gemma.aot import report, search, topology

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# conftest's persistent compilation cache stores TPU executables it cannot load back on this host; JAX then
# warns and compiles again, which is all these tests need.
pytestmark = pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry:UserWarning")


# ------------------------------------------------------------------------------------------------ topologies
@pytest.mark.parametrize("name, jax_name, chips, generation", [
    ("v5p-8", "v5p:2x2x1", 4, "v5p"), ("v5p-16", "v5p:2x2x2", 8, "v5p"), ("v6e-8", "v6e:2x4", 8, "v6e"),
    ("v6e-16", "v6e:4x4", 16, "v6e"), ("v5litepod-4", "v5e:2x2", 4, "v5e"), ("v6e:2x4", "v6e:2x4", 8, "v6e"),
    ("V5P:2x2x2", "v5p:2x2x2", 8, "v5p")])
def test_topology_names_as_users_type_them(name, jax_name, chips, generation):
    parsed = topology.parse(name)
    assert (parsed.jax_name, parsed.num_chips, parsed.chip.generation) == (jax_name, chips, generation)


@pytest.mark.parametrize("name, message", [
    ("v7x-8", "unknown TPU generation 'v7x'"), ("tpu", "unknown topology 'tpu'"),
    ("v5p-9", "multiple of 2"), ("v6e-12", "no v6e slice of 12 chips"), ("v5p:2x4", "3-D grid")])
def test_unknown_topologies_say_what_to_type(name, message):
    with pytest.raises(topology.TopologyError, match=message):
        topology.parse(name)


def test_compile_devices_are_one_per_chip():
    for name, count, kind in (("v5p-8", 4, "TPU v5"), ("v6e-8", 8, "TPU v6 lite")):
        devices = topology.compile_devices(topology.parse(name))
        assert len(devices) == count and {d.device_kind for d in devices} == {kind}


def test_missing_or_mismatched_libtpu_says_how_to_install(monkeypatch):
    real_version = metadata.version

    def missing(name):
        if name == "libtpu":
            raise metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(metadata, "version", missing)
    with pytest.raises(topology.TopologyError, match=r"needs libtpu, which is not installed: pip install"):
        topology.check_libtpu()
    monkeypatch.setattr(metadata, "version", lambda name: "0.0.1" if name == "libtpu" else real_version(name))
    with pytest.raises(topology.TopologyError, match=r"libtpu 0.0.1 is installed but jax .* needs libtpu=="):
        topology.check_libtpu()


def test_usable_hbm_of_each_chip_is_what_the_compiler_states():
    """Each chip's capacity in the table is the HBM the installed compiler grants a program: its refusal of a
    300 GB program names it."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from diffusion_gemma.aot import programs, run

    for name in ("v5e:2x2", "v5p:2x2x1", "v6e:2x2"):
        parsed = topology.parse(name)
        mesh = jax.make_mesh((4,), ("x",), devices=topology.compile_devices(parsed),
                             axis_types=(jax.sharding.AxisType.Auto,))
        vector = jax.ShapeDtypeStruct((200_000,), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
        lowered = jax.jit(lambda v: jnp.sort(jnp.outer(v, v), axis=1)[:, :8]).lower(vector)
        refusal = run.compile_program(programs.LoweredProgram("outer", lowered, 0.0, 0, "outer"),
                                      log=lambda line: None).out_of_memory
        assert refusal is not None and refusal.available == pytest.approx(parsed.chip.hbm_bytes, rel=1e-3), name


def test_installed_libtpu_matches_jax():
    assert topology.check_libtpu() == metadata.version("libtpu")


# ------------------------------------------------------------------------------------------------ batch search
def _affine(base: float, per_example: float, calls: list):
    def measure(batch):
        calls.append(batch)
        return base + per_example * batch
    return measure


@pytest.mark.parametrize("start, capacity", [(8, 1000.0), (64, 1000.0), (8, 130.0), (200, 5000.0)])
def test_batch_search_brackets_the_largest_fitting_batch(start, capacity):
    calls = []
    found = search.largest_fitting_batch(_affine(100.0, 3.0, calls), capacity, start=start, granule=8)
    truth = int((capacity - 100.0) / 3.0) // 8 * 8
    assert found.exact and found.largest == truth and found.smallest_failing == truth + 8
    assert len(calls) <= 6 and len(set(calls)) == len(calls)  # no batch compiled twice


def test_batch_search_reports_when_nothing_fits_or_the_budget_runs_out():
    nothing = search.largest_fitting_batch(_affine(2000.0, 1.0, []), 1000.0, start=64, granule=8)
    assert nothing.largest == 0 and nothing.smallest_failing == 8 and nothing.exact
    convex = search.largest_fitting_batch(lambda b: 10.0 * b + b ** 2, 1e9, start=8, granule=8, max_probes=2)
    assert not convex.exact and convex.smallest_failing is None and convex.largest == 16


# ------------------------------------------------------------------------------------------------ the programs
def _tiny_config(**changes):
    from diffusion_gemma.training.config import from_config_dict
    import ml_collections

    config = ml_collections.ConfigDict(dict(
        seed=0, num_steps=10, grad_accum_steps=1, freeze_router=True,
        model=dict(preset="tiny", overrides={"moe_impl": "expert_parallel", "num_layers": 2}, dtype="bfloat16",
                   param_dtype="float32", remat="full"),
        data=dict(source="synthetic", seq_length=64, block_size=16, global_batch_size=8),
        lora=dict(enabled=False), mesh=dict(data=1, expert=-1)))
    for key, value in changes.items():
        *sections, name = key.split(".")
        target = config
        for section in sections:
            target = target[section]
        target[name] = value
    return from_config_dict(config)


@pytest.fixture(autouse=True)
def default_matmul_precision():
    """Compile as runs do: conftest asks for exact fp32 matmuls, which the TPU's bf16 matmul kernels reject."""
    import jax

    with jax.default_matmul_precision("default"):
        yield


@pytest.fixture(scope="module")
def v6e_8():
    parsed = topology.parse("v6e:2x4")
    return parsed, topology.compile_devices(parsed)


def test_pipeline_batch_shapes_are_what_the_dataset_yields():
    from diffusion_gemma.data import pipeline

    config = pipeline.DataConfig(seq_length=48, block_size=16, global_batch_size=4)
    batch = next(iter(pipeline.make_dataset(pipeline.make_source(config), config, num_steps=1)))
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == pipeline.batch_shapes(config)


@pytest.mark.slow
def test_train_step_compiles_for_tpu_and_the_report_adds_up(v6e_8):
    """The tiny trainer's LoRA step with two micro-batches (expert parallel over 8 chips, remat, bf16 compute),
    compiled for v6e: the report's parts add up and the step's structure shows in the counts."""
    from diffusion_gemma.aot import hlo_stats, programs, run

    parsed, devices = v6e_8
    program = programs.train_step(_tiny_config(**{"lora.enabled": True, "grad_accum_steps": 2,
                                                  "data.global_batch_size": 16}), devices)
    compiled = run.compile_program(program, log=lambda line: None)
    entry = report.program_report(program, compiled.executable, parsed, compile_s=compiled.seconds,
                                  layer_loop_trips=1, num_layers=2)
    memory = entry["memory"]
    assert memory["total"] == memory["argument"] + memory["output"] - memory["alias"] + memory["temporary"]
    assert memory["code"] > 0 and memory["fits"] and memory["headroom"] == parsed.chip.hbm_bytes - memory["total"]
    assert memory["alias"] > 0  # the donated adapters and their moments come back in place
    assert 0 < memory["peak"] <= memory["total"]  # XLA's own peak figure, kept beside the (conservative) sum
    assert memory["peak_fits"] is True
    text = report.format_report(entry, parsed)
    assert "every buffer live at once: fits" in text and "what the compiler checks" in text and "within HBM" in text
    over = dict(memory, total=2 * parsed.chip.hbm_bytes, fits=False, headroom=-parsed.chip.hbm_bytes)
    assert "DOES NOT FIT" in report.format_report(dict(entry, memory=over), parsed)
    assert report.peak_fits(report.Memory(1, 0, 0, 0, 0), parsed) is None  # a backend without a peak figure
    assert report.peak_fits(report.Memory(1, 0, 0, 0, 0, peak=int(parsed.chip.hbm_bytes) + 1), parsed) is False
    # The ratio is the compiled work over the analytic count (2 x active parameters per token and pass, backward
    # included): remat recomputes the forward and the analytic count leaves attention scores out, so the compiled
    # step does more, but not more than one extra forward of every pass and the scores (a large share in a 2-layer,
    # 64-wide model).
    ratio = entry["flops_ratio_hlo_to_model"]
    assert ratio == pytest.approx(entry["compute_flops_per_device"] * parsed.num_chips / program.model_flops)
    assert ratio > 1.0
    assert ratio < 3.0
    assert "all-to-all" in entry["collectives"]  # the expert-parallel dispatch
    assert 2 in [loop.trips for loop in hlo_stats.analyze(compiled.executable.as_text()).loops]  # 2 micro-batches
    bound = entry["roofline"]
    assert bound["bound_s"] == max(bound["compute_s"], bound["memory_s"], bound["interconnect_s"])
    assert 0 < bound["mfu_at_bound"] <= 1.0
    json.dumps(entry)  # JSON-able as written by --output
    # The same executable on a chip with less HBM than it needs is reported as not fitting.
    small = dataclasses.replace(parsed, chip=dataclasses.replace(parsed.chip, hbm_bytes=memory["total"] - 1))
    tight = report.program_report(program, compiled.executable, small, compile_s=0.0)
    assert not tight["memory"]["fits"] and "DOES NOT FIT" in report.format_report(tight, small)


def test_a_program_that_cannot_fit_is_reported_as_not_fitting(v6e_8):
    """The TPU compiler refuses a program whose buffers exceed HBM (here a 40 GB outer product); the report turns
    that refusal into "does not fit" with XLA's figures, as for a training batch too large for the chip."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from diffusion_gemma.aot import programs, report, run

    parsed, devices = v6e_8
    mesh = jax.make_mesh((8,), ("x",), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))
    vector = jax.ShapeDtypeStruct((100_000,), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
    lowered = jax.jit(lambda v: jnp.sort(jnp.outer(v, v), axis=1)[:, :8]).lower(vector)
    program = programs.LoweredProgram("outer", lowered, 0.0, 0, "outer product")
    compiled = run.compile_program(program, log=lambda line: None)
    assert compiled.executable is None and compiled.out_of_memory is not None
    assert compiled.out_of_memory.required > 4e10 > compiled.out_of_memory.available > 0.9 * parsed.chip.hbm_bytes
    entry = report.refused_report(program, compiled.out_of_memory, parsed, compile_s=compiled.seconds)
    assert not entry["memory"]["fits"] and entry["memory"]["headroom"] < 0
    assert "DOES NOT FIT" in report.format_report(entry, parsed)


def test_compiler_refusals_are_parsed_and_other_errors_are_not():
    from diffusion_gemma.aot import report

    refusal = report.OutOfMemory.parse("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
                                       "HLO temporaries (73.42G) exceeds available HBM (31.25G).")
    assert refusal.required == pytest.approx(73.42 * 2**30) and refusal.available == pytest.approx(31.25 * 2**30)
    used = report.OutOfMemory.parse("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in "
                                    "memory space hbm. Used 40.50G of 31.25G hbm. Exceeded hbm capacity by 9.25G.")
    assert used.required == pytest.approx(40.5 * 2**30)
    assert report.OutOfMemory.parse("INTERNAL: Mosaic failed to compile TPU kernel") is None


@pytest.mark.slow
def test_sampler_encode_and_denoise_compile_for_tpu(v6e_8):
    from diffusion_gemma.aot import programs, report

    parsed, devices = v6e_8
    config = _tiny_config()
    encode, denoise = programs.sampler_steps(config, devices, batch_size=8, prompt_length=32)
    compiled = denoise.compile()
    entry = report.program_report(denoise, compiled, parsed, compile_s=0.0)
    vocab, canvas = 256, config.data.block_size
    assert entry["memory"]["output"] >= 8 * canvas * vocab * 4 / parsed.num_chips  # fp32 logits, batch-split
    assert entry["flops_ratio_hlo_to_model"] > 0.5
    assert encode.compiled is not None and encode.compiled.memory_analysis().output_size_in_bytes > 0


def test_experts_that_do_not_divide_the_expert_axis_are_refused_before_tracing():
    from diffusion_gemma.aot import programs
    from diffusion_gemma.sharding import ShardingError

    devices = topology.compile_devices(topology.parse("v6e-16"))
    config = _tiny_config(**{"mesh.data": 1, "mesh.expert": 16})  # tiny has 8 experts
    with pytest.raises(ShardingError, match="8 experts cannot be split over the 'expert' mesh axis of size 16"):
        programs.train_step(config, devices)


def test_plain_matmul_flops_in_the_report_are_2mnk():
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from diffusion_gemma.aot import programs, report

    parsed = topology.parse("v6e:2x4")
    devices = topology.compile_devices(parsed)
    mesh = jax.make_mesh((8,), ("x",), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))
    rows = NamedSharding(mesh, PartitionSpec("x"))
    m, k, n = 1024, 512, 256
    lowered = jax.jit(lambda a, b: a @ b).lower(
        jax.ShapeDtypeStruct((m, k), jnp.bfloat16, sharding=rows),
        jax.ShapeDtypeStruct((k, n), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec())))
    program = programs.LoweredProgram("matmul", lowered, 2 * m * n * k, m, "matmul")
    entry = report.program_report(program, lowered.compile(), parsed, compile_s=0.0)
    assert entry["flops_per_device"] == 2 * m * n * k / 8
    assert entry["flops_ratio_hlo_to_model"] == pytest.approx(1.0)
    assert entry["roofline"]["compute_s"] == pytest.approx(2 * m * n * k / 8 / parsed.chip.peak_bf16_flops)


# ------------------------------------------------------------------------------------------------ the CLI
def _cli(*args, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "diffusion_gemma.aot", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("args, message", [
    (["--config=configs/gsm8k_sft.py", "--topology=v9-8"], "unknown TPU generation 'v9'"),
    (["--config=configs/gsm8k_sft.py"], "--topology is required"),
    (["--config=configs/gsm8k_sft.py", "--topology=v6e-8", "--config.mesh.data=3"],
     "8 devices are not divisible by 3"),
    (["--config=configs/gsm8k_sft.py", "--topology=v6e-16", "--config.model.preset=tiny"],
     "8 experts cannot be split over the 'expert' mesh axis of size 16"),
    (["--config=configs/gsm8k_sft.py", "--topology=v6e-8", "--programs=train,serve"], "unknown ['serve']"),
])
def test_cli_errors_are_one_line(args, message, tmp_path):
    result = _cli(*args, tmp_path=tmp_path)
    assert result.returncode in (1, 2), result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("aot: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_cli_writes_the_report_and_refuses_to_overwrite_it(tmp_path):
    output = tmp_path / "report.json"
    args = ["--config=configs/gsm8k_sft.py", "--topology=v6e-8", "--config.model.preset=tiny",
            "--config.data.seq_length=64", "--config.data.block_size=16", f"--output={output}",
            "--programs=sampler", "--sampler_batch_sizes=8", "--prompt_length=32"]
    result = _cli(*args, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads(output.read_text())
    assert [p["program"] for p in written["programs"]] == ["encode", "denoise"]
    assert written["topology"]["jax_name"] == "v6e:2x4" and written["versions"]["libtpu"]
    assert "roofline:" in result.stdout and "fits" in result.stdout
    again = _cli(*args, tmp_path=tmp_path)
    assert again.returncode == 1 and "already exists; pass --overwrite" in again.stderr
    assert json.loads(output.read_text()) == written


@pytest.mark.slow
def test_grouped_moe_on_a_2x4_mesh_compiles_without_involuntary_rematerialization():
    """Sharding hygiene: the data-parallel (grouped) MoE on a 2x4 mesh made XLA reshard the flattened tokens by
    gathering them whole ("Involuntary full rematerialization", 6 warnings on this 2-layer step), following the
    FSDP expert weights' split of the model dim; gathering those weights instead (`sharding.gather_whole`)
    leaves none."""
    import jax

    from diffusion_gemma.aot import programs, run

    config = _tiny_config(**{"model.remat": "none", "model.dtype": "float32", "mesh.data": 2, "mesh.expert": 4,
                             "model.overrides": {"moe_impl": "grouped", "num_layers": 2}})
    with jax.default_matmul_precision("highest"):
        compiled = run.compile_program(programs.train_step(config, jax.devices()), log=lambda line: None)
    assert compiled.executable is not None and compiled.spmd_warnings == ()


def test_what_xla_writes_to_stderr_during_a_compile_is_caught_and_passed_on(capfd):
    from diffusion_gemma.aot import run

    line = "W1205 spmd_partitioner.cc:656] [SPMD] Involuntary full rematerialization. The compiler cannot go"
    with run._captured_stderr() as captured:
        os.write(2, f"{line}\n".encode())  # as XLA's C++ logging writes: below Python's sys.stderr
    assert line in captured() and line in capfd.readouterr().err


def test_spmd_warnings_are_read_from_what_xla_writes_to_stderr():
    from diffusion_gemma.aot import run

    line = ("W1205 04:46:41.370866   21845 spmd_partitioner.cc:656] [SPMD] Involuntary full rematerialization. The "
            "compiler cannot go from sharding {devices=[8,1]<=[8]} to {devices=[1,2,4]<=[8] last_tile_dim_replicate}")
    found = {m.group(0) for m in run.SPMD_WARNING.finditer(f"noise\n{line}\nmore noise\n")}
    assert found == {line[line.index("Involuntary"):]}


def test_find_max_batch_compiles_the_trainers_step_at_each_probed_batch(monkeypatch):
    """`--find_max_batch`'s glue: each probe is the run's own config at another global batch (a multiple of the
    chips), measured by its compiled buffers, and a compiler refusal counts as not fitting. The compile is faked
    here (an affine memory model); the compiles themselves are tested above."""
    import types

    from diffusion_gemma.aot import run

    parsed = topology.parse("v6e-8")
    compiled_batches = []

    def fake_train_step(config, devices):
        compiled_batches.append(config.data.global_batch_size)
        return types.SimpleNamespace(batch=config.data.global_batch_size)

    # Buffers sum to 4 GB + 1.5 GB per row; the peak (what the compiler checks, and refuses by) to 4 GB + 1 GB.
    def fake_compile(program, log):
        total, peak = 4e9 + 1.5e9 * program.batch, 4e9 + 1e9 * program.batch
        if peak > parsed.chip.hbm_bytes:
            refusal = report.OutOfMemory(required=peak, available=parsed.chip.hbm_bytes, message="RESOURCE_EXHAUSTED")
            return run.Compiled(None, 1.0, (), refusal)
        memory = types.SimpleNamespace(argument_size_in_bytes=int(total), output_size_in_bytes=0,
                                       alias_size_in_bytes=0, temp_size_in_bytes=0,
                                       generated_code_size_in_bytes=0, peak_memory_in_bytes=int(peak))
        return run.Compiled(types.SimpleNamespace(memory_analysis=lambda: memory), 1.0, ())

    monkeypatch.setattr(run.programs_lib, "train_step", fake_train_step)
    monkeypatch.setattr(run, "compile_program", fake_compile)
    config = _tiny_config()
    first = {"memory": {"total": 4e9 + 1.5e9 * 8, "peak": 4e9 + 1e9 * 8}}
    hbm = parsed.chip.hbm_bytes
    for by, per_row in (("sum", 1.5e9), ("peak", 1e9)):
        compiled_batches.clear()
        found = run._search_batch(config, parsed, [], first, max_probes=6, log=lambda line: None, by=by)
        truth = int((hbm - 4e9) / per_row) // 8 * 8
        assert found["largest"] == truth and found["smallest_failing"] == truth + 8 and found["exact"], (by, found)
        assert found["by"] == by
        assert all(batch % 8 == 0 for batch in compiled_batches) and 8 not in compiled_batches  # batch 8 was given
    with pytest.raises(ValueError, match="unknown memory figure 'max'"):
        report.Memory(1, 0, 0, 0, 0).bytes_by("max")


def test_results_table_lists_each_program_and_each_search_once(tmp_path):
    """experiments/benchmarks/aot_table.py on recorded reports: one row per program, a refusal says by how much,
    and a batch search goes to its own table (not again as its base row)."""
    results = os.path.join(os.path.dirname(__file__), "..", "experiments", "benchmarks", "results", "aot")
    with open(os.path.join(results, "lora_v6e-8.json")) as f:
        base = json.load(f)
    searched = dict(base, max_batch=dict(largest=8, smallest_failing=16, exact=True, granule=8, probes=[
        dict(batch=8, total_bytes=27.2e9, fits=True), dict(batch=16, total_bytes=41.0e9, fits=False)]))
    (tmp_path / "lora_v6e-8.json").write_text(json.dumps(base))
    (tmp_path / "max_batch_lora_v6e-8.json").write_text(json.dumps(searched))
    with open(os.path.join(results, "sft_v6e-8.json")) as f:
        (tmp_path / "sft_v6e-8.json").write_text(f.read())
    script = os.path.join(os.path.dirname(__file__), "..", "experiments", "benchmarks", "aot_table.py")
    table = subprocess.run([sys.executable, script, str(tmp_path)], capture_output=True, text=True, check=True).stdout
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == ["lora_v6e-8", "sft_v6e-8", "max_batch_lora_v6e-8"]
    assert "27.2 (12.7 args + 14.5 temp): fits" in rows[0]
    assert "does not fit: needs > 73.4 GiB of 31.25 GiB" in rows[1]
    assert rows[2].startswith("| `max_batch_lora_v6e-8` | v6e-8 (8 chips) | sum | 8 | 8: 27.2 GB, 16: 41.0 GB "
                              "(does not fit)")
