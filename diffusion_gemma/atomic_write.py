"""Outputs written whole or not at all: result files (evaluation JSON, answers, plots), checkpoint metadata and
whole output directories (converted checkpoints, HuggingFace exports).

An output is refused when it exists unless the caller says overwrite, and when it is one of the inputs; both
are checked before any work is done (`check_new`). It is written into a temporary sibling (`atomic_path` for a
file, `atomic_directory` for a directory), fsynced and renamed into place, so a crash or Ctrl-C never leaves a
truncated output under the real name, and a concurrent reader (another process of a multi-host run) sees the
old version or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from typing import Any, Iterator, Sequence


def check_new(path: str, *, overwrite: bool, inputs: Sequence[str | None] = (), directory: bool = False) -> None:
    """Fail early (before an hour of evaluation or conversion) when `path` exists and may not be replaced, when
    it is one of `inputs`, or when a file output names a directory."""
    for source in inputs:
        if source and os.path.realpath(source) == os.path.realpath(path):
            raise ValueError(f"{os.path.abspath(path)}: the output cannot be one of the inputs")
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    if not directory and os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory, not an output file")


@contextlib.contextmanager
def atomic_path(path: str, *, overwrite: bool, inputs: Sequence[str | None] = ()) -> Iterator[str]:
    """Yield a temporary file name next to `path` (same suffix, so writers that look at it pick the format);
    on success it is fsynced and renamed to `path`, on failure removed."""
    check_new(path, overwrite=overwrite, inputs=inputs)
    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.partial-", suffix=os.path.splitext(name)[1], dir=parent)
    os.close(fd)
    try:
        yield tmp
        _fsync(tmp)
        _publish(tmp, path, overwrite=overwrite, mode=0o666)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path: str, *, overwrite: bool, inputs: Sequence[str | None] = (),
                     skip_if_empty: bool = False) -> Iterator[str]:
    """Yield a temporary directory next to `path`; on success every file in it is fsynced and it is renamed to
    `path` (an existing `path` is moved aside first and then deleted), on failure removed. `skip_if_empty`: a
    directory left empty is removed instead of published (an empty side directory would look like a broken
    one to its readers)."""
    check_new(path, overwrite=overwrite, inputs=inputs, directory=True)
    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    try:
        yield tmp
        if skip_if_empty and not os.listdir(tmp):
            os.rmdir(tmp)
            return
        for directory, _, files in os.walk(tmp):
            for file_name in files:
                _fsync(os.path.join(directory, file_name))
            _fsync(directory)
        _publish(tmp, path, overwrite=overwrite, mode=0o777)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: str, path: str, *, overwrite: bool, mode: int) -> None:
    """Rename the finished `tmp` to `path`, with the permissions the umask gives new outputs (mkstemp and
    mkdtemp make them private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, mode & ~umask)
    if os.path.lexists(path):
        if not overwrite:  # appeared while we worked
            raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
        if os.path.isdir(tmp):  # a directory cannot be renamed over an existing path: move that aside first
            parent, name = os.path.split(os.path.abspath(path))
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rename(path, os.path.join(old, name))
            os.rename(tmp, path)
            shutil.rmtree(old)
            _fsync(parent)
            return
    os.replace(tmp, path)
    _fsync(os.path.dirname(os.path.abspath(path)))


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str, text: str, *, overwrite: bool) -> None:
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def json_safe(value: Any) -> Any:
    """NaN/inf -> None (strict JSON has no NaN), numpy scalars -> Python numbers, dict keys -> strings."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str, data: Any, *, overwrite: bool, sort_keys: bool = False) -> None:
    """Strict JSON (`json_safe`), indented, one trailing newline."""
    write_text(path, json.dumps(json_safe(data), indent=2, allow_nan=False, sort_keys=sort_keys) + "\n",
               overwrite=overwrite)
