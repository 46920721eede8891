"""The whole model on a 2x4 ('data', 'expert') mesh of 8 fake CPU devices with the expert-parallel MoE.

- Forward and backward (encode with pads + decode) equal the single-device 'grouped' model: outputs and the
  gradient of every parameter (fp32, rtol 1e-5).
- With a capacity factor, every encode/decode pass reports its per-layer dropped-assignment counts.
- Reference parity: transformers' DiffusionGemma, loaded with `load_hf`, placed on the mesh with
  `sharding.shard_model`, run under `jax.set_mesh` with 'expert_parallel' dispatch, through the parity harness
  of tests/test_parity_hf.py (`assert_parity`: within a multiple of the fp32 reference's own float64 error).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion_gemma import sharding
from diffusion_gemma.checkpoints.hf import load_hf
from diffusion_gemma.config import FULL, SLIDING, ModelConfig
from diffusion_gemma.model import expert_parallel
from diffusion_gemma.model.transformer import MOE_DROPPED_ASSIGNMENTS, DiffusionGemma

RTOL = ATOL = 1e-5
MESH = (2, 4)
# Two stacked repeats of one layer: the expert-parallel MoE runs inside the layer scan. (Each extra layer type
# adds a scan slot and ~50% to the CPU compile time of the backward pass.)
CONFIG = ModelConfig.tiny(num_layers=2, layer_types=(FULL, FULL))


def make_mesh(shape=MESH):
    return sharding.make_mesh(sharding.MeshConfig(data=shape[0], expert=shape[1]))


def with_impl(model: DiffusionGemma, **config_changes) -> DiffusionGemma:
    """A copy of `model` (same parameter values) whose config differs, e.g. in `moe_impl`."""
    config = model.config.replace(**config_changes)
    twin = nnx.eval_shape(lambda: DiffusionGemma(config, rngs=nnx.Rngs(0)))
    nnx.update(twin, nnx.state(model))
    return twin


def inputs(batch=8, prompt=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CONFIG.vocab_size, (batch, prompt)).astype(np.int32)
    canvas = rng.integers(0, CONFIG.vocab_size, (batch, CONFIG.canvas_length)).astype(np.int32)
    lengths = rng.integers(3, prompt + 1, batch)
    padding = np.arange(prompt)[None, :] < lengths[:, None]
    return ids, padding, canvas


def loss_and_outputs(model, ids, padding, canvas):
    cache, hidden = model.encode(ids, padding_mask=padding)
    logits = model.decode(canvas, cache)
    real = padding[..., None].astype(hidden.dtype)
    loss = jnp.mean(jnp.sin(logits)) + jnp.mean(jnp.cos(hidden) * real)
    return loss, (logits, hidden * real)


def test_forward_and_backward_on_mesh_equal_single_device():
    single = DiffusionGemma(CONFIG.replace(moe_impl="dense"), rngs=nnx.Rngs(0))
    batch = inputs()
    step = nnx.jit(nnx.value_and_grad(loss_and_outputs, has_aux=True))
    (loss, (logits, hidden)), grads = step(single, *batch)

    mesh = make_mesh()
    parallel = sharding.shard_model(with_impl(single, moe_impl="expert_parallel"), mesh)
    with jax.set_mesh(mesh):
        (mesh_loss, (mesh_logits, mesh_hidden)), mesh_grads = step(parallel, *sharding.shard_batch(batch, mesh))
    np.testing.assert_allclose(mesh_loss, loss, rtol=RTOL)
    np.testing.assert_allclose(mesh_logits, logits, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(mesh_hidden, hidden, rtol=RTOL, atol=ATOL)
    # Gradients sum over every token in a different order on the mesh: elementwise within rtol, or within
    # 1e-4 of the parameter's largest gradient entry.
    expected = dict(nnx.to_flat_state(grads))
    moe_gradients = 0
    for path, grad in nnx.to_flat_state(mesh_grads):
        scale = float(np.abs(expected[path].get_value()).max())
        np.testing.assert_allclose(grad.get_value(), expected[path].get_value(), rtol=RTOL, atol=1e-4 * scale,
                                   err_msg="/".join(map(str, path)))
        moe_gradients += "moe" in path and scale > 0
    assert moe_gradients == 5  # router proj/scale, per-expert scale, gate_up, down


def test_capacity_factor_reports_dropped_assignments_per_layer():
    mesh = make_mesh()
    model = sharding.shard_model(with_impl(DiffusionGemma(CONFIG, rngs=nnx.Rngs(0)), moe_impl="expert_parallel",
                                           moe_capacity_factor=0.25), mesh)
    ids, padding, canvas = sharding.shard_batch(inputs(), mesh)
    forward = nnx.jit(nnx.capture(lambda m, ids, canvas, mask: m(ids, canvas, attention_mask=mask),
                                  nnx.Intermediate))
    with jax.set_mesh(mesh):
        logits, intermediates = forward(model, ids, canvas, padding)
    encode_drops, decode_drops = intermediates[MOE_DROPPED_ASSIGNMENTS]  # one [num_layers] array per pass
    assert np.isfinite(np.asarray(logits)).all()
    for drops in (encode_drops, decode_drops):
        assert drops.shape == (CONFIG.num_layers,) and drops.dtype == jnp.int32
        assert np.all(np.asarray(drops) > 0)
    # Decode: 16 canvas tokens per device, k = 2; each of the 4 expert shards keeps `capacity` of a device's.
    local_tokens, shards = 8 * CONFIG.canvas_length // 8, MESH[1]
    capacity = expert_parallel.expert_capacity(local_tokens, CONFIG.top_k, CONFIG.num_experts // shards, shards, 0.25)
    assert np.all(np.asarray(decode_drops) >= 8 * (local_tokens * CONFIG.top_k - shards * capacity))


# ---------------------------------------------------------------------------------------- reference parity
pytest.importorskip("torch", reason="reference-parity dependency (pip install -e .[dev])")
pytest.importorskip("transformers", reason="reference-parity dependency (pip install -e .[dev])")

from hf_reference import make_reference  # noqa: E402
from test_parity_hf import BATCH, CANVAS, VOCAB, Decode, Encode, Forward, JitRunner, assert_parity  # noqa: E402


class MeshRunner(JitRunner):
    """`JitRunner` with the parameters placed on `mesh` (`sharding.shard_model`), inputs batch-sharded and
    every call traced under `jax.set_mesh(mesh)`."""

    def __init__(self, model, mesh):
        super().__init__(sharding.shard_model(model, mesh))
        self.mesh = mesh
        self.name = f"mesh {'x'.join(map(str, mesh.shape.values()))} {model.config.moe_impl}"

    def _place(self, x):
        return None if x is None else sharding.shard_batch(np.asarray(x), self.mesh)

    def forward(self, input_ids, decoder_input_ids, **kwargs):
        with jax.set_mesh(self.mesh):
            return super().forward(self._place(input_ids), self._place(decoder_input_ids),
                                   **{k: self._place(v) for k, v in kwargs.items()})

    def init_cache(self, batch, length):
        return jax.device_put(super().init_cache(batch, length), NamedSharding(self.mesh, P()))

    def encode(self, input_ids, cache):
        with jax.set_mesh(self.mesh):
            return super().encode(self._place(input_ids), cache)

    def decode(self, canvas_ids, cache, *, self_conditioning_logits=None, self_conditioning_mask=None):
        with jax.set_mesh(self.mesh):
            return super().decode(self._place(canvas_ids), cache,
                                  self_conditioning_logits=self._place(self_conditioning_logits),
                                  self_conditioning_mask=self._place(self_conditioning_mask))


@pytest.fixture(scope="module")
def mesh_setup(tmp_path_factory):
    # A sliding and a full layer; 8 experts, divisible by the 4 'expert' shards.
    reference, hf_dir = make_reference(str(tmp_path_factory.mktemp("hf_mesh")), seed=11, layers=2,
                                       layer_types=[SLIDING, FULL], num_experts=8, top_k=2)
    model = load_hf(hf_dir, moe_impl="expert_parallel")
    return reference, MeshRunner(model, make_mesh())


def test_reference_parity_forward_with_padding_and_self_conditioning_on_mesh(mesh_setup):
    reference, runner = mesh_setup
    rng = np.random.default_rng(21)
    mask = np.ones((BATCH, 12), np.int32)
    mask[1, :7] = 0  # left padding: pad tokens are kept out of the MoE, real outputs must not move
    scenario = Forward(rng.integers(0, VOCAB, (BATCH, 12)).astype(np.int32),
                       rng.integers(0, VOCAB, (BATCH, CANVAS)).astype(np.int32), attention_mask=mask,
                       self_conditioning_logits=(3 * rng.standard_normal((BATCH, CANVAS, VOCAB))).astype(np.float32),
                       self_conditioning_mask=np.array([True, False]))
    assert_parity(runner, reference, scenario, label="2x4 expert_parallel forward")


def test_reference_parity_encode_then_decode_on_mesh(mesh_setup):
    reference, runner = mesh_setup
    rng = np.random.default_rng(22)
    # Two chunks of the same size (one encode compile) on a cache sharded with the model's mesh.
    steps = [Encode(rng.integers(0, VOCAB, (BATCH, CANVAS)).astype(np.int32)),
             Encode(rng.integers(0, VOCAB, (BATCH, CANVAS)).astype(np.int32)),
             Decode(rng.integers(0, VOCAB, (BATCH, CANVAS)).astype(np.int32))]
    assert_parity(runner, reference, steps, label="2x4 expert_parallel chunked encode + decode")
