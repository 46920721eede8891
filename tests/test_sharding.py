"""Meshes, the logical-axis rules table, born-sharded initialisation and batch sharding on 8 fake CPU devices."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion_gemma import sharding
from diffusion_gemma.config import FULL, SLIDING, ModelConfig
from diffusion_gemma.model.lora import LoRA
from diffusion_gemma.model.moe import MoE
from diffusion_gemma.model.transformer import DiffusionGemma

MESHES = [(1, 8), (2, 4), (8, 1)]
# Two repeats of a (sliding, full) pattern: stacked parameters with a leading 'layers' axis of size 2.
CONFIG = ModelConfig.tiny(num_layers=4, layer_types=(SLIDING, FULL, SLIDING, FULL))


def make_mesh(shape):
    return sharding.make_mesh(sharding.MeshConfig(data=shape[0], expert=shape[1]))


def abstract_model(config=CONFIG):
    return nnx.eval_shape(lambda: DiffusionGemma(config, rngs=nnx.Rngs(0)))


# ------------------------------------------------------------------------------------------------------ meshes
@pytest.mark.parametrize("shape", MESHES)
def test_mesh_from_config(shape):
    mesh = make_mesh(shape)
    assert mesh.axis_names == ("data", "expert")
    assert tuple(mesh.shape.values()) == shape
    assert all(t == AxisType.Auto for t in mesh.axis_types)  # the project's one sharding mode


def test_mesh_config_fills_one_axis_and_rejects_bad_shapes():
    assert sharding.MeshConfig().shape(8) == (1, 8)
    assert sharding.MeshConfig(data=2).shape(8) == (2, 4)
    assert sharding.MeshConfig(data=-1, expert=1).shape(8) == (8, 1)
    for bad, message in [(dict(data=3), "not divisible"), (dict(data=2, expert=2), "needs 4 devices"),
                         (dict(data=-1, expert=-1), "at most one"), (dict(data=0, expert=8), "positive")]:
        with pytest.raises(sharding.ShardingError, match=message):
            sharding.MeshConfig(**bad).shape(8)


# ------------------------------------------------------------------------------------------------------- rules
def test_every_parameter_has_logical_axes_covered_by_the_rules_table():
    model = abstract_model()
    axes = sharding.logical_axes(model)
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    assert set(axes) == set(flat)
    table = dict(sharding.LOGICAL_AXIS_RULES)
    for path, names in axes.items():
        assert len(names) == len(flat[path].shape), path
        assert all(name is None or name in table for name in names), (path, names)
        if path[0] == "blocks":
            assert names[0] == "layers", path


def _spec(*axes) -> P:
    """The canonical PartitionSpec (trailing unsharded dims dropped), which is what the rules produce."""
    axes = list(axes)
    while axes and axes[-1] is None:
        axes.pop()
    return P(*axes)


@pytest.mark.parametrize("shape", MESHES)
def test_rules_table_places_experts_on_expert_and_the_rest_fsdp(shape):
    mesh = make_mesh(shape)
    specs = {path: s.get_value().spec
             for path, s in nnx.to_flat_state(sharding.state_shardings(abstract_model(), mesh))}
    expert = "expert" if shape[1] > 1 else None
    free = tuple(a for a, n in zip(("data", "expert"), shape) if n > 1)  # axes FSDP may use
    free = free[0] if len(free) == 1 else free
    moe = ("blocks", 0, "moe")
    assert specs[moe + ("gate_up_proj",)] == _spec(None, expert, "data" if shape[0] > 1 else None, None)
    assert specs[moe + ("down_proj",)] == _spec(None, expert, None, "data" if shape[0] > 1 else None)
    assert specs[moe + ("router_proj",)] == _spec(None, free, None)
    assert specs[moe + ("per_expert_scale",)] == _spec(None, None)
    assert specs[("blocks", 1, "attn", "q_proj")] == _spec(None, free, None, None)
    assert specs[("blocks", 0, "mlp", "down_proj")] == _spec(None, None, free)
    assert specs[("embedder", "embedding")] == _spec(free, None)  # vocab-parallel embedding / tied head
    assert specs[("final_norm", "weight")] == _spec(None)
    assert specs[("blocks", 0, "decoder_layer_scalar")] == _spec(None, None)


def test_logical_to_spec_resolution():
    mesh = make_mesh((2, 4))
    # 'expert' is resolved first whatever the dim order; 'embed' then takes the axes left.
    assert sharding.logical_to_spec(("embed", "expert"), (64, 8), mesh) == P("data", "expert")
    assert sharding.logical_to_spec(("embed",), (64,), mesh) == P(("data", "expert"))
    assert sharding.logical_to_spec(("embed",), (6,), mesh) == P("data")  # 8 does not divide 6; 2 does
    assert sharding.logical_to_spec(("embed",), (5,), mesh) == _spec(None)
    assert sharding.logical_to_spec((None, "norm"), (3, 64), mesh) == _spec(None, None)
    with pytest.raises(sharding.ShardingError, match="no entry in the sharding rules table"):
        sharding.logical_to_spec(("typo",), (8,), mesh)


def test_lora_adapters_inherit_their_kernels_axes():
    def make():
        model = DiffusionGemma(CONFIG, rngs=nnx.Rngs(0))
        moe = model.blocks[0].moe
        moe.gate_up_proj_lora = LoRA(moe.gate_up_proj.shape, batch_dims=2, in_dims=1, rank=4, alpha=4.0,
                                     rngs=nnx.Rngs(1))
        attn = model.blocks[1].attn
        attn.q_proj_lora = LoRA(attn.q_proj.shape, batch_dims=1, in_dims=1, rank=4, alpha=4.0, rngs=nnx.Rngs(2))
        return model

    model = nnx.eval_shape(make)
    axes = sharding.logical_axes(model)
    lora = ("blocks", 0, "moe", "gate_up_proj_lora")
    assert axes[lora + ("a",)] == ("layers", "expert", "embed", "lora_rank")
    assert axes[lora + ("b",)] == ("layers", "expert", "lora_rank", "expert_mlp")
    assert axes[("blocks", 1, "attn", "q_proj_lora", "a")] == ("layers", "embed", "lora_rank")
    assert axes[("blocks", 1, "attn", "q_proj_lora", "b")] == ("layers", "lora_rank", "heads", "head_dim")
    specs = dict(nnx.to_flat_state(sharding.state_shardings(model, make_mesh((2, 4)))))
    assert specs[lora + ("a",)].get_value().spec == _spec(None, "expert", "data", None)
    assert specs[lora + ("b",)].get_value().spec == _spec(None, "expert", None, None)


# ---------------------------------------------------------------------------------------------- born sharded
def test_initialisation_is_born_sharded():
    mesh = make_mesh((2, 4))
    # One scan slot (compile time) stacked over two repeats.
    make = lambda: DiffusionGemma(ModelConfig.tiny(num_layers=2, layer_types=(FULL, FULL)),  # noqa: E731
                                  rngs=nnx.Rngs(0))
    graphdef, create = sharding.sharded_initializer(make, mesh)  # what init_sharded runs
    compiled = create.lower().compile()
    model = nnx.merge(graphdef, compiled())
    expected = dict(nnx.to_flat_state(sharding.state_shardings(model, mesh)))
    reference = dict(nnx.to_flat_state(nnx.state(make())))
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        value = variable.get_value()
        assert value.sharding.is_equivalent_to(expected[path].get_value(), value.ndim), path
        np.testing.assert_allclose(value, reference[path].get_value(), rtol=1e-6, atol=1e-7, err_msg=str(path))
    # Per device, the compiled initialisation's outputs plus scratch stay far below one whole copy.
    stats = compiled.memory_analysis()
    whole = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))
    assert stats.output_size_in_bytes + stats.temp_size_in_bytes < whole / 2


def test_init_sharded_builds_the_module_in_place():
    mesh = make_mesh((2, 4))
    layer = sharding.init_sharded(lambda: MoE(hidden_size=16, num_experts=8, top_k=2, expert_dim=8, eps=1e-6,
                                              std=0.02, param_dtype=jnp.float32, impl="expert_parallel",
                                              rngs=nnx.Rngs(0)), mesh)
    assert isinstance(layer, MoE) and layer.impl == "expert_parallel"
    assert layer.gate_up_proj.get_value().sharding.spec == _spec("expert", "data", None)
    assert layer.gate_up_proj.get_value().addressable_shards[0].data.shape == (2, 8, 16)


# ------------------------------------------------------------------------------------------------------ batches
def test_batch_sharding_helpers():
    mesh = make_mesh((2, 4))
    assert sharding.batch_spec(mesh, (8, 5)) == P(("data", "expert"))
    assert sharding.batch_spec(mesh, (2, 5)) == P("data")
    assert sharding.batch_spec(mesh, (3, 5)) == P(None)
    assert sharding.batch_spec(mesh, ()) == P()
    batch = sharding.shard_batch({"ids": np.zeros((8, 5), np.int32), "step": np.int32(3)}, mesh)
    assert batch["ids"].sharding == NamedSharding(mesh, P(("data", "expert")))
    assert batch["step"].sharding.is_fully_replicated

    x = jnp.ones((8, 4))
    assert sharding.constrain_batch(x) is x  # no ambient mesh: a no-op
    with jax.set_mesh(mesh):
        y = jax.jit(lambda v: sharding.constrain_batch(v * 2))(x)
    assert y.sharding.spec == P(("data", "expert"))
