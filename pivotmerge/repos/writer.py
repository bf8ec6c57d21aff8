"""Streaming safetensors writer.

Every output tensor's name, shape and dtype is known before merging starts, so
the shard layout and headers are fixed up front and each tensor's bytes are
appended the moment it is merged: memory never holds more than one tensor.
Each file's sha256 is taken from the bytes as they are written, in a second
thread: hashing costs about as much as writing (docs/performance.md), so hashing
beside the write instead of after it keeps a copied tensor's time near a plain copy's.
"""

from __future__ import annotations

import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Collection, Sequence

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
        return math.prod(self.shape) * self.dtype.itemsize


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
        entries[t.name] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape),
                           "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


@dataclass
class WrittenFile:
    file: str
    size: int
    sha256: str


def write_index(folder: Path, shards: Sequence[Shard]) -> None:
    """The index of a sharded output (none for a single file, as transformers expects)."""
    if len(shards) > 1:
        weight_map = {t.name: s.file for s in shards for t in s.tensors}
        index = {"metadata": {"total_size": sum(s.nbytes for s in shards)}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


class ShardWriter:
    """Write tensors, in plan order, into the planned shards under `folder`.

    With `only`, just those shard indices are written (a part of a split merge);
    the layout is the full one, so each part's files are byte-identical to the
    same shards of a whole merge.
    """

    def __init__(self, folder: Path, tensors: Sequence[OutputTensor], max_shard_bytes: int,
                 metadata: dict[str, str] | None = None, only: Collection[int] | None = None) -> None:
        self.folder = folder
        self.shards = plan_shards(tensors, max_shard_bytes)
        self._metadata = {"format": "pt", **(metadata or {})}
        self._only = only
        self._order = [(i, t) for i, s in enumerate(self.shards) if only is None or i in only for t in s.tensors]
        self._next = 0
        self._shard = -1
        self._fh: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pivotmerge-hash")
        self._size = 0
        self.written: list[WrittenFile] = []

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard_index, expected = self._order[self._next]
        if name != expected.name or tuple(tensor.shape) != expected.shape or tensor.dtype != expected.dtype:
            raise ValueError(f"writer expected {expected}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        if shard_index != self._shard:
            self._open(shard_index)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._emit(data.data)  # the array's buffer, as a memoryview
        self._next += 1
        if self._next == len(self._order) or self._order[self._next][0] != self._shard:
            self._finish_shard()

    @property
    def tensors(self) -> list[OutputTensor]:
        """The tensors this writer expects, in the order it expects them."""
        return [t for _, t in self._order]

    def _partial(self, index: int) -> Path:
        return self.folder / f".{self.shards[index].file}.partial"

    def _open(self, index: int) -> None:
        self._shard = index
        self._fh = open(self._partial(index), "wb")
        self._hash = hashlib.sha256()
        self._size = 0
        self._emit(_header(self.shards[index], self._metadata))

    def _emit(self, data: bytes | memoryview) -> None:
        assert self._fh is not None
        hashed = self._hasher.submit(self._hash.update, data)  # sha256 releases the GIL: both run at once
        try:
            self._fh.write(data)
        finally:
            hashed.result()  # `data` may be freed once this returns
        self._size += len(data)

    def _finish_shard(self) -> None:
        assert self._fh is not None
        self._fh.close()
        self._fh = None
        # Complete shards only appear under their real name: a part killed mid-write
        # leaves no file that looks finished.
        self._partial(self._shard).rename(self.folder / self.shards[self._shard].file)
        self.written.append(WrittenFile(self.shards[self._shard].file, self._size, self._hash.hexdigest()))

    def close(self) -> list[WrittenFile]:
        """Check every tensor was written; write the index of a whole (not partial) output."""
        self._hasher.shutdown()
        if self._next != len(self._order):
            raise ValueError(f"writer closed after {self._next} of {len(self._order)} tensors")
        if self._only is None:
            write_index(self.folder, self.shards)
        return self.written

    def abort(self) -> None:
        self._hasher.shutdown()
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            self._partial(self._shard).unlink(missing_ok=True)
