"""Expert-parallel MoE on 8 fake CPU devices against the dense oracle (fp32, rtol 1e-5).

Covers the default 'all_to_all' dispatch on meshes 1x8, 2x4 and 8x1 (outputs and gradients), dropless skewed
routing, the exact dropped-assignment count under a capacity factor, pad-token exclusion, LoRA on the expert
kernels, and the GPU/TPU 'ragged' dispatch: its real collective is lowered (XLA:CPU cannot compile it) and its
algorithm is executed with an emulated `ragged_all_to_all`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from diffusion_gemma import sharding
from diffusion_gemma.config import ConfigError, ModelConfig
from diffusion_gemma.model import expert_parallel, moe, moe_ops
from diffusion_gemma.model.lora import LoRA

MESHES = [(1, 8), (2, 4), (8, 1)]
DIM, EXPERTS, TOP_K, EXPERT_DIM = 16, 8, 2, 8
RTOL = ATOL = 1e-5


def make_mesh(shape):
    return sharding.make_mesh(sharding.MeshConfig(data=shape[0], expert=shape[1]))


def make_params(seed=0, experts=EXPERTS):
    keys = jax.random.split(jax.random.key(seed), 5)
    return dict(router_proj=jax.random.normal(keys[0], (DIM, experts)),
                router_scale=1.0 + 0.3 * jax.random.normal(keys[1], (DIM,)),
                per_expert_scale=1.0 + 0.3 * jax.random.normal(keys[2], (experts,)),
                gate_up=0.3 * jax.random.normal(keys[3], (experts, DIM, 2 * EXPERT_DIM)),
                down=0.3 * jax.random.normal(keys[4], (experts, EXPERT_DIM, DIM)))


def make_tokens(num_tokens, seed=1, pad_fraction=0.0):
    keys = jax.random.split(jax.random.key(seed), 3)
    mask = jax.random.uniform(keys[2], (num_tokens,)) >= pad_fraction
    return jax.random.normal(keys[0], (num_tokens, DIM)), jax.random.normal(keys[1], (num_tokens, DIM)), mask


@functools.partial(jax.jit, static_argnames="top_k")
def dense_moe(residual, normed, mask, router_proj, router_scale, per_expert_scale, gate_up, down, *,
              drop=None, top_k=TOP_K):
    """The oracle; `drop` [T, k] bool zeroes assignments the capacity-limited dispatch is expected to drop."""
    weights, experts = moe_ops.route(residual, router_proj, router_scale, per_expert_scale, top_k=top_k, eps=1e-6)
    weights, experts = moe_ops.mask_assignments(weights, experts, mask, gate_up.shape[0])
    if drop is not None:
        weights = jnp.where(drop, 0.0, weights)
    return moe_ops.experts_dense(normed, weights, experts, gate_up, down)


def ep_moe(residual, normed, mask, router_proj, router_scale, per_expert_scale, gate_up, down, top_k=TOP_K,
           **kwargs):
    return expert_parallel.moe_expert_parallel(residual, normed, mask, router_proj, router_scale, per_expert_scale,
                                               gate_up, down, top_k=top_k, eps=1e-6, **kwargs)


def args_of(tokens, params):
    return (*tokens, params["router_proj"], params["router_scale"], params["per_expert_scale"], params["gate_up"],
            params["down"])


def skewed(params):
    """Router weights sending every token with a positive residual (`skewed_tokens`) to expert 0 first and
    expert 1 second (both owned by the first 'expert' shard on 2x4; by devices 0 and 1 on 1x8)."""
    proj = jnp.full((DIM, EXPERTS), -4.0).at[:, 0].set(5.0).at[:, 1].set(4.0)
    return dict(params, router_proj=proj, router_scale=jnp.ones((DIM,)))


def skewed_tokens(num_tokens, seed=1):
    residual, normed, mask = make_tokens(num_tokens, seed)
    return jnp.abs(residual) + 0.1, normed, mask


def expected_drops(experts, mask, mesh_shape, capacity):
    """Numpy model of the drop policy: per source device (a contiguous token block), assignments sorted by
    expert (stable in token-major order), the first `capacity` per destination device kept."""
    experts, mask = np.asarray(experts), np.asarray(mask)
    num_tokens, top_k = experts.shape
    devices, shards = mesh_shape[0] * mesh_shape[1], mesh_shape[1]
    local_experts = EXPERTS // shards
    block = num_tokens // devices
    drop = np.zeros_like(experts, bool)
    for device in range(devices):
        tokens = range(device * block, (device + 1) * block)
        assignments = [(experts[t, j], t, j) for t in tokens for j in range(top_k) if mask[t]]
        used = np.zeros(shards, int)
        for expert, t, j in sorted(assignments, key=lambda a: a[0]):
            destination = expert // local_experts
            drop[t, j] = used[destination] >= capacity
            used[destination] += 1
    return drop


# ------------------------------------------------------------------------------------------- outputs, gradients
DIFFERENTIABLE = (0, 1, 3, 4, 5, 6, 7)  # residual, normed and every parameter (not the mask)


def with_gradients(fn, argnums=DIFFERENTIABLE):
    """jit(args -> ((loss, (output, dropped)), gradients of a weighted loss at `argnums`)): one compile gives
    the forward output and the backward pass."""

    def loss(*args):
        out = fn(*args)
        out, dropped = out if isinstance(out, tuple) else (out, jnp.zeros((), jnp.int32))
        weights = jnp.arange(out.size, dtype=out.dtype).reshape(out.shape) / out.size
        return jnp.sum(jnp.sin(out) * weights), (out, dropped)

    return jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))


def assert_matches(result, expected, argnums=DIFFERENTIABLE):
    (_, (out, dropped)), grads = result
    (_, (want, _)), want_grads = expected
    np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL)
    assert int(dropped) == 0
    for index, got, grad in zip(argnums, grads, want_grads):
        np.testing.assert_allclose(got, grad, rtol=RTOL, atol=ATOL, err_msg=f"gradient of argument {index}")


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_outputs_and_gradients_match_dense_oracle(mesh_shape):
    """45 tokens (padded to 48 inside: 5 or 6 real ones per device), 20% of them pads."""
    args = args_of(make_tokens(45, pad_fraction=0.2), make_params())
    expected = with_gradients(dense_moe)(*args)
    with jax.set_mesh(make_mesh(mesh_shape)):
        result = with_gradients(ep_moe)(*args)
    assert_matches(result, expected)
    assert np.all(np.asarray(result[0][1][0])[~np.asarray(args[2])] == 0)  # pads: no expert, zero output


def test_grouped_matches_dense_oracle():
    params = make_params()
    residual, normed, mask = make_tokens(40, pad_fraction=0.2)

    @jax.jit
    def both(residual, normed, mask, params):
        weights, experts = moe_ops.route(residual, params["router_proj"], params["router_scale"],
                                         params["per_expert_scale"], top_k=TOP_K, eps=1e-6)
        weights, experts = moe_ops.mask_assignments(weights, experts, mask, EXPERTS)
        return [fn(normed, weights, experts, params["gate_up"], params["down"])
                for fn in (moe_ops.experts_grouped, moe_ops.experts_dense)]

    grouped, dense = both(residual, normed, mask, params)
    np.testing.assert_allclose(grouped, dense, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------------------ capacity, dropping
@pytest.mark.parametrize("top_k", [1, TOP_K])
def test_skewed_routing_stays_dropless(top_k):
    """Every token to expert 0 (top-1), or to experts 0 and 1 (top-2; on 1x8 those live on two devices)."""
    params = skewed(make_params())
    tokens = skewed_tokens(64)
    expected = dense_moe(*args_of(tokens, params), top_k=top_k)
    with jax.set_mesh(make_mesh((1, 8))):
        out, dropped = jax.jit(functools.partial(ep_moe, top_k=top_k))(*args_of(tokens, params))
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)
    assert int(dropped) == 0


@pytest.mark.parametrize("mesh_shape", [(1, 8), (2, 4)])
def test_capacity_factor_drops_exactly_the_overflow(mesh_shape):
    params = skewed(make_params())
    tokens = skewed_tokens(64)
    local_tokens, shards = 64 // 8, mesh_shape[1]
    factor = 0.5
    capacity = expert_parallel.expert_capacity(local_tokens, TOP_K, EXPERTS // shards, shards, factor)
    assert capacity == int(np.ceil(factor * local_tokens * TOP_K / shards))
    with jax.set_mesh(make_mesh(mesh_shape)):
        out, dropped = jax.jit(functools.partial(ep_moe, capacity_factor=factor))(*args_of(tokens, params))
    # Every device sends local_tokens assignments per skewed expert to that expert's shard, which keeps
    # `capacity` of each device's.
    per_destination = np.bincount(np.array([0, 1]) // (EXPERTS // shards), minlength=shards) * local_tokens
    assert int(dropped) == 8 * np.maximum(per_destination - capacity, 0).sum() > 0
    _, experts = moe_ops.route(tokens[0], params["router_proj"], params["router_scale"], params["per_expert_scale"],
                               top_k=TOP_K, eps=1e-6)
    drop = expected_drops(experts, tokens[2], mesh_shape, capacity)
    np.testing.assert_allclose(out, dense_moe(*args_of(tokens, params), drop=drop), rtol=RTOL, atol=ATOL)


def test_capacity_factor_drop_count_is_exact_for_random_routing():
    mesh_shape = (2, 4)
    params = make_params(seed=4)
    tokens = make_tokens(96, seed=5, pad_fraction=0.25)
    factor = 0.6
    capacity = expert_parallel.expert_capacity(96 // 8, TOP_K, EXPERTS // 4, 4, factor)
    with jax.set_mesh(make_mesh(mesh_shape)):
        out, dropped = jax.jit(functools.partial(ep_moe, capacity_factor=factor))(*args_of(tokens, params))
    _, experts = moe_ops.route(tokens[0], params["router_proj"], params["router_scale"], params["per_expert_scale"],
                               top_k=TOP_K, eps=1e-6)
    drop = expected_drops(experts, tokens[2], mesh_shape, capacity)
    assert 0 < int(dropped) == int(drop.sum())
    np.testing.assert_allclose(out, dense_moe(*args_of(tokens, params), drop=drop), rtol=RTOL, atol=ATOL)


def test_pad_tokens_take_no_capacity_and_leave_real_outputs_unchanged():
    params = skewed(make_params())
    residual, normed, _ = skewed_tokens(64)
    mask = jnp.tile(jnp.arange(8) < 4, 8)  # half of every device's tokens are pads
    # On 2x4 both skewed experts live on the first expert shard. Capacity ceil(2 * 8 * 2 / 4) = 8 slots per
    # device pair = exactly the real tokens' assignments: any pad taking a slot would force a drop.
    factor = 2.0
    noise = jnp.abs(jax.random.normal(jax.random.key(9), residual.shape)) * 5
    with jax.set_mesh(make_mesh((2, 4))):
        run = jax.jit(functools.partial(ep_moe, capacity_factor=factor))
        out, dropped = run(residual, normed, mask, *args_of((), params))
        noisy, noisy_dropped = run(jnp.where(mask[:, None], residual, noise), jnp.where(mask[:, None], normed, noise),
                                   mask, *args_of((), params))
        _, unmasked_dropped = run(residual, normed, None, *args_of((), params))
    assert int(dropped) == int(noisy_dropped) == 0
    assert int(unmasked_dropped) == 8 * 8  # the same capacity overflows once the pads are routed
    real = np.asarray(mask)
    np.testing.assert_allclose(out[real], dense_moe(residual, normed, None, *args_of((), params))[real], rtol=RTOL,
                               atol=ATOL)
    np.testing.assert_array_equal(np.asarray(out)[real], np.asarray(noisy)[real])
    assert np.all(np.asarray(out)[~real] == 0)


# --------------------------------------------------------------------------------------------- the NNX module
def _moe_module(impl, capacity_factor=None, lora=False):
    module = moe.MoE(hidden_size=DIM, num_experts=EXPERTS, top_k=TOP_K, expert_dim=EXPERT_DIM, eps=1e-6, std=0.3,
                     param_dtype=jnp.float32, impl=impl, capacity_factor=capacity_factor, rngs=nnx.Rngs(0))
    module.router_scale.set_value(1.0 + 0.3 * jax.random.normal(jax.random.key(7), (DIM,)))
    if lora:
        for name in ("gate_up_proj", "down_proj"):
            adapter = LoRA(getattr(module, name).shape, batch_dims=1, in_dims=1, rank=4, alpha=8.0, rngs=nnx.Rngs(1))
            adapter.b.set_value(0.1 * jax.random.normal(jax.random.key(8), adapter.b.shape))
            setattr(module, f"{name}_lora", adapter)
    return module


def test_module_with_expert_lora_sharded_on_expert_axis_matches_dense():
    residual, normed, mask = make_tokens(48, pad_fraction=0.2)
    shape = (2, 24, DIM)
    call = nnx.jit(lambda m, *a: m(*a))
    expected = call(_moe_module("dense", lora=True), residual.reshape(shape), normed.reshape(shape),
                    mask.reshape(shape[:2]))
    mesh = make_mesh((2, 4))
    parallel = sharding.shard_model(_moe_module("expert_parallel", lora=True), mesh)
    assert parallel.gate_up_proj_lora.a.get_value().sharding.spec == P("expert", "data")
    assert parallel.gate_up_proj_lora.b.get_value().sharding.spec == P("expert")
    assert parallel.down_proj_lora.b.get_value().sharding.spec == P("expert", None, "data")
    with jax.set_mesh(mesh):
        out = call(parallel, residual.reshape(shape), normed.reshape(shape), mask.reshape(shape[:2]))
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)


def test_expert_parallel_needs_a_mesh_and_grouped_does_not():
    shape = jax.ShapeDtypeStruct((1, 8, DIM), jnp.float32)
    assert jax.eval_shape(lambda m, x: m(x, x), _moe_module("grouped"), shape).shape == shape.shape
    with pytest.raises(ValueError, match="needs a mesh with an 'expert' axis"):
        jax.eval_shape(lambda m, x: m(x, x), _moe_module("expert_parallel"), shape)


def test_experts_must_divide_over_the_expert_axis():
    args = jax.eval_shape(lambda: args_of(make_tokens(8), make_params(experts=6)))
    with jax.set_mesh(make_mesh((2, 4))), pytest.raises(ValueError, match="6 experts cannot be split"):
        jax.eval_shape(ep_moe, *args)


def test_capacity_factor_config_validation():
    assert ModelConfig.tiny(moe_impl="expert_parallel", moe_capacity_factor=1.25).moe_capacity_factor == 1.25
    with pytest.raises(ConfigError, match="moe_capacity_factor must be a positive"):
        ModelConfig.tiny(moe_impl="expert_parallel", moe_capacity_factor=0.0)
    with pytest.raises(ConfigError, match="applies only to moe_impl 'expert_parallel'"):
        ModelConfig.tiny(moe_impl="grouped", moe_capacity_factor=2.0)


# ------------------------------------------------------------------------------------------ ragged (GPU / TPU)
def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
    """`jax.lax.ragged_all_to_all` built from all_gather + scatter (runs on CPU; for testing the offsets)."""
    del recv_sizes  # implied by the senders' sizes
    me = jax.lax.axis_index(axis_name)
    operands = jax.lax.all_gather(operand, axis_name)
    starts, sizes, targets = (jax.lax.all_gather(a, axis_name)[:, me]
                              for a in (input_offsets, send_sizes, output_offsets))
    rows = jnp.arange(operand.shape[0])
    for source in range(operands.shape[0]):
        inside = (rows >= starts[source]) & (rows < starts[source] + sizes[source])
        index = jnp.where(inside, targets[source] + rows - starts[source], output.shape[0])
        output = output.at[index].set(operands[source], mode="drop")
    return output


def test_ragged_dispatch_algorithm_with_emulated_collective(monkeypatch):
    """2x4: two local experts per device, so received rows need their per-source, per-expert regrouping."""
    monkeypatch.setattr(expert_parallel, "ragged_all_to_all", emulated_ragged_all_to_all)
    args = args_of(make_tokens(40, seed=7, pad_fraction=0.2), make_params(seed=6))
    expected = with_gradients(dense_moe)(*args)
    with jax.set_mesh(make_mesh((2, 4))):
        result = with_gradients(functools.partial(ep_moe, dispatch="ragged"))(*args)
    assert_matches(result, expected)


def test_ragged_dispatch_lowers_with_the_real_collective():
    """The real `ragged_all_to_all` is lowered, forward and backward. Compiling it needs a GPU/TPU (see the next
    test): XLA:CPU answers 'HLO opcode ragged-all-to-all is not supported by XLA:CPU'."""
    args = args_of(make_tokens(40), make_params())
    run = functools.partial(ep_moe, dispatch="ragged")
    with jax.set_mesh(make_mesh((2, 4))):
        forward = jax.jit(run).lower(*args).as_text()
        backward = with_gradients(run, argnums=(1, 6)).lower(*args).as_text()
    assert forward.count("ragged_all_to_all") == 2  # dispatch and return
    assert backward.count("ragged_all_to_all") >= 2  # the transposed exchanges


@pytest.mark.skipif(jax.default_backend() == "cpu", reason="XLA:CPU cannot compile ragged_all_to_all; the "
                    "dispatch algorithm is checked on CPU with an emulated collective instead")
def test_ragged_dispatch_runs_on_accelerator():
    args = args_of(make_tokens(40), make_params())
    with jax.set_mesh(make_mesh((2, 4))):
        out, _ = jax.jit(functools.partial(ep_moe, dispatch="ragged"))(*args)
    np.testing.assert_allclose(out, dense_moe(*args), rtol=RTOL, atol=ATOL)
