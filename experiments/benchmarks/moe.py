"""MoE layer speed at the released per-layer shapes (D 2816, E 128, k 8, Ie 704): dense oracle vs grouped
(`ragged_dot`) vs expert-parallel dispatch, forward and forward + backward.

    python experiments/benchmarks/moe.py                  # CPU: 8 host devices, mesh 1x8, 32 tokens, fp32
    python experiments/benchmarks/moe.py --preset=gpu     # accelerators: every device on 'expert', 8192 tokens,
                                                          # bf16, plus the ragged (GPU/TPU-only) dispatch

One MoE layer as a pure function of arrays (router + experts, random weights with the model's init scale and
random inputs), jitted. 'dense' and 'grouped' run on one device; 'expert_parallel*' run under
`jax.set_mesh(mesh)` over every device (tokens split over all of them, experts over 'expert'). Per variant:
compile time of the forward + backward program, then the median wall time of `--repeats` calls of the forward
and of forward + backward (gradients of a scalar loss with respect to the inputs, the router and the expert
weights), and the dropped-assignment count. On CPU the 8 "devices" share the host's cores, so the
expert-parallel rows show the algorithm's total work and exchange overhead, not a parallel speed-up; and
XLA:CPU lowers `ragged_dot` to a dense matmul per group (work x E for 'grouped', x E/M per device for the
expert-parallel buffers), which is why 'grouped' is slower than the dense oracle there.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from diffusion_gemma import atomic_write  # noqa: E402

PRESETS = {
    "cpu": dict(tokens=32, dtype="float32", mesh="1x8", repeats=3,
                variants="dense,grouped,expert_parallel,expert_parallel@1.25"),
    "gpu": dict(tokens=8192, dtype="bfloat16", mesh="1x-1", repeats=10,
                variants="dense,grouped,expert_parallel,expert_parallel@1.25,expert_parallel_ragged"),
}
RELEASED = common.PRESETS["released"][0]  # the library preset whose per-layer shapes are measured


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--tokens", type=int, help="tokens in the layer's batch (preset default)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="parameter and compute dtype")
    parser.add_argument("--mesh", help="DATAxEXPERT, -1 = all remaining devices (e.g. 1x8, 2x4, 1x-1)")
    parser.add_argument("--variants", help="comma-separated: dense, grouped, expert_parallel[@capacity_factor], "
                                           "expert_parallel_ragged")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--model", default=RELEASED,
                        help="library preset whose MoE layer shapes are measured (tiny: a smoke run of the script)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.preset == "cpu" and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from flax import nnx

    from diffusion_gemma import registry, sharding
    from diffusion_gemma.model import expert_parallel, moe

    config = registry.MODEL_PRESETS.get(args.model)()
    DIM, EXPERTS, TOP_K, EXPERT_DIM = config.hidden_size, config.num_experts, config.top_k, config.moe_intermediate_size
    eps, std = config.rms_norm_eps, config.initializer_range
    # The model's own MoE parameters' logical axes, keyed by parameter name.
    LOGICAL_AXES = {path[-1]: axes for path, axes in sharding.logical_axes(nnx.eval_shape(lambda: moe.MoE(
        hidden_size=DIM, num_experts=EXPERTS, top_k=TOP_K, expert_dim=EXPERT_DIM, eps=eps, std=std,
        param_dtype=jnp.float32, impl="dense", rngs=nnx.Rngs(0)))).items()}
    dtype = jnp.dtype(args.dtype)
    data, expert = (int(s) for s in args.mesh.split("x"))
    mesh = sharding.make_mesh(sharding.MeshConfig(data=data, expert=expert))
    keys = jax.random.split(jax.random.key(0), 7)
    params = dict(
        router_proj=(std * jax.random.normal(keys[0], (DIM, EXPERTS))).astype(dtype),
        router_scale=(1.0 + 0.1 * jax.random.normal(keys[1], (DIM,))).astype(dtype),
        per_expert_scale=(1.0 + 0.1 * jax.random.normal(keys[2], (EXPERTS,))).astype(dtype),
        gate_up_proj=(std * jax.random.normal(keys[3], (EXPERTS, DIM, 2 * EXPERT_DIM))).astype(dtype),
        down_proj=(std * jax.random.normal(keys[4], (EXPERTS, EXPERT_DIM, DIM))).astype(dtype))
    residual = jax.random.normal(keys[5], (args.tokens, DIM)).astype(dtype)
    normed = jax.random.normal(keys[6], (args.tokens, DIM)).astype(dtype)

    def single_device(expert_fn):
        def layer(residual, normed, p):
            weights, experts = moe.route(residual, p["router_proj"], p["router_scale"], p["per_expert_scale"],
                                         top_k=TOP_K, eps=eps)
            return expert_fn(normed, weights, experts, p["gate_up_proj"], p["down_proj"]), jnp.zeros((), jnp.int32)
        return layer

    def parallel(dispatch, capacity_factor):
        def layer(residual, normed, p):
            return expert_parallel.moe_expert_parallel(
                residual, normed, None, p["router_proj"], p["router_scale"], p["per_expert_scale"],
                p["gate_up_proj"], p["down_proj"], top_k=TOP_K, eps=eps, dispatch=dispatch,
                capacity_factor=capacity_factor)
        return layer

    def loss(layer, residual, normed, p):
        out, dropped = layer(residual, normed, p)
        return jnp.mean(jnp.square(out.astype(jnp.float32))), dropped

    rows = []
    for variant in args.variants.split(","):
        name, _, factor = variant.partition("@")
        factor = float(factor) if factor else None
        if name in ("dense", "grouped"):
            layer = single_device(moe.EXPERT_IMPLEMENTATIONS[name])
            placed = jax.device_put((residual, normed, params), jax.devices()[0])
            context = contextlib.nullcontext()
        else:
            layer = parallel(moe.EXPERT_PARALLEL_DISPATCH[name], factor)
            placed = (*sharding.shard_batch((residual, normed), mesh),
                      {key: jax.device_put(value, NamedSharding(mesh, sharding.logical_to_spec(
                          LOGICAL_AXES[key], value.shape, mesh))) for key, value in params.items()})
            context = jax.set_mesh(mesh)
        with context:
            forward = jax.jit(layer)
            backward = jax.jit(jax.value_and_grad(functools.partial(loss, layer), argnums=(0, 1, 2), has_aux=True))
            began = time.perf_counter()
            try:
                compiled = backward.lower(*placed).compile()
            except Exception as err:  # e.g. ragged_all_to_all on XLA:CPU
                rows.append(dict(variant=variant, error=f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"))
                print(rows[-1], flush=True)
                continue
            compile_s = time.perf_counter() - began
            jax.block_until_ready(forward(*placed))  # compile the forward too
            forward_s = common.median_seconds(lambda: jax.block_until_ready(forward(*placed)), args.repeats)[0]
            backward_s = common.median_seconds(lambda: jax.block_until_ready(compiled(*placed)), args.repeats)[0]
            (_, dropped), _ = compiled(*placed)
        rows.append(dict(variant=variant, devices=1 if name in ("dense", "grouped") else mesh.size,
                         compile_s=round(compile_s, 2), forward_ms=round(1e3 * forward_s, 1),
                         forward_backward_ms=round(1e3 * backward_s, 1), dropped=int(dropped)))
        print(rows[-1], flush=True)

    header = dict(jax=jax.__version__, backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
                  devices=len(jax.devices()), host=platform.processor() or platform.machine(),
                  cpus=os.cpu_count(), tokens=args.tokens, dtype=args.dtype,
                  mesh=dict(zip(mesh.axis_names, mesh.devices.shape)),
                  shapes=dict(D=DIM, E=EXPERTS, k=TOP_K, Ie=EXPERT_DIM))
    print(json.dumps(header))
    print("| variant | devices | compile fwd+bwd (s) | forward (ms) | forward + backward (ms) | dropped |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['variant']} | | | not run: {row['error']} | | |")
        else:
            print(f"| {row['variant']} | {row['devices']} | {row['compile_s']} | {row['forward_ms']} | "
                  f"{row['forward_backward_ms']} | {row['dropped']} |")
    if args.json:
        atomic_write.write_json(args.json, dict(header, rows=rows), overwrite=True)


if __name__ == "__main__":
    main(sys.argv[1:])
