"""Sampler speed: one denoising forward and the whole block-diffusion `generate`, ours against transformers,
with the memory-bandwidth floor of a forward.

    python experiments/benchmarks/sampler.py --preset=small --layers=6 --threads=1        # CPU (README table)
    python experiments/benchmarks/sampler.py --preset=released --layers=30 --dtype=bfloat16 \\
        --output=sampler_gpu.json                                                      # the GPU run (~50 GB)

Per batch size (default 1, 4, 8; canvas 256, one block of 256 new tokens after a random prompt):
- denoising forward: the steady-state decoder step of the sampler, i.e. the canvas [B, 256] against an encoded
  prompt cache, WITH self-conditioning logits (every step after the first), returning the fp32 softcapped
  logits [B, 256, V]; ours `DiffusionGemma.decode` jitted, transformers `model(past_key_values=cache,
  decoder_input_ids=..., self_conditioning_logits=...)` under no_grad. Median of `--repeats` after a warm-up.
- memory-bandwidth floor: the bytes of every text parameter (at B x 256 tokens x top-8, essentially every
  expert of every layer is read) / peak bandwidth; reported as floor / measured forward time. Peak bandwidth:
  `--bandwidth`, else H100 3.35 TB/s / H200 4.8 TB/s / A100 2.04 TB/s by device name, else (CPU) a measured
  single-thread streaming read.
- generate: ours `diffusion_gemma.sampling.sampler.generate` (jitted) vs `DiffusionGemmaForBlockDiffusion.
  generate`, reference defaults except `max_denoising_steps` and no EOS ids (a random model is never confident,
  so every row runs every step on both sides; the script checks the counts agree): ms per denoising step (wall /
  steps, prompt and block encodes amortised in) and generated tokens/s.

Each side runs in its own subprocess with its own random weights (same shapes and init scale), so the released
30-layer shape needs one copy at a time on the device (~50 GB in bf16: an 80 GB GPU). `generate.py` is the
same-checkpoint comparison (one set of weights loaded by both) at small scale.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from diffusion_gemma import atomic_write  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(common.PRESETS), default="small")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch_sizes", default="1,4,8")
    parser.add_argument("--canvas", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens (random ids)")
    parser.add_argument("--steps", type=int, default=8, help="max_denoising_steps of the generate comparison")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="parameter and compute dtype, both sides")
    parser.add_argument("--sides", default="jax,torch")
    parser.add_argument("--parts", default="forward,generate", help="comma-separated: forward, generate")
    parser.add_argument("--attn", default="sdpa", help="reference: attn_implementation")
    parser.add_argument("--grouped_matmul", default="auto", choices=("auto", "ragged_dot"),
                        help="ours, MoE grouped matmul: auto (the library: ragged_dot on GPU/TPU, the segment scan "
                             "on CPU) or ragged_dot everywhere (XLA:CPU's masked dense lowering; for A/B runs)")
    parser.add_argument("--torch_experts", default=None, help="reference: experts_implementation")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per side (0: library defaults)")
    parser.add_argument("--bandwidth", type=float, default=None, help="peak memory bandwidth, bytes/s")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--output", default=None, help="write the results here as JSON (atomically)")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _prompts(config, batch, prompt, seed=0):
    import numpy as np

    return np.random.default_rng(seed + batch).integers(3, config.vocab_size, size=(batch, prompt)).astype(np.int32)


def measured_read_bandwidth(gib: float = 0.5) -> float:
    """Single-thread streaming read of a float32 array (bytes/s, best of 5)."""
    import numpy as np

    array = np.ones(int(gib * 2**30) // 4, np.float32)
    best = float("inf")
    for _ in range(5):
        began = time.perf_counter()
        array.sum()
        best = min(best, time.perf_counter() - began)
    return array.nbytes / best


def jax_worker(args) -> dict:
    common.set_cpu_threads(args.threads)
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from diffusion_gemma import sharding
    from diffusion_gemma.sampling.sampler import SamplerConfig, generate
    from diffusion_gemma.model.transformer import DiffusionGemma

    common.select_grouped_matmul(args.grouped_matmul)
    if args.dtype == "float32":
        jax.config.update("jax_default_matmul_precision", "highest")  # torch's fp32 matmuls are full precision
    config = common.model_config(args.preset, args.layers, canvas=args.canvas, dtype=args.dtype,
                                 param_dtype=args.dtype)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, expert=1), [jax.devices()[0]])
    common.log(f"jax: building {args.preset} x {args.layers} layers on {jax.devices()[0]}")
    with jax.set_mesh(mesh):
        model = sharding.init_sharded(lambda: DiffusionGemma(config, rngs=nnx.Rngs(0)), mesh)
    graphdef, state = nnx.split(model)
    params = common.count_params(nnx.state(model, nnx.Param))
    weight_bytes = common.tree_bytes(nnx.state(model, nnx.Param))

    @jax.jit
    def encode(state, prompt_ids):
        m = nnx.merge(graphdef, state)
        cache = m.init_cache(prompt_ids.shape[0], prompt_ids.shape[1])
        return m.encode(prompt_ids, cache=cache)[0]

    @jax.jit
    def forward(state, canvas, cache, sc_logits):
        return nnx.merge(graphdef, state).decode(canvas, cache, self_conditioning_logits=sc_logits)

    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = _prompts(config, batch, args.prompt)
        row = dict(batch=batch)
        if "forward" in args.parts:
            common.log(f"jax: forward, batch {batch}")
            cache = encode(state, jnp.asarray(prompts))
            canvas = jax.random.randint(jax.random.key(batch), (batch, args.canvas), 0, config.vocab_size)
            sc = jnp.zeros((batch, args.canvas, config.vocab_size), jnp.float32)
            holder = [sc]

            def call():
                holder[0] = jax.block_until_ready(forward(state, canvas, cache, holder[0]))

            began = time.perf_counter()
            call()
            row["forward_first_s"] = time.perf_counter() - began
            call()  # the fed-back logits may carry another sharding than the zeros: a second specialisation
            row["forward"] = common.time_calls(call, args.repeats)
            del cache, holder, sc
        if "generate" in args.parts:
            common.log(f"jax: generate, batch {batch}")
            sampler = SamplerConfig(max_new_tokens=args.canvas, max_denoising_steps=args.steps)

            def run():
                result = generate(model, prompts, None, jax.random.key(0), sampler)
                result.tokens.block_until_ready()
                return result

            began = time.perf_counter()
            result = run()
            row["generate_first_s"] = time.perf_counter() - began
            row["generate"] = common.time_calls(run, args.repeats)
            row["steps"] = result.total_steps()
            row["generated"] = int(result.generated().size)
        row["load_average"] = common.load_average()
        rows.append(row)
        print(json.dumps(row), flush=True)
    device = jax.devices()[0]
    return dict(side="jax", device=str(device.device_kind), platform=device.platform, params=params,
                weight_bytes=weight_bytes, rows=rows)


def torch_worker(args) -> dict:
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    if args.threads:
        common.set_cpu_threads(args.threads)
        torch.set_num_threads(args.threads)
    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    config = common.model_config(args.preset, args.layers, canvas=args.canvas)
    kwargs = dict(attn_implementation=args.attn, dtype=getattr(torch, args.dtype))
    if args.torch_experts:
        kwargs["experts_implementation"] = args.torch_experts
    common.log(f"torch: building {args.preset} x {args.layers} layers on {device}")
    torch.manual_seed(0)
    with torch.device(device):
        model = DiffusionGemmaForBlockDiffusion._from_config(common.hf_config(config, args.canvas), **kwargs)
    model.eval()
    model.generation_config.eos_token_id = None  # a random model must not stop on a sampled EOS id
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = torch.from_numpy(_prompts(config, batch, args.prompt).astype("int64")).to(device)
        row = dict(batch=batch)
        if "forward" in args.parts:
            common.log(f"torch: forward, batch {batch}")
            with torch.no_grad():
                cache = model.model.encoder(input_ids=prompts, use_cache=True).past_key_values
                canvas = torch.randint(0, config.vocab_size, (batch, args.canvas), device=device)
                holder = [torch.zeros((batch, args.canvas, config.vocab_size), device=device,
                                      dtype=getattr(torch, args.dtype))]

                def call():
                    logits = model(past_key_values=cache, decoder_input_ids=canvas,
                                   self_conditioning_logits=holder[0]).logits
                    sync()
                    holder[0] = logits.to(holder[0].dtype)

                began = time.perf_counter()
                call()
                row["forward_first_s"] = time.perf_counter() - began
                call()
                row["forward"] = common.time_calls(call, args.repeats)
            del cache, holder
        if "generate" in args.parts:
            common.log(f"torch: generate, batch {batch}")

            def run():
                with torch.no_grad():
                    out = model.generate(prompts, max_new_tokens=args.canvas, max_denoising_steps=args.steps)
                sync()
                return out

            began = time.perf_counter()
            out = run()
            row["generate_first_s"] = time.perf_counter() - began
            row["generate"] = common.time_calls(run, args.repeats)
            generated = out.sequences.shape[1] - prompts.shape[1]
            row["steps"] = int(round(generated / float(out.tokens_per_forward[0])))
            row["generated"] = int(generated * batch)
        row["load_average"] = common.load_average()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return dict(side="torch", device=torch.cuda.get_device_name() if device == "cuda" else "cpu", platform=device,
                experts_implementation=model.config.text_config._experts_implementation,
                attn_implementation=model.config._attn_implementation, rows=rows)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args._worker:
        result = (jax_worker if args._worker == "jax" else torch_worker)(args)
        atomic_write.write_json(args._result, result, overwrite=True)
        return
    base_argv = [a for a in argv if not a.startswith(("--output", "--_worker", "--_result"))]
    sides = {}
    for side in args.sides.split(","):
        common.log(f"run: {side}")
        sides[side] = {"side": side, **common.run_worker(__file__, base_argv, side, args.timeout)}
    ours, reference = sides.get("jax", {}), sides.get("torch", {})
    bandwidth, source = args.bandwidth, "--bandwidth"
    if bandwidth is None:
        for name, value in common.PEAK_BANDWIDTH.items():
            if name.lower() in str(ours.get("device", reference.get("device", ""))).lower():
                bandwidth, source = value, f"{name} peak"
    if bandwidth is None:
        bandwidth, source = measured_read_bandwidth(), "measured single-thread streaming read"
    config = common.model_config(args.preset, args.layers, canvas=args.canvas)
    bytes_per = 2 if args.dtype == "bfloat16" else 4
    weight_bytes = ours.get("weight_bytes") or common.sampler_forward_weight_bytes(config, bytes_per)
    floor_s = weight_bytes / bandwidth
    table = []
    for i, batch in enumerate(int(b) for b in args.batch_sizes.split(",")):
        o = ours["rows"][i] if "rows" in ours else {}
        r = reference["rows"][i] if "rows" in reference else {}
        if o.get("steps") is not None and r.get("steps") is not None and o["steps"] != r["steps"]:
            print(f"WARNING batch {batch}: step counts differ (ours {o['steps']}, reference {r['steps']})")
        entry = dict(batch=batch)
        for name, row in (("ours", o), ("transformers", r)):
            if "forward" in row:
                entry[f"{name}_forward_ms"] = 1e3 * row["forward"]["wall_s"]
                entry[f"{name}_forward_cpu_ms"] = 1e3 * row["forward"]["cpu_s"]
                entry[f"{name}_forward_floor_pct"] = 100 * floor_s / row["forward"]["wall_s"]
            if "generate" in row:
                entry[f"{name}_step_ms"] = 1e3 * row["generate"]["wall_s"] / row["steps"]
                entry[f"{name}_tokens_per_s"] = row["generated"] / row["generate"]["wall_s"]
                entry[f"{name}_steps"] = row["steps"]
            entry[f"{name}_load"] = (row.get("load_average") or [None])[0]
        if "ours_forward_ms" in entry and "transformers_forward_ms" in entry:
            entry["forward_speedup"] = entry["transformers_forward_ms"] / entry["ours_forward_ms"]
        if "ours_step_ms" in entry and "transformers_step_ms" in entry:
            entry["generate_speedup"] = entry["transformers_step_ms"] / entry["ours_step_ms"]
        table.append(entry)

    print(f"\npreset {args.preset} x {args.layers} layers ({ours.get('params', 0) / 1e6:.1f} M text parameters, "
          f"{weight_bytes / 2**20:,.1f} MiB), {args.dtype}, canvas {args.canvas}, prompt {args.prompt}, "
          f"{args.steps} steps; floor {1e3 * floor_s:.3f} ms at {bandwidth / 1e9:.1f} GB/s ({source}); "
          f"threads {args.threads or 'default'}\n")
    print("| batch | ours fwd (ms) | transformers fwd (ms) | fwd speed-up | ours % of floor | ours ms/step | "
          "transformers ms/step | ours tokens/s | transformers tokens/s | generate speed-up | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    f = lambda e, k, fmt: format(e[k], fmt) if e.get(k) is not None else "-"  # noqa: E731
    for e in table:
        print(f"| {e['batch']} | {f(e, 'ours_forward_ms', '.1f')} | {f(e, 'transformers_forward_ms', '.1f')} | "
              f"{f(e, 'forward_speedup', '.2f')}x | {f(e, 'ours_forward_floor_pct', '.2f')}% | "
              f"{f(e, 'ours_step_ms', '.1f')} | {f(e, 'transformers_step_ms', '.1f')} | "
              f"{f(e, 'ours_tokens_per_s', '.1f')} | {f(e, 'transformers_tokens_per_s', '.1f')} | "
              f"{f(e, 'generate_speedup', '.2f')}x | {e.get('ours_load')} / {e.get('transformers_load')} |")
    for side, result in sides.items():
        if "error" in result:
            print(f"{side}: not run: {result['error']}")
    if args.output:
        atomic_write.write_json(args.output, dict(
            args={k: v for k, v in vars(args).items() if not k.startswith("_")}, environment=common.environment(),
            bandwidth=bandwidth, bandwidth_source=source, weight_bytes=weight_bytes, floor_s=floor_s, table=table,
            sides=sides), overwrite=True)
        print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
