"""Result files (evaluation JSON, plots): refused when they exist unless the caller says overwrite, checked
before any work is done, and written to a temporary sibling that is renamed into place, so a crash or Ctrl-C
never leaves a truncated file under the real name."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from typing import Any, Iterator


def check_new(path: str, *, overwrite: bool) -> None:
    """Fail early (before an hour of evaluation) when `path` exists and may not be replaced."""
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory, not an output file")


@contextlib.contextmanager
def atomic_path(path: str, *, overwrite: bool) -> Iterator[str]:
    """Yield a temporary file name next to `path` (same suffix, so writers that look at it pick the format);
    on success it is fsynced and renamed to `path`, on failure removed."""
    check_new(path, overwrite=overwrite)
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.partial-", suffix=os.path.splitext(name)[1], dir=directory)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the output gets the usual permissions
        if not overwrite and os.path.lexists(path):  # appeared while we worked
            raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


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


def write_json(path: str, data: Any, *, overwrite: bool) -> None:
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(json_safe(data), f, indent=2, allow_nan=False)
            f.write("\n")
