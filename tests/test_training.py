"""The SFT trainer end to end on a tiny model: learning, exact resume, LoRA/frozen-router updates, restore on
another mesh, and clear errors for bad input; and its pieces: the set-up's state (shardings, abstract form for
lowering), the step's gradient accumulation, the checkpoint tree."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion_gemma.checkpoints import orbax_io
from diffusion_gemma.data.chat import ChatFormatError
from diffusion_gemma import sharding
from diffusion_gemma.data import pipeline
from diffusion_gemma.data.pipeline import DataConfig
from diffusion_gemma.sharding import MeshConfig
from diffusion_gemma.training import checkpointing, setup, step
from diffusion_gemma.training.config import (CheckpointSection, LoraSection, ModelSection, TrainConfig,
                                             TrainConfigError, from_config_dict)
from diffusion_gemma.training.optimizer import OptimizerConfig
from diffusion_gemma.training.checkpointing import IncompatibleCheckpointError
from diffusion_gemma.training.trainer import TrainingError, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = {"num_layers": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "head_dim": 8,
              "num_kv_heads": 1, "global_head_dim": 16, "num_global_kv_heads": 1, "num_experts": 8, "top_k": 2,
              "moe_intermediate_size": 16, "vocab_size": 64, "sliding_window": 8, "canvas_length": 8}


def tiny_config(**changes) -> TrainConfig:
    config = TrainConfig(
        seed=0, num_steps=8, log_every=1,
        model=ModelSection(preset="tiny", overrides=TINY_MODEL),
        optimizer=OptimizerConfig(learning_rate=1e-2, end_learning_rate=1e-3, warmup_steps=2),
        data=DataConfig(source="synthetic", seq_length=24, block_size=8, global_batch_size=8,
                        num_synthetic_examples=64, synthetic_vocab_size=64),
        mesh=MeshConfig(data=2, expert=4),
        checkpoint=CheckpointSection(every_steps=4, keep=5, async_save=False))
    return dataclasses.replace(config, **changes)


def read_params(workdir, step):
    return orbax_io.flatten(orbax_io.restore_params(os.path.join(workdir, "checkpoints", str(step))))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    return workdir, train(tiny_config(), workdir, progress=False)


@pytest.mark.slow
def test_tiny_run_lowers_the_loss(uninterrupted):
    _, result = uninterrupted
    assert result.final_step == 8 and len(result.losses) == 8
    assert np.mean(result.losses[-3:]) < result.losses[0] - 0.5
    assert all(np.isfinite(result.losses))


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_losses_exactly(uninterrupted, tmp_path):
    _, full = uninterrupted
    workdir = str(tmp_path)
    first = train(tiny_config(), workdir, stop_after=3, progress=False)
    assert first.final_step == 3
    second = train(tiny_config(), workdir, progress=False)
    assert second.final_step == 8 and second.steps_run == 5
    np.testing.assert_array_equal(first.losses + second.losses, full.losses)


@pytest.mark.slow
def test_full_sft_keeps_the_router_and_trains_the_rest(uninterrupted):
    workdir, _ = uninterrupted
    before, after = read_params(workdir, 4), read_params(workdir, 8)
    for path, value in before.items():
        name = path[-1]
        if name in ("router_proj", "router_scale") or name.endswith("layer_scalar"):
            np.testing.assert_array_equal(after[path], value, err_msg="/".join(path))
    assert not np.array_equal(after[("blocks", "0", "attn", "q_proj")], before[("blocks", "0", "attn", "q_proj")])
    assert not np.array_equal(after[("blocks", "1", "moe", "gate_up_proj")],
                              before[("blocks", "1", "moe", "gate_up_proj")])


@pytest.mark.slow
def test_lora_run_changes_only_lora_parameters(tmp_path):
    workdir = str(tmp_path)
    config = tiny_config(num_steps=4, lora=LoraSection(enabled=True, rank=4, alpha=8.0),
                         checkpoint=CheckpointSection(every_steps=2, keep=5, async_save=False),
                         mesh=MeshConfig(data=1, expert=1))
    result = train(config, workdir, progress=False, devices=jax.devices()[:1])
    assert result.final_step == 4
    before, after = read_params(workdir, 2), read_params(workdir, 4)
    changed = {path for path in before if not np.array_equal(before[path], after[path])}
    assert changed, "LoRA parameters did not change"
    assert all(orbax_io.is_lora_path(path) for path in changed), sorted(changed)[:5]
    assert any(path[-1] == "b" for path in changed)
    lora_meta = json.load(open(os.path.join(workdir, "checkpoints", "lora.json")))
    assert "blocks/0/attn/q_proj_lora" in lora_meta


@pytest.mark.slow
def test_checkpoint_saved_on_8_devices_restores_on_4(uninterrupted, tmp_path):
    source, full = uninterrupted
    workdir = str(tmp_path)
    os.makedirs(os.path.join(workdir, "checkpoints"))
    for name in ("4", "model_config.json"):
        src = os.path.join(source, "checkpoints", name)
        dst = os.path.join(workdir, "checkpoints", name)
        (__import__("shutil").copytree if os.path.isdir(src) else __import__("shutil").copy)(src, dst)
    config = tiny_config(mesh=MeshConfig(data=1, expert=4))
    resumed = train(config, workdir, stop_after=1, progress=False, devices=jax.devices()[:4])
    assert resumed.final_step == 5
    np.testing.assert_allclose(resumed.losses[0], full.losses[4], rtol=1e-5)


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path)
    one_device = dict(mesh=MeshConfig(data=1, expert=1))
    train(tiny_config(num_steps=8, **one_device), workdir, stop_after=4, progress=False, devices=jax.devices()[:1])
    exploding = tiny_config(num_steps=8, optimizer=OptimizerConfig(learning_rate=1e30, warmup_steps=0,
                                                                   end_learning_rate=1e30), **one_device)
    with pytest.raises(TrainingError, match="non-finite loss .* last good checkpoint"):
        train(exploding, workdir, progress=False, devices=jax.devices()[:1])
    steps = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
    assert steps == [4]


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "chat.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    path.write_text(good + "\n" + good + "\n{not json\n")
    config = tiny_config(data=DataConfig(source="chat_jsonl", path=str(path),
                                         tokenizer=os.path.join(REPO, "configs", "data", "tiny_tokenizer.json"),
                                         seq_length=24, block_size=8, global_batch_size=8))
    with pytest.raises(ChatFormatError, match=r"chat.jsonl:3: invalid JSON"):
        train(config, str(tmp_path / "work"), progress=False)


def test_unknown_config_key_lists_the_valid_ones():
    with pytest.raises(TrainConfigError, match=r"optimizer\.learnig_rate.*learning_rate"):
        from_config_dict({"optimizer": {"learnig_rate": 1.0}})
    with pytest.raises(TrainConfigError, match=r"num_stepz.*num_steps"):
        from_config_dict({"num_stepz": 3})


@pytest.mark.slow
def test_incompatible_checkpoint_in_workdir_is_refused_untouched(uninterrupted, tmp_path):
    source, _ = uninterrupted
    workdir = str(tmp_path)
    __import__("shutil").copytree(os.path.join(source, "checkpoints"), os.path.join(workdir, "checkpoints"))
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    other = tiny_config(model=ModelSection(preset="tiny", overrides={**TINY_MODEL, "hidden_size": 48}))
    with pytest.raises(IncompatibleCheckpointError, match="different model"):
        train(other, workdir, progress=False)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_unwritable_workdir_fails_before_training(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("x")
    with pytest.raises(TrainingError, match="not writable"):
        train(tiny_config(), str(blocked / "sub"), progress=False)


def test_gsm8k_configs_convert_and_tiny_variants_use_bundled_data():
    from ml_collections import config_flags  # noqa: F401  (the CLI's loader)
    import importlib.util

    for name in ("gsm8k_sft", "gsm8k_lora"):
        spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        with pytest.raises(TrainConfigError, match="needs data.path and data.tokenizer"):
            from_config_dict(module.get_config())  # the user must say where the data is
        raw = module.get_config()
        raw.data.path, raw.data.tokenizer = "train.jsonl", "/ckpt"
        reference = from_config_dict(raw)
        assert reference.optimizer.learning_rate == 1.5e-4 and reference.optimizer.b1 == 0.95
        assert reference.optimizer.b2 == 0.99 and reference.optimizer.weight_decay == 1e-4
        assert reference.num_steps == 800 and reference.data.global_batch_size == 8
        assert reference.lora.enabled == (name == "gsm8k_lora")
        tiny = from_config_dict(module.get_config("tiny"))
        assert os.path.exists(tiny.data.path) and os.path.exists(tiny.data.tokenizer)


def test_checkpoint_tree_joins_the_state_parts_and_splits_them_back():
    from flax import nnx

    from diffusion_gemma.config import ModelConfig
    from diffusion_gemma.model.transformer import DiffusionGemma
    from diffusion_gemma.training.optimizer import trainable_filter

    model = DiffusionGemma(ModelConfig.tiny(**{k: v for k, v in TINY_MODEL.items()}), rngs=nnx.Rngs(0))
    _, trainable, rest = nnx.split(model, trainable_filter(lora=False), ...)
    tree = checkpointing.state_to_tree(trainable, rest)
    assert set(tree["blocks"]) == {"0", "1"}
    assert orbax_io.flatten(tree).keys() == orbax_io.flatten(checkpointing.state_to_tree(nnx.state(model))).keys()
    for part in (trainable, rest):
        back = checkpointing.tree_to_state(part, tree)
        assert len(nnx.to_flat_state(back)) == len(nnx.to_flat_state(part))
        for (path, a), (_, b) in zip(nnx.to_flat_state(part), nnx.to_flat_state(back)):
            assert type(a) is type(b), path
            np.testing.assert_array_equal(a.get_value(), b.get_value())


def _first_batch(config, mesh):
    rows = sharding.process_batch_rows(mesh, config.data.global_batch_size)
    source = pipeline.make_source(config.data, None)
    host = next(iter(pipeline.make_dataset(source, config.data, num_steps=1, rows=rows)))
    return step.global_batch(host, mesh, config.data.global_batch_size)


def test_the_state_is_born_sharded_and_its_abstract_form_lowers_the_step():
    """Adam's moments take their parameters' shardings; the abstract set-up (what benchmarks and ahead-of-time
    compiles use) has the concrete state's shapes and shardings, and the trainer's step lowers on it."""
    config = tiny_config()
    mesh = sharding.make_mesh(config.mesh)
    concrete, abstract = setup.build(config, mesh), setup.build(config, mesh, abstract=True)
    trainable = concrete.state.trainable
    assert any(leaf.sharding.spec != jax.sharding.PartitionSpec() for leaf in jax.tree.leaves(trainable))
    for moments in ("mu", "nu"):
        assert (jax.tree.map(lambda x: x.sharding.spec, optax.tree_utils.tree_get(concrete.state.opt_state, moments))
                == jax.tree.map(lambda x: x.sharding.spec, trainable))
    describe = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding.spec), tree)  # noqa: E731
    for part in ("trainable", "rest", "opt_state"):
        assert describe(getattr(abstract.state, part)) == describe(getattr(concrete.state, part)), part
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                         _first_batch(config, mesh))
    with jax.set_mesh(mesh):
        lowered = step.jit_train_step(abstract).lower(abstract.state.trainable, abstract.state.rest,
                                                      abstract.state.opt_state, batch, jax.random.key(0),
                                                      jax.ShapeDtypeStruct((), jnp.int32))
    assert "stablehlo" in lowered.as_text()[:10_000]


@pytest.mark.slow
def test_gradient_accumulation_gives_the_whole_batch_step():
    """The trainer's step with the global batch in two micro-batches: the same loss, metrics and update as in
    one piece."""
    results = []
    for accumulate in (1, 2):
        config = tiny_config(grad_accum_steps=accumulate, mesh=MeshConfig(data=1, expert=1))
        mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
        built = setup.build(config, mesh)
        with jax.set_mesh(mesh):
            out = step.jit_train_step(built)(built.state.trainable, built.state.rest, built.state.opt_state,
                                             _first_batch(config, mesh), jax.random.key(0),
                                             jnp.asarray(config.optimizer.warmup_steps, jnp.int32))
        results.append(jax.device_get((out[0], out[2])))
    (whole, whole_metrics), (accumulated, accumulated_metrics) = results
    assert whole_metrics.keys() == accumulated_metrics.keys()
    for name, value in whole_metrics.items():
        np.testing.assert_allclose(accumulated_metrics[name], value, rtol=1e-5, err_msg=name)
    assert whole_metrics["learning_rate"] > 0 and whole_metrics["grad_norm"] > 0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(whole), jax.tree.leaves(accumulated)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
