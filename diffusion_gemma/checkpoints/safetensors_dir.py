"""HuggingFace safetensors checkpoint directories: read tensor by tensor, write shard by shard.

A directory holds one `model.safetensors`, or shards listed in `model.safetensors.index.json`. A safetensors
file is an 8-byte little-endian header length, a JSON header (dtype, shape and data offsets per tensor, plus
`__metadata__`) and the raw little-endian data. This module parses headers itself and checks them against the
file size, so a truncated or corrupt file is an error naming the file; tensors are read with positioned reads
into fresh numpy buffers, whole or a range of leading-axis rows at a time, in every dtype numpy and ml_dtypes
know (bfloat16 included, which the `safetensors` numpy backend cannot load). Bytes of any dtype can be copied
without decoding them.

Writing plans every shard's header before any data (shapes and dtypes are known up front), then streams the
data in order, so no shard is ever assembled in memory. Only safetensors and JSON are read or written: no pickle.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import re
import struct
from typing import Iterable, Iterator, Sequence

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_METADATA = {"format": "pt"}
# The largest header safetensors itself accepts (100 MB); a bigger length field means a corrupt file.
_MAX_HEADER_BYTES = 100_000_000

# safetensors dtype code -> numpy dtype.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_CODES = {dtype: code for code, dtype in DTYPES.items()}


class CheckpointError(ValueError):
    """A missing, unexpected, mis-shaped or unreadable tensor; the message names the key or file."""


def dtype_code(dtype) -> str:
    """The safetensors code ("BF16", "F32", ...) of a numpy dtype."""
    try:
        return _CODES[np.dtype(dtype)]
    except KeyError:
        raise CheckpointError(f"dtype {np.dtype(dtype)} has no safetensors code") from None


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: `start`/`end` are absolute byte offsets in `path`."""

    key: str
    dtype: str          # safetensors code
    shape: tuple[int, ...]
    path: str
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def np_dtype(self) -> np.dtype:
        if self.dtype not in DTYPES:
            raise CheckpointError(f"{self.path}: tensor {self.key!r} has dtype {self.dtype}, which cannot be decoded")
        return DTYPES[self.dtype]

    @property
    def row_bytes(self) -> int:
        """Bytes per index of the leading axis (the whole tensor for scalars)."""
        rows = self.shape[0] if self.shape else 1
        return self.nbytes // rows if rows else 0


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one file's header -> ({key: TensorInfo}, __metadata__)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors file (header length {header_len}, "
                                      f"file size {size})")
            raw = f.read(header_len)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read safetensors file ({err})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    data_size = size - data_start
    infos: dict[str, TensorInfo] = {}
    spans = []
    for key, entry in header.items():
        try:
            code, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {key!r}") from None
        if code in DTYPES:
            expected = math.prod(shape) * DTYPES[code].itemsize
            if end - begin != expected:
                raise CheckpointError(f"{path}: corrupt safetensors header: {key!r} of shape {shape} {code} spans "
                                      f"{end - begin} bytes, expected {expected}")
        if not 0 <= begin <= end:
            raise CheckpointError(f"{path}: corrupt safetensors header: {key!r} has offsets [{begin}, {end})")
        if end > data_size:
            raise CheckpointError(f"{path}: truncated safetensors file: {key!r} ends at data byte {end}, the file "
                                  f"holds {data_size} data bytes")
        spans.append((begin, end, key))
        infos[key] = TensorInfo(key, code, shape, path, data_start + begin, data_start + end)
    spans.sort()
    for (_, prev_end, prev_key), (begin, _, key) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise CheckpointError(f"{path}: corrupt safetensors header: {prev_key!r} and {key!r} overlap")
    return infos, dict(metadata)


