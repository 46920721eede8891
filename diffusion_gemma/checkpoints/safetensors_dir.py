"""Read a HuggingFace checkpoint directory (one `model.safetensors`, or shards with an index) tensor by tensor.

Only the safetensors format is read: no pickle anywhere. Problems name the file.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import numpy as np
from safetensors import SafetensorError, safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A missing, unexpected, mis-shaped or unreadable tensor; the message names the key or file."""


class SafetensorsDir:
    """Key -> file map of a checkpoint directory; tensors are read one at a time (memory-mapped)."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        index_path = os.path.join(hf_dir, INDEX_FILE)
        single_path = os.path.join(hf_dir, SINGLE_FILE)
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index_path}: not a valid safetensors index ({err})") from None
            self.key_to_file = {key: os.path.join(hf_dir, name) for key, name in weight_map.items()}
        elif os.path.exists(single_path):
            self.key_to_file = {key: single_path for key in self._keys_of(single_path)}
        else:
            raise CheckpointError(f"{hf_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
        for path in sorted(set(self.key_to_file.values())):
            if not os.path.exists(path):
                raise CheckpointError(f"{path}: shard listed in {INDEX_FILE} is missing")
        self._handles: dict[str, object] = {}

    @staticmethod
    def _keys_of(path: str) -> list[str]:
        try:
            with safe_open(path, "np") as f:
                return list(f.keys())
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from None

    def _handle(self, path: str):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(path, "np")
            except (SafetensorError, OSError, ValueError) as err:
                raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from None
        return self._handles[path]

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_file

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(self.key_to_file[key]).get_slice(key).get_shape())

    def read(self, key: str) -> np.ndarray:
        path = self.key_to_file[key]
        try:
            return self._handle(path).get_tensor(key)
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: cannot read tensor {key!r} ({err})") from None

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for key in self.key_to_file:
            yield key, self.read(key)
