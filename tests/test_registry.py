"""Tasks plug into the core through `diffusion_gemma.registry`: a data source, an evaluator and a model preset
registered by a package the core never imports, found by name; unknown names and task options fail with the
valid ones listed."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from diffusion_gemma import registry
from diffusion_gemma.data.chat import pack_example
from diffusion_gemma.data.pipeline import DataConfig, make_dataset, make_source
from diffusion_gemma.training.config import ModelSection, TrainConfigError, from_config_dict
from diffusion_gemma.training.evaluation import EvaluationConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A task written as a user would: its own package, outside diffusion_gemma, announced through the
# `diffusion_gemma.tasks` entry-point group of an installed distribution.
TOY_TASK = '''
import dataclasses

import numpy as np

from diffusion_gemma import registry
from diffusion_gemma.config import ModelConfig
from diffusion_gemma.data.chat import pack_example


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
    length: int = 3


class Countdown:
    """Prompt <bos> n, answer n-1 ... 1 (ids offset by 3)."""

    def __init__(self, config, options):
        self.config, self.options = config, options

    def __len__(self):
        return self.config.num_synthetic_examples

    def __getitem__(self, index):
        start = 3 + index % 5 + self.options.length
        return pack_example([2, start], list(range(start - 1, start - 1 - self.options.length, -1)), eos_id=1,
                            pad_id=0, seq_length=self.config.seq_length, block_size=self.config.block_size)


def build(config, tokenizer):
    return Countdown(config, Options(**dict(config.options)))


registry.DATA_SOURCES.register("countdown", registry.DataSource(
    build=build, check=lambda options, where: registry.check_options(options, Options, where=where)))
registry.MODEL_PRESETS.register("countdown_tiny", lambda **overrides: ModelConfig.tiny(**{"vocab_size": 32,
                                                                                          **overrides}))
'''


def _run_python(script: str, env: dict | None = None) -> str:
    """stdout of `script` in a fresh interpreter (nothing imported yet) that must succeed."""
    env = env or dict(os.environ, PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _install_toy_task(root) -> dict:
    """A package plus a dist-info whose entry_points.txt names it, on PYTHONPATH: what `pip install` leaves."""
    (root / "countdown_task").mkdir()
    (root / "countdown_task" / "__init__.py").write_text(TOY_TASK)
    info = root / "countdown_task-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: countdown-task\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[diffusion_gemma.tasks]\ncountdown = countdown_task\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), REPO, os.environ.get("PYTHONPATH", "")]))


def test_an_installed_task_is_found_by_name_without_any_core_change(tmp_path):
    env = _install_toy_task(tmp_path)
    script = textwrap.dedent("""
        import json, sys
        from diffusion_gemma.data.pipeline import DataConfig, make_dataset, make_source
        from diffusion_gemma.training.config import ModelSection
        assert "countdown_task" not in sys.modules  # nothing loads a task until a name is missing
        config = DataConfig(source="countdown", seq_length=8, block_size=4, global_batch_size=2,
                            num_synthetic_examples=4, options={"length": 2})
        batch = next(iter(make_dataset(make_source(config), config, num_steps=1)))
        ModelSection(preset="countdown_tiny")
        print(json.dumps({"ids": batch["input_ids"][0].tolist(), "supervised": batch["supervised_mask"][0].tolist(),
                          "tasks": sorted(m for m in sys.modules if m.startswith("diffusion_gemma.tasks."))}))
    """)
    out = json.loads(_run_python(script, env).strip().splitlines()[-1])
    ids = out["ids"]
    assert ids[0] == 2 and ids[2:] == [ids[1] - 1, ids[1] - 2, 1, 1, 0, 0], ids  # countdown, EOS fill, pad
    assert out["supervised"] == [False, False, True, True, True, True, False, False]
    assert "diffusion_gemma.tasks.sudoku" in out["tasks"]  # the built-in tasks were loaded alongside


def test_the_core_loads_no_task_for_a_config_that_names_none():
    script = ("import sys\n"
              "from diffusion_gemma.training import trainer\n"
              "from diffusion_gemma.training.config import TrainConfig\n"
              "TrainConfig()\n"
              "print(sorted(m for m in sys.modules if m.startswith('diffusion_gemma.tasks')))\n")
    stdout = _run_python(script)
    assert stdout.strip() == "[]"


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(registry.RegistryError, match=r"data.source = 'sudokuu' is not a known data source; valid: "
                                                     r"\[.*'chat_jsonl'.*'sudoku'.*'synthetic'"):
        DataConfig(source="sudokuu")
    with pytest.raises(registry.RegistryError, match=r"evaluation.kind = 'sudoko'.*valid: \[.*'samples'.*'sudoku'"):
        EvaluationConfig(kind="sudoko")
    for preset in ("replace", "build", "from_json", "sudoku_large"):
        with pytest.raises(TrainConfigError, match=rf"model.preset = '{preset}' is not a known model preset; "
                                                   r"valid: \[.*'gemma4_26b_a4b'.*'sudoku_small'.*'tiny'\]"):
            ModelSection(preset=preset)


def test_task_options_are_checked_when_the_config_is_read():
    base = {"data": {"source": "sudoku", "seq_length": 163, "block_size": 81, "options": {"min_giv": 30}}}
    with pytest.raises(TrainConfigError, match=r"unknown key\(s\) \['data.options.min_giv'\]; valid keys of "
                                               r"'data.options': \[.*'format', 'max_givens', 'min_givens'"):
        from_config_dict(base)
    base["data"]["options"] = {"format": "emoji"}
    with pytest.raises(TrainConfigError, match=r"data.options: format = 'emoji'; expected one of"):
        from_config_dict(base)
    with pytest.raises(TrainConfigError, match=r"evaluation.options.givens"):
        from_config_dict({"evaluation": {"kind": "sudoku", "options": {"givens": 3}}})
    with pytest.raises(TrainConfigError, match=r"data.options takes no options, got \['min_givens'\]"):
        from_config_dict({"data": {"source": "synthetic", "options": {"min_givens": 3}}})


def test_a_registered_source_feeds_the_generic_pipeline():
    """What the trainer does with any source: look it up by name, build it, batch it."""

    @dataclasses.dataclass(frozen=True)
    class Twice:
        config: DataConfig

        def __len__(self):
            return 6

        def __getitem__(self, index):
            return pack_example([2, 3 + index], [3 + index, 3 + index], eos_id=1, pad_id=0,
                                seq_length=self.config.seq_length, block_size=self.config.block_size)

    registry.DATA_SOURCES.register("test_twice", registry.DataSource(build=lambda config, tokenizer: Twice(config)))
    config = DataConfig(source="test_twice", seq_length=6, block_size=2, global_batch_size=3, shuffle_seed=1)
    batches = list(make_dataset(make_source(config), config, num_steps=1))
    prompts = sorted(int(row[1]) for batch in batches for row in batch["input_ids"])
    assert len(batches) == 2 and prompts == sorted(set(prompts))  # every example once, no repeats within
    for batch in batches:
        ids = np.asarray(batch["input_ids"])
        np.testing.assert_array_equal(ids[:, 2], ids[:, 1])
        np.testing.assert_array_equal(ids[:, 3], ids[:, 1])
    with pytest.raises(registry.RegistryError, match="data source 'test_twice' is registered twice"):
        registry.DATA_SOURCES.register("test_twice", registry.DataSource(build=lambda config, tokenizer: None))


def test_the_registry_alone_lists_every_name():
    """A process that imports only the registry still sees the core's entries and the tasks'."""
    script = ("from diffusion_gemma import registry\n"
              "import json\n"
              "print(json.dumps([registry.DATA_SOURCES.names(), registry.EVALUATORS.names(),"
              " registry.MODEL_PRESETS.names()]))\n"
              "print(registry.MODEL_PRESETS.get('tiny')().num_layers)\n")
    stdout = _run_python(script)
    names, layers = stdout.strip().splitlines()
    sources, evaluators, presets = json.loads(names)
    assert {"chat_jsonl", "synthetic", "sudoku"} <= set(sources)
    assert {"samples", "sudoku"} <= set(evaluators)
    assert {"tiny", "gemma4_26b_a4b", "sudoku_small"} <= set(presets)
    assert layers == "7"