class SafetensorsDir:
    """Key -> TensorInfo map of a checkpoint directory (or of one safetensors file); tensors are read one at a
    time, never memory-mapped."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        self._fds: dict[str, int] = {}
        index_path = os.path.join(hf_dir, INDEX_FILE)
        single_path = os.path.join(hf_dir, SINGLE_FILE)
        self.infos: dict[str, TensorInfo] = {}
        if os.path.isfile(hf_dir):
            self.infos, _ = read_header(hf_dir)
        elif os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
                raise CheckpointError(f"{index_path}: not a valid safetensors index ({err})") from None
            files: dict[str, list[str]] = {}
            for key, name in weight_map.items():
                files.setdefault(name, []).append(key)
            for name, keys in files.items():
                path = os.path.join(hf_dir, name)
                if not os.path.exists(path):
                    raise CheckpointError(f"{path}: shard listed in {INDEX_FILE} is missing")
                infos, _ = read_header(path)
                for key in keys:
                    if key not in infos:
                        raise CheckpointError(f"{path}: tensor {key!r} listed in {INDEX_FILE} is not in this shard")
                    self.infos[key] = infos[key]
        elif os.path.exists(single_path):
            self.infos, _ = read_header(single_path)
        elif not os.path.isdir(hf_dir):
            raise CheckpointError(f"{hf_dir}: no such directory")
        else:
            raise CheckpointError(f"{hf_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
        self.key_to_file = {key: info.path for key, info in self.infos.items()}

    def __enter__(self) -> "SafetensorsDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        self.close()

    def keys(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, key: str) -> bool:
        return key in self.infos

    def info(self, key: str) -> TensorInfo:
        try:
            return self.infos[key]
        except KeyError:
            raise CheckpointError(f"{self.hf_dir}: no tensor {key!r}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self.info(key).shape

    def dtype(self, key: str) -> np.dtype:
        return self.info(key).np_dtype

    def _fd(self, path: str) -> int:
        if path not in self._fds:
            try:
                self._fds[path] = os.open(path, os.O_RDONLY)
            except OSError as err:
                raise CheckpointError(f"{path}: cannot open safetensors file ({err})") from None
        return self._fds[path]

    def read_into(self, key: str, out: memoryview, byte_start: int = 0) -> None:
        """Fill `out` with the tensor's bytes starting at `byte_start` (relative to the tensor)."""
        info = self.info(key)
        offset, remaining, view = info.start + byte_start, len(out), out
        if byte_start + remaining > info.nbytes:
            raise CheckpointError(f"{info.path}: read past the end of tensor {key!r}")
        fd = self._fd(info.path)
        while remaining:
            try:
                count = os.preadv(fd, [view], offset)
            except OSError as err:
                raise CheckpointError(f"{info.path}: cannot read tensor {key!r} ({err})") from None
            if count == 0:
                raise CheckpointError(f"{info.path}: truncated while reading tensor {key!r}")
            offset, remaining, view = offset + count, remaining - count, view[count:]

    def read_rows(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the leading axis as a new array."""
        info = self.info(key)
        out = np.empty((stop - start,) + info.shape[1:], info.np_dtype)
        self.read_into(key, memoryview(out.reshape(-1).view(np.uint8)), start * info.row_bytes)
        return out

    def read(self, key: str) -> np.ndarray:
        info = self.info(key)
        if not info.shape:
            out = np.empty((), info.np_dtype)
            self.read_into(key, memoryview(out.reshape(1).view(np.uint8)))
            return out
        return self.read_rows(key, 0, info.shape[0])

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for key in self.infos:
            yield key, self.read(key)


# ------------------------------------------------------------------------------------------------------ writing
@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor of a file to write: its key, safetensors dtype code and shape."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def entry(key: str, dtype, shape: Sequence[int]) -> TensorEntry:
    code = dtype if isinstance(dtype, str) else dtype_code(dtype)
    shape = tuple(int(d) for d in shape)
    return TensorEntry(key, code, shape, math.prod(shape) * DTYPES[code].itemsize)


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
               "GIB": 2**30, "TIB": 2**40}


def parse_size(size: str | int) -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500 * 2**20, 1000 -> 1000 (the units transformers accepts)."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, flags=re.IGNORECASE)
        if not match:
            raise ValueError(f"invalid size {size!r}; expected e.g. 5GB, 500MB, 2GiB or a number of bytes")
        value = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").upper()])
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


def plan_shards(entries: Iterable[TensorEntry], max_shard_size: int) -> list[list[TensorEntry]]:
    """Greedy split in order, like transformers: a new shard starts when the next tensor would overflow; a
    tensor larger than the limit gets a shard of its own."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for item in entries:
        if shards[-1] and size + item.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards if shards[0] else []


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class _SequentialFile:
    """Append-only file writer that bypasses the page cache (O_DIRECT) through an aligned staging buffer.

    Page-cache write-back is the bottleneck of big sequential writes on many (virtual) disks, where direct
    writes run several times faster. Falls back to ordinary buffered writes where O_DIRECT is unsupported.
    """

    _ALIGN = 4096
    _STAGE_BYTES = 16 * 2**20

    def __init__(self, path: str):
        self.path = path
        self.size = 0
        self._fill = 0
        self._stage = None
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            self._fd = os.open(path, flags | getattr(os, "O_DIRECT", 0), 0o666)
            self._direct = hasattr(os, "O_DIRECT")
        except OSError:
            self._fd = os.open(path, flags, 0o666)
            self._direct = False
        if self._direct:
            self._stage = mmap.mmap(-1, self._STAGE_BYTES)  # page-aligned, as O_DIRECT needs

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        self.size += len(view)
        if not self._direct:
            self._write_all(view)
            return
        while len(view):
            count = min(len(view), self._STAGE_BYTES - self._fill)
            self._stage[self._fill:self._fill + count] = view[:count]
            self._fill += count
            view = view[count:]
            if self._fill == self._STAGE_BYTES:
                self._write_all(memoryview(self._stage))
                self._fill = 0

    def _write_all(self, view: memoryview) -> None:
        while len(view):
            view = view[os.write(self._fd, view):]

    def close(self) -> None:
        """Flush, trim the alignment padding, fsync and close."""
        try:
            if self._direct and self._fill:
                padded = -(-self._fill // self._ALIGN) * self._ALIGN
                self._stage[self._fill:padded] = bytes(padded - self._fill)
                self._write_all(memoryview(self._stage)[:padded])
                os.ftruncate(self._fd, self.size)
            os.fsync(self._fd)
        finally:
            self.abort()

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._stage is not None:
            self._stage.close()
            self._stage = None


class SafetensorsWriter:
    """Writes one safetensors file whose tensors are known up front; data arrives in order, in pieces.

    `write(key, data)` appends bytes (an array in the declared dtype, or raw bytes / uint8) to the current tensor,
    which may take several calls; a tensor is complete when its declared byte count has arrived.
    """

    def __init__(self, path: str, entries: Sequence[TensorEntry], metadata: dict[str, str] | None = None):
        self.path = path
        self.entries = list(entries)
        header: dict[str, object] = {"__metadata__": dict(DEFAULT_METADATA if metadata is None else metadata)}
        offset = 0
        for item in self.entries:
            header[item.key] = {"dtype": item.dtype, "shape": list(item.shape),
                                "data_offsets": [offset, offset + item.nbytes]}
            offset += item.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self._file = _SequentialFile(path)
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._index = 0
        self._written = 0
        self._skip_empty()

    def _skip_empty(self) -> None:
        while self._index < len(self.entries) and self.entries[self._index].nbytes == 0:
            self._index += 1

    def write(self, key: str, data) -> None:
        if not (data.nbytes if isinstance(data, np.ndarray) else memoryview(data).nbytes):
            return
        if self._index >= len(self.entries) or self.entries[self._index].key != key:
            expected = self.entries[self._index].key if self._index < len(self.entries) else "nothing"
            raise CheckpointError(f"{self.path}: got data for {key!r}, expected {expected}")
        current = self.entries[self._index]
        if isinstance(data, np.ndarray):
            if data.dtype not in (DTYPES[current.dtype], np.uint8):  # uint8: raw bytes
                raise CheckpointError(f"{self.path}: {key!r} is declared {current.dtype}, got {data.dtype}")
            data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        view = memoryview(data).cast("B")
        if self._written + len(view) > current.nbytes:
            raise CheckpointError(f"{self.path}: {key!r} got more than its {current.nbytes} bytes")
        self._file.write(view)
        self._written += len(view)
        if self._written == current.nbytes:
            self._index += 1
            self._written = 0
            self._skip_empty()

    def close(self) -> None:
        """Finish the file (flushed and fsynced); every declared byte must have been written."""
        complete = self._index == len(self.entries)
        self._file.close()
        if not complete:
            raise CheckpointError(f"{self.path}: closed before tensor {self.entries[self._index].key!r} was written")

    def abort(self) -> None:
        self._file.abort()


def write_index(hf_dir: str, shards: Sequence[Sequence[TensorEntry]], names: Sequence[str]) -> None:
    """`model.safetensors.index.json` for a sharded directory (total_size = bytes of tensor data)."""
    weight_map = {item.key: name for name, shard in zip(names, shards) for item in shard}
    total_size = sum(item.nbytes for shard in shards for item in shard)
    total_parameters = sum(math.prod(item.shape) for shard in shards for item in shard)
    index = {"metadata": {"total_parameters": total_parameters, "total_size": total_size},
             "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(hf_dir, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
