"""`diffusion_gemma.atomic_write`: outputs (files and directories) appear whole or not at all, are never
replaced without `overwrite`, and are never one of the inputs."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from diffusion_gemma import atomic_write


def _leftovers(directory) -> list[str]:
    return [name for name in os.listdir(directory) if name.startswith(".")]


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def test_json_file_is_strict_refused_when_present_and_kept_on_failure(tmp_path, umask):
    path = str(tmp_path / "out.json")
    atomic_write.write_json(path, {"rate": float("nan"), "n": np.int64(3), "by": {25: 1.0}}, overwrite=False)
    assert json.load(open(path)) == {"rate": None, "n": 3, "by": {"25": 1.0}}
    assert _mode(path) == 0o666 & ~umask  # not mkstemp's private mode
    with pytest.raises(FileExistsError, match="out.json already exists; pass --overwrite"):
        atomic_write.write_json(path, {}, overwrite=False)
    with pytest.raises(RuntimeError):
        with atomic_write.atomic_path(path, overwrite=True) as tmp:
            assert tmp.endswith(".json") and os.path.dirname(tmp) == str(tmp_path)
            open(tmp, "w").write("partial")
            raise RuntimeError("crash while writing")
    assert json.load(open(path))["n"] == 3 and os.listdir(tmp_path) == ["out.json"]
    atomic_write.write_json(path, {"b": 1, "a": 2}, overwrite=True, sort_keys=True)
    assert open(path).read() == '{\n  "a": 2,\n  "b": 1\n}\n'


def test_file_output_that_is_a_directory_or_an_input_is_refused_before_work(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        atomic_write.check_new(str(tmp_path), overwrite=True)
    source = tmp_path / "prompts.jsonl"
    source.write_text("kept\n")
    with pytest.raises(ValueError, match="the output cannot be one of the inputs"):
        atomic_write.check_new(str(tmp_path / "." / "prompts.jsonl"), overwrite=True, inputs=[None, str(source)])
    assert source.read_text() == "kept\n"


def test_directory_appears_whole_replaces_only_with_overwrite(tmp_path, umask):
    output = tmp_path / "export"
    with atomic_write.atomic_directory(str(output), overwrite=False) as tmp:
        assert not output.exists()
        os.makedirs(os.path.join(tmp, "sub"))
        open(os.path.join(tmp, "sub", "a.txt"), "w").write("new")
    assert (output / "sub" / "a.txt").read_text() == "new" and _mode(output) == 0o777 & ~umask
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        with atomic_write.atomic_directory(str(output), overwrite=False):
            raise AssertionError("refused before the body runs")
    with atomic_write.atomic_directory(str(output), overwrite=True) as tmp:
        open(os.path.join(tmp, "b.txt"), "w").write("newer")
    assert sorted(os.listdir(output)) == ["b.txt"] and not _leftovers(tmp_path)


def test_directory_failure_leaves_the_old_output_and_no_temporary(tmp_path):
    output = tmp_path / "ckpt"
    output.mkdir()
    (output / "marker").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write.atomic_directory(str(output), overwrite=True) as tmp:
            open(os.path.join(tmp, "half"), "w").write("x")
            raise KeyboardInterrupt
    assert os.listdir(output) == ["marker"] and not _leftovers(tmp_path)
    with pytest.raises(ValueError, match="the output cannot be one of the inputs"):
        atomic_write.check_new(str(output), overwrite=True, inputs=[str(output)], directory=True)
    plain_file = tmp_path / "was_a_file"
    plain_file.write_text("x")
    with atomic_write.atomic_directory(str(plain_file), overwrite=True) as tmp:
        open(os.path.join(tmp, "c.txt"), "w").write("c")
    assert plain_file.is_dir() and not _leftovers(tmp_path)
