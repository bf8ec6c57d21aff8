"""Model repos: Hugging Face-format folders read lazily from safetensors.

Only safetensors are ever read; pickled weights are refused, never unpickled.
When allowed roots are given, a repo and every file it reads must resolve
inside one of them (symbolic links included).

Each tensor is its own private memory map of just its bytes, unmapped when the
tensor is freed: no copy out of the page cache and no fresh pages to zero
(a fraction of the CPU that pread into new buffers costs: docs/performance.md),
and resident memory holds only the tensors alive, not every
page a merge has touched (as one map of the whole file does). Pages are read
when first touched; `populate` reads them all at once, in the caller's thread
(a reader thread, ahead of the maths), and `release` drops pages a merge is
done with. The map is private: writing into such a tensor copies the page and
never touches the file.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import re
import weakref
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from pivotmerge.errors import RepoError

PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_FILE = "model.safetensors.index.json"
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str
    offset: int = 0  # where the tensor's bytes start in `file`

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _within(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def resolve_roots(allowed_roots: Sequence[str | os.PathLike[str]] | None) -> list[Path] | None:
    return None if allowed_roots is None else [Path(r).expanduser().resolve() for r in allowed_roots]


def locate(ref: str, *, allowed_roots: Sequence[Path] | None = None, relative_to: Path | None = None,
           allow_downloads: bool = False) -> Path:
    """The folder of a repo reference: a local path, or `org/name[@revision]` through the HF cache
    (downloaded into it only when `allow_downloads`)."""
    try:
        candidate = Path(ref).expanduser()
    except RuntimeError:  # "~name" where no user `name` exists: the home lookup fails
        raise RepoError(f"{ref}: no such model folder (no home folder for {ref.split('/')[0]!r})") from None
    if not candidate.is_absolute() and relative_to is not None:
        candidate = relative_to / candidate
    folder: Path | None = candidate if candidate.is_dir() else None
    if folder is None:
        m = HUB_ID.match(ref)
        if m and not ref.startswith((".", "/")):
            from pivotmerge.repos.hub import resolve_hub_id

            folder = resolve_hub_id(m.group("repo"), m.group("revision"), allow_downloads=allow_downloads)
        else:
            raise RepoError(f"{ref}: no such model folder")
    resolved = folder.resolve()
    if allowed_roots is not None and not _within(resolved, allowed_roots):
        raise RepoError(f"{ref}: outside the allowed roots")
    return resolved


@dataclass
class ModelRepo:
    """A model folder with its config and the header of every tensor."""

    ref: str
    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    _fds: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def kind(self) -> str:
        """What the input is; only a model folder can be loaded as a model by itself."""
        return "model folder"

    @classmethod
    def open(cls, ref: str, *, allowed_roots: Sequence[Path] | None = None, relative_to: Path | None = None,
             path: Path | None = None) -> "ModelRepo":
        """Open `ref` (at `path` when already located)."""
        path = path or locate(ref, allowed_roots=allowed_roots, relative_to=relative_to)
        config = _read_json(path / "config.json", ref) if (path / "config.json").is_file() else {}
        files = _weight_files(path, ref, allowed_roots)
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            tensors.update(_read_header(path / file, file, ref))
        return cls(ref=ref, path=path, config=config, tensors=tensors)

    @cached_property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    def renamed_as(self, names: Iterable[str], canonical: Callable[[str], str]) -> "ModelRepo":
        """This repo with each tensor renamed to the one of `names` it equals up to naming style
        (`canonical` maps both styles to one), so a legacy-layout expert lines up with a current-layout base.

        Call on a freshly opened repo: the result takes over its open files.
        """
        wanted = {canonical(n): n for n in names}
        tensors = {wanted.get(canonical(n), n): info for n, info in self.tensors.items()}
        if tensors.keys() == self.tensors.keys():
            return self
        return replace(self, tensors=tensors, _fds=self._fds)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, mapped from its file (safe to call from several threads)."""
        info = self.tensors[name]
        if not info.nbytes:
            return torch.empty(info.shape, dtype=info.dtype)
        data = _map(self._fd(info.file), info.offset, info.nbytes, self.ref, name)
        if info.offset % info.dtype.itemsize:  # torch needs aligned elements: copy (files we write keep plan order)
            return data.clone().view(info.dtype).view(info.shape)
        return data.view(info.dtype).view(info.shape)

    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is None:
            opened = os.open(self.path / file, os.O_RDONLY)
            fd = self._fds.setdefault(file, opened)
            if fd != opened:  # another thread opened it first
                os.close(opened)
        return fd

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def __enter__(self) -> "ModelRepo":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_json(path: Path, ref: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RepoError(f"{ref}: cannot read {path.name}: {exc}") from None


def _weight_files(path: Path, ref: str, allowed_roots: Sequence[Path] | None) -> list[str]:
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index, ref).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise RepoError(f"{ref}: {INDEX_FILE} has no weight_map")
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLED_SUFFIXES)
        if pickled:
            raise RepoError(f"{ref}: only pickled weights ({pickled[0]}); PivotMerge reads safetensors only and "
                            "never unpickles — convert the checkpoint to safetensors first")
        raise RepoError(f"{ref}: no *.safetensors weights in {path}")
    for file in files:
        target = (path / file).resolve()
        if not target.is_file():
            raise RepoError(f"{ref}: weight file {file} is missing")
        if not file.endswith(".safetensors"):
            raise RepoError(f"{ref}: weight file {file} is not safetensors; PivotMerge never unpickles")
        if allowed_roots is not None and not _within(target, allowed_roots):
            raise RepoError(f"{ref}: weight file {file} resolves outside the allowed roots")
    return files


