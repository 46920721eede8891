"""experiments/sudoku/download_sets.py against a local mirror: the public sets kept beside the checkout
(`../shared/benchmarks/sudoku`, as in CI) served as file://, plus the conversion of a publisher's list."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_SETS = os.path.abspath(os.path.join(REPO, "..", "shared", "benchmarks", "sudoku"))
needs_sets = pytest.mark.skipif(
    not os.path.isdir(SHARED_SETS),
    reason=f"no local copy of the public Sudoku sets at {SHARED_SETS} to serve as a file:// mirror")


def load_script():
    spec = importlib.util.spec_from_file_location(
        "sudoku_download_sets_script", os.path.join(REPO, "experiments", "sudoku", "download_sets.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def script():
    return load_script()


@needs_sets
def test_every_set_from_a_mirror_matches_its_checksums(script, tmp_path, capsys):
    dest = tmp_path / "sets"
    assert script.main(["download_sets", f"--dest={dest}", f"--base_url=file://{SHARED_SETS}"]) == 0
    manifest = script.load_manifest()
    expected = {name for spec in manifest.values() for name in spec["files"]}
    assert set(os.listdir(dest)) == expected  # no temporary file left behind
    for spec in manifest.values():
        for name, digest in spec["files"].items():
            assert sha256(dest / name) == digest == sha256(os.path.join(SHARED_SETS, name)), name
    capsys.readouterr()

    # Again: the files are there with the right content, nothing to do; with other content, refused.
    assert script.main(["download_sets", f"--dest={dest}", f"--base_url=file://{SHARED_SETS}",
                        "--sets=norvig_hardest11"]) == 0
    assert "norvig_hardest11: already in" in capsys.readouterr().out
    edited = dest / "norvig_top95_solutions.txt"
    edited.write_text("mine\n")
    argv = ["download_sets", f"--dest={dest}", f"--base_url=file://{SHARED_SETS}"]
    assert script.main(argv) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"download_sets: error: {edited} already exists with other content; pass --overwrite to replace it"]
    assert edited.read_text() == "mine\n"
    assert script.main(argv + ["--sets=norvig_top95", "--overwrite"]) == 0
    assert sha256(edited) == manifest["norvig_top95"]["files"]["norvig_top95_solutions.txt"]


@needs_sets
def test_a_tampered_mirror_file_writes_nothing_of_its_set(script, tmp_path, capsys):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name in ("norvig_hardest11.txt", "norvig_hardest11_solutions.txt"):
        shutil.copy(os.path.join(SHARED_SETS, name), mirror / name)
    tampered = mirror / "norvig_hardest11_solutions.txt"
    text = tampered.read_text()
    tampered.write_text(("2" if text[0] == "1" else "1") + text[1:])
    dest = tmp_path / "sets"
    code = script.main(["download_sets", f"--dest={dest}", f"--base_url=file://{mirror}", "--sets=norvig_hardest11"])
    (line,) = capsys.readouterr().err.splitlines()
    assert code == 1 and line.startswith(
        f"download_sets: error: norvig_hardest11: norvig_hardest11_solutions.txt from file://{mirror}/"
        "norvig_hardest11_solutions.txt has sha256 ")
    assert "nothing of norvig_hardest11 was written" in line and os.listdir(dest) == []
    assert script.main(["download_sets", f"--dest={dest}", f"--base_url=file://{tmp_path / 'nowhere'}",
                        "--sets=norvig_top95"]) == 1
    assert "norvig_top95: cannot download file://" in capsys.readouterr().err


def test_unknown_sets_and_sets_that_need_a_mirror_are_usage_errors(script, tmp_path, capsys):
    dest = tmp_path / "sets"
    assert script.main(["download_sets", f"--dest={dest}", "--sets=norvig_top96"]) == 2
    assert "unknown set 'norvig_top96' (did you mean norvig_top95?)" in capsys.readouterr().err
    assert script.main(["download_sets", f"--dest={dest}", "--sets=norvig_top95,royle17_500"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("download_sets: usage error: royle17_500: sampled / generated") and "--base_url" in line
    assert script.main(["download_sets", f"--dest={dest}", "--base_url=ftp://x"]) == 2
    assert script.main(["download_sets", "--sets=norvig_top95"]) == 2
    assert "--dest=DIR is required" in capsys.readouterr().err
    assert not dest.exists()  # nothing fetched, nothing created


@needs_sets
@pytest.mark.parametrize("name", ["norvig_easy50", "norvig_hardest11"])
def test_a_publishers_list_converts_to_the_recorded_files(script, tmp_path, name):
    """The publisher path without the network: the list rewritten as publishers write them ('0' blanks, CRLF,
    blank lines between puzzles) is served from file:// with its own checksum in place of the recorded one."""
    with open(os.path.join(SHARED_SETS, f"{name}.txt")) as f:
        puzzles = f.read().split()
    upstream = tmp_path / "list.txt"
    upstream.write_bytes("".join(p.replace(".", "0") + "\r\n\r\n" for p in puzzles).encode())
    spec = dict(script.load_manifest()[name], upstream=dict(url=f"file://{upstream}", sha256=sha256(upstream)))
    files = script.set_files(name, spec, base_url=None)
    for file_name, data in files.items():
        assert hashlib.sha256(data).hexdigest() == spec["files"][file_name], file_name
    with pytest.raises(script.ChecksumError, match=rf"{name}: list.txt from file://.* has sha256 "):
        script.set_files(name, dict(spec, upstream=dict(spec["upstream"], sha256="0" * 64)), base_url=None)


def test_the_manifest_names_two_files_per_set_and_pins_upstream_lists(script):
    manifest = script.load_manifest()
    assert len(manifest) == 8
    for name, spec in manifest.items():
        assert set(spec["files"]) == {f"{name}.txt", f"{name}_solutions.txt"}
        assert all(len(digest) == 64 for digest in spec["files"].values())
        if "upstream" in spec:  # a commit-pinned raw URL: its bytes cannot change under the recorded sha256
            assert spec["upstream"]["url"].startswith("https://raw.githubusercontent.com/")
            assert len(spec["upstream"]["url"].split("/")[5]) == 40
    assert [n for n, s in manifest.items() if "upstream" in s] == [
        "norvig_easy50", "norvig_top95", "norvig_hardest11", "magictour_top1465"]
