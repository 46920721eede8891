"""The README tables of the released model's ahead-of-time reports (experiments/benchmarks/aot_released.sh).

    python experiments/benchmarks/aot_table.py [experiments/benchmarks/results/aot]
    python experiments/benchmarks/aot_table.py --refresh   # recompute each report from its kept HLO file

`--refresh` rewrites each program's figures with the current `diffusion_gemma.aot.report` from XLA's buffer sizes
in the file and the compiled HLO that `--hlo_dir` kept (when it is still there), without compiling again.

One row per program of every results file (a batch search's file: one row of the search table instead): memory per device against the chip's HBM, FLOPs and the roofline
bound, the collectives' bytes, and the compile time; a row the compiler refused says by how much it does not fit.
"""

from __future__ import annotations

import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def gb(count: float) -> str:
    return f"{count / 1e9:.1f}"


def row(name: str, result: dict, program: dict) -> str:
    memory, topology = program["memory"], result["topology"]
    where = f"{topology['name']} ({topology['chips']} chips)"
    mesh = f"{result['mesh']['data']}x{result['mesh']['expert']}"
    what = f"`{name}` {program['description']}, mesh {mesh}, {result['model']['moe_impl']}"
    if "roofline" not in program:
        return (f"| {what} | {where} | does not fit: needs > {memory['required'] / 2**30:.1f} GiB of "
                f"{memory['available'] / 2**30:.2f} GiB | | | | {program['compile_s']:.0f} |")
    bound = program["roofline"]
    collectives = ", ".join(f"{kind} {gb(entry['bytes'])}" for kind, entry in sorted(program["collectives"].items()))
    peak = f", XLA peak {gb(memory['peak'])}" if memory.get("peak") else ""
    if memory["fits"]:
        verdict = "fits"
    elif memory.get("peak") and memory["peak"] <= memory["hbm"]:
        verdict = "over by the sum; the peak fits (compiled)"
    else:
        verdict = "DOES NOT FIT"
    return (f"| {what} | {where} | {gb(memory['total'])} ({gb(memory['argument'])} args + "
            f"{gb(memory['temporary'])} temp{peak}): {verdict} | "
            f"{program.get('compute_flops_per_device', program['flops_per_device']) / 1e12:.1f} TFLOP, "
            f"{gb(program['hbm_bytes_per_device'])} GB HBM | {collectives} | "
            f"{1e3 * bound['compute_s']:.0f} / {1e3 * bound['memory_s']:.0f} / {1e3 * bound['interconnect_s']:.0f} ms "
            f"-> {bound['bound_by']}, MFU <= {100 * bound['mfu_at_bound']:.1f}% | {program['compile_s']:.0f} |")


def refresh(path: str) -> None:
    """Recompute the file's program reports from their kept HLO and stored buffer sizes (atomically rewritten)."""
    import gzip
    import types

    from diffusion_gemma import atomic_write, registry
    from diffusion_gemma.aot import hlo_stats, report, topology
    from diffusion_gemma.training import metrics

    with open(path) as f:
        result = json.load(f)
    parsed = topology.parse(result["topology"]["name"])
    registry.load_tasks()
    model = registry.MODEL_PRESETS.get("gemma4_26b_a4b")()
    share = metrics.expert_params_per_token(model) / metrics.active_params_per_token(model)
    for index, entry in enumerate(result["programs"]):
        hlo_file = entry.get("hlo_file")
        if "roofline" not in entry or not hlo_file or not os.path.exists(hlo_file):
            continue
        with gzip.open(hlo_file, "rt") as f:
            stats = hlo_stats.analyze(f.read())
        memory = report.Memory(**{k: entry["memory"][k] for k in ("argument", "output", "alias", "temporary", "code")},
                               peak=entry["memory"].get("peak"))
        program = types.SimpleNamespace(name=entry["program"], description=entry["description"],
                                        model_flops=entry["model_flops"], tokens=entry["tokens"],
                                        expert_flops=entry["model_flops"] * share)
        xla = {"flops": entry["xla_cost_analysis"]["flops"],
               "bytes accessed": entry["xla_cost_analysis"]["bytes_accessed"]}
        layers = result["model"]["layers"]
        fresh = report.report_from(program, memory, stats, xla, parsed, compile_s=entry["compile_s"],
                                   layer_loop_trips=layers // model.scan_period, num_layers=layers)
        result["programs"][index] = {**entry, **fresh}
    atomic_write.write_json(path, result, overwrite=True)


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--refresh":
        argv = argv[1:]
        directory = argv[0] if argv else os.path.join(HERE, "results", "aot")
        for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
            refresh(path)
    directory = argv[0] if argv else os.path.join(HERE, "results", "aot")
    print("| program | slice | memory per device, GB | per device | collectives sent per device, GB | "
          "roofline compute / memory / ICI | compile (s) |")
    print("|---|---|---|---|---|---|---:|")
    searches = []
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        with open(path) as f:
            result = json.load(f)
        name = os.path.splitext(os.path.basename(path))[0]
        if "max_batch" in result:  # its first program is its base row's, compiled again: listed with the search
            searches.append((name, result))
            continue
        for program in result["programs"]:
            print(row(name, result, program))
    if searches:
        print("\n| search | slice | judged by | largest global batch that fits | probes: global batch -> memory per "
              "device |")
        print("|---|---|---|---:|---|")
    for name, result in searches:
        found = result["max_batch"]
        probes = ", ".join(f"{p['batch']}: {p['total_bytes'] / 1e9:.1f} GB{'' if p['fits'] else ' (does not fit)'}"
                           for p in found["probes"])
        largest = f"{found['largest']}" if found["exact"] else f">= {found['largest']} (probes ran out)"
        by = found.get("by", "sum")  # searches recorded before the choice existed held the sum against HBM
        print(f"| `{name}` | {result['topology']['name']} ({result['topology']['chips']} chips) | {by} | {largest} "
              f"| {probes} |")


if __name__ == "__main__":
    main(sys.argv[1:])