def _read_header(path: Path, file: str, ref: str) -> dict[str, TensorInfo]:
    """Every tensor's shape, dtype and byte offset from a safetensors header, checked
    against the file's size so that reads never run past the end."""
    try:
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if size <= 0 or size > 100 * 2**20:
                raise ValueError("bad header length")
            header = json.loads(fh.read(size))
            data_bytes = os.fstat(fh.fileno()).st_size - 8 - size
        header.pop("__metadata__", None)
        tensors = {}
        for name, entry in header.items():
            info = TensorInfo(tuple(entry["shape"]), _dtype(entry["dtype"], ref, name), file,
                              8 + size + entry["data_offsets"][0])
            start, end = entry["data_offsets"]
            if not 0 <= start <= end <= data_bytes or end - start != info.nbytes:
                raise ValueError(f"tensor {name} has bad data offsets {[start, end]}")
            tensors[name] = info
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RepoError(f"{ref}: {path.name} is not a readable safetensors file ({exc})") from None
    return tensors


_libc = ctypes.CDLL(None, use_errno=True)  # ctypes calls release the GIL
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value
_PAGE = mmap.PAGESIZE
# Linux 5.14+: map every page now, read-only, even in a writable private map (MAP_POPULATE
# would copy each page). Older kernels answer EINVAL and the pages fault in on first use.
_MADV_POPULATE_READ = 22
# The data pointer of each live map's tensor -> the map's (address, length).
_MAPS: dict[int, tuple[int, int]] = {}


def _map(fd: int, offset: int, nbytes: int, ref: str, name: str) -> torch.Tensor:
    """`nbytes` bytes of `fd` at `offset` as a uint8 tensor over a private map of them, unmapped
    when the tensor is freed. (Not the mmap module: its maps hold a duplicate of the file
    descriptor each, and tuning keeps every merged tensor's inputs alive.)"""
    if os.fstat(fd).st_size < offset + nbytes:  # a page past the end would kill the process (SIGBUS) when read
        raise RepoError(f"{ref}: tensor {name} is truncated")
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    length = offset + nbytes - start
    address = _libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, start)
    if address == _MAP_FAILED:
        raise RepoError(f"{ref}: cannot map tensor {name}: {os.strerror(ctypes.get_errno())}")
    region = (ctypes.c_char * length).from_address(address)
    tensor = torch.frombuffer(region, dtype=torch.uint8, offset=offset - start, count=nbytes)
    _MAPS[tensor.data_ptr()] = (address, length)
    weakref.finalize(region, _unmap, tensor.data_ptr(), address, length)  # torch keeps `region` alive with the tensor
    return tensor


def _unmap(key: int, address: int, length: int) -> None:
    del _MAPS[key]  # before the address can be mapped again
    _libc.munmap(address, length)


def populate(tensor: torch.Tensor) -> None:
    """Read every page of a tensor `ModelRepo.get` made now, in this thread; other tensors are left alone."""
    span = _MAPS.get(tensor.untyped_storage().data_ptr())
    if span is not None:
        _libc.madvise(*span, _MADV_POPULATE_READ)


def release(piece: torch.Tensor) -> None:
    """Drop the whole pages of `piece`, a contiguous part of a tensor `ModelRepo.get` made, from this
    process's memory (other tensors are left alone). Reading them again reads the file: what was
    written into them is lost."""
    if piece.untyped_storage().data_ptr() not in _MAPS:
        return
    start = -(-piece.data_ptr() // _PAGE) * _PAGE
    end = (piece.data_ptr() + piece.numel() * piece.element_size()) // _PAGE * _PAGE
    if end > start:
        _libc.madvise(start, end - start, mmap.MADV_DONTNEED)


def _dtype(code: str, ref: str, name: str) -> torch.dtype:
    try:
        return SAFETENSORS_DTYPES[code]
    except KeyError:
        raise RepoError(f"{ref}: tensor {name} has unsupported dtype {code}") from None
