"""Streaming safetensors writer.

Every output tensor's name, shape and dtype is known before merging starts, so
the shard layout and headers are fixed up front and each tensor's bytes are
appended the moment it is merged: memory never holds more than one tensor.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Sequence

import torch

INDEX_FILE = "model.safetensors.index.json"

DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


@dataclass
class Shard:
    file: str
    tensors: list[OutputTensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(tensors: Sequence[OutputTensor], max_shard_bytes: int) -> list[Shard]:
    """Fill shards in order; a tensor larger than the limit gets a shard of its own."""
    groups: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    if len(groups) == 1:
        return [Shard("model.safetensors", groups[0])]
    n = len(groups)
    return [Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def _header(shard: Shard, metadata: dict[str, str]) -> bytes:
    entries: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in shard.tensors:
        entries[t.name] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


@dataclass
class WrittenFile:
    file: str
    size: int
    sha256: str


class ShardWriter:
    """Write tensors, in plan order, into the planned shards under `folder`."""

    def __init__(self, folder: Path, tensors: Sequence[OutputTensor], max_shard_bytes: int,
                 metadata: dict[str, str] | None = None) -> None:
        self.folder = folder
        self.shards = plan_shards(tensors, max_shard_bytes)
        self._metadata = {"format": "pt", **(metadata or {})}
        self._order = [(i, t) for i, s in enumerate(self.shards) for t in s.tensors]
        self._next = 0
        self._shard = -1
        self._fh: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self._size = 0
        self.written: list[WrittenFile] = []

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard_index, expected = self._order[self._next]
        if name != expected.name or tuple(tensor.shape) != expected.shape or tensor.dtype != expected.dtype:
            raise ValueError(f"writer expected {expected}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        if shard_index != self._shard:
            self._open(shard_index)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._emit(memoryview(data))
        self._next += 1
        if self._next == len(self._order) or self._order[self._next][0] != self._shard:
            self._finish_shard()

    def _open(self, index: int) -> None:
        self._shard = index
        self._fh = open(self.folder / self.shards[index].file, "wb")
        self._hash = hashlib.sha256()
        self._size = 0
        self._emit(_header(self.shards[index], self._metadata))

    def _emit(self, data: bytes | memoryview) -> None:
        assert self._fh is not None
        self._fh.write(data)
        self._hash.update(data)
        self._size += len(data)

    def _finish_shard(self) -> None:
        assert self._fh is not None
        self._fh.close()
        self._fh = None
        self.written.append(WrittenFile(self.shards[self._shard].file, self._size, self._hash.hexdigest()))

    def close(self) -> list[WrittenFile]:
        """Check every tensor was written; write the index when there are several shards."""
        if self._next != len(self._order):
            raise ValueError(f"writer closed after {self._next} of {len(self._order)} tensors")
        if len(self.shards) > 1:
            weight_map = {t.name: s.file for s in self.shards for t in s.tensors}
            total = sum(s.nbytes for s in self.shards)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return self.written

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
