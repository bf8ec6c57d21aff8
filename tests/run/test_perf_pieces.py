"""The engine's speed paths give the same tensors (and files) as the plain ones."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import pivotmerge
import pivotmerge.run.streaming as engine
from pivotmerge.errors import RepoError
from pivotmerge.methods import get_method
from pivotmerge.plan.params import resolve_params
from pivotmerge.repos.model_repo import ModelRepo, populate, release
from pivotmerge.spec.schema import MergeSpec, spec_from_dict
from tests.repo_factory import llava_like, write_repo


def _merged_over_the_first(tmp_path: Path, states: list[dict[str, torch.Tensor]], method: str,
                           parameters: dict) -> tuple[MergeSpec, dict[str, torch.Tensor]]:
    """`merge` of the later states over the first (weights 0.5, 1.5, ...): its spec and its tensors."""
    repos = [write_repo(tmp_path / f"m{i}", s) for i, s in enumerate(states)]
    spec = spec_from_dict({"method": method, "base_model": str(repos[0]), "parameters": parameters, "device": "cpu",
                           "models": [{"model": str(r), "weight": 0.5 + i} for i, r in enumerate(repos[1:])]})
    pivotmerge.merge(spec, tmp_path / "out")
    return spec, load_file(str(tmp_path / "out" / "model.safetensors"))


@pytest.mark.parametrize("method, parameters", [("linear", {}), ("task_arithmetic", {"lambda": 0.6})])
def test_elementwise_methods_merged_in_pieces_equal_the_whole_tensor_call(tmp_path: Path, monkeypatch, method, parameters):
    monkeypatch.setattr(engine, "CPU_PIECE", 7)  # odd-sized pieces, a ragged last piece
    states = [llava_like(seed, hidden=12) for seed in range(3)]
    spec, merged = _merged_over_the_first(tmp_path, states, method, parameters)
    m = get_method(method)
    for name, base in states[0].items():
        if not base.is_floating_point():
            continue
        resolved = resolve_params(spec, m, name, 0.0)
        expected = m([s[name] for s in states[1:]], base, resolved.weights, resolved.params).tensor
        assert torch.allclose(merged[name], expected, rtol=0, atol=1e-6), name


def test_prefetching_reader_survives_a_cancel_midway(tmp_path: Path):
    states = [llava_like(seed) for seed in range(2)]
    repos = [write_repo(tmp_path / f"m{i}", s) for i, s in enumerate(states)]
    calls = []

    def cancel_on_third() -> bool:
        calls.append(1)
        return len(calls) == 3

    with pytest.raises(pivotmerge.MergeCancelled):
        pivotmerge.merge({"method": "linear", "models": [{"model": str(r)} for r in repos]}, tmp_path / "out",
                         should_cancel=cancel_on_third)
    assert not any(tmp_path.glob(".out*")) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("method, parameters", [("linear", {}), ("task_arithmetic", {"lambda": 0.6})])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_elementwise_merge_releasing_input_pages_piece_by_piece_equals_the_whole_tensor_call(tmp_path: Path, monkeypatch,
                                                                                            method, parameters, dtype):
    # Pieces of 3000 elements span pages and end mid-page: each piece's whole pages are released
    # once merged, while the next piece still reads the page they share.
    monkeypatch.setattr(engine, "CPU_PIECE", 3000)
    g = torch.Generator().manual_seed(0)
    states = [{"language_model.model.embed_tokens.weight": torch.randn(50, 1000, generator=g).to(dtype),
               "multi_modal_projector.linear_1.weight": torch.randn(300, 40, generator=g).to(dtype)} for _ in range(3)]
    spec, merged = _merged_over_the_first(tmp_path, states, method, parameters)
    m = get_method(method)
    for name, base in states[0].items():
        resolved = resolve_params(spec, m, name, 0.0)
        expected = m([s[name].float() for s in states[1:]], base.float(), resolved.weights, resolved.params).tensor.to(dtype)
        assert torch.allclose(merged[name].float(), expected.float(), rtol=0, atol=1e-6 if dtype == torch.float32 else 0), name


def _resident_kib(tensor: torch.Tensor) -> int:
    """Resident memory of the mapping that holds `tensor`, from /proc/self/smaps."""
    address = tensor.data_ptr()
    with open("/proc/self/smaps") as fh:
        inside = False
        for line in fh:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head == "Rss:":
                return int(line.split()[1])
    raise AssertionError("no mapping holds the tensor")


def test_get_maps_without_reading_populate_reads_every_page_and_release_drops_them_again(tmp_path: Path):
    weight = torch.randn(256, 1024, generator=torch.Generator().manual_seed(1))  # 1 MiB, 256 pages
    repo = ModelRepo.open(str(write_repo(tmp_path / "m", {"w": weight})))
    tensor = repo.get("w")
    assert _resident_kib(tensor) == 0
    populate(tensor)
    assert _resident_kib(tensor) >= 1024
    flat = tensor.reshape(-1)
    for end in range(5000, flat.numel() + 5000, 5000):  # as the engine does: all merged so far, ending mid-page
        release(flat[:end])
    assert _resident_kib(tensor) <= 8  # at most the partial pages at the ends of the map
    assert torch.equal(tensor, weight)  # released pages read back from the file
    repo.close()


def test_converting_a_consumed_input_for_a_method_releases_its_pages_only_when_that_copied_it(tmp_path: Path):
    g = torch.Generator().manual_seed(2)
    stored = {"half": torch.randn(256, 1024, generator=g).to(torch.bfloat16), "full": torch.randn(256, 1024, generator=g)}
    repo = ModelRepo.open(str(write_repo(tmp_path / "m", stored)))
    half, full = repo.get("half"), repo.get("full")
    populate(half)
    populate(full)
    converted = engine._float32(half, torch.device("cpu"), consumed=True)
    assert torch.equal(converted, stored["half"].float()) and _resident_kib(half) <= 8
    # Already float32: the method gets the map itself, whose pages (and any writes into them) must stay.
    same = engine._float32(full, torch.device("cpu"), consumed=True)
    assert same.data_ptr() == full.data_ptr() and _resident_kib(full) >= 1024
    repo.close()


def test_release_leaves_memory_that_is_not_a_map_alone():
    own = torch.arange(1 << 16, dtype=torch.float32)  # 64 pages of heap: dropping them would read back as zeros
    release(own)
    assert torch.equal(own, torch.arange(1 << 16, dtype=torch.float32))


def test_a_tensor_off_its_alignment_is_read_as_stored(tmp_path: Path):
    # A 3-byte tensor first puts the float32 one off its 4-byte alignment (files written in plan order can).
    header = {"a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
              "b": {"dtype": "F32", "shape": [2, 2], "data_offsets": [3, 19]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    b = torch.tensor([[0.5, -1.0], [3.25, 7.0]])
    (tmp_path / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + bytes([1, 2, 3]) + b.numpy().tobytes())
    repo = ModelRepo.open(str(tmp_path))
    assert torch.equal(repo.get("a"), torch.tensor([1, 2, 3], dtype=torch.uint8))
    assert torch.equal(repo.get("b"), b)
    repo.close()


def test_a_file_truncated_after_it_was_opened_is_an_error_not_a_crash(tmp_path: Path):
    folder = write_repo(tmp_path / "m", {"a": torch.zeros(1000), "b": torch.ones(1000)})
    repo = ModelRepo.open(str(folder))
    os.truncate(folder / "model.safetensors", (folder / "model.safetensors").stat().st_size - 100)
    with pytest.raises(RepoError, match="truncated"):
        repo.get("b")
    repo.close()


def _run_python(code: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_cli_help_and_the_package_facade_do_not_import_torch():
    done = _run_python("import sys; import pivotmerge; from pivotmerge.cli.main import main; main(['merge', '--help']); "
                       "print('torch' in sys.modules); import pivotmerge.run.merge as e; print(pivotmerge.merge is e.merge)")
    assert done.returncode == 0, done.stderr
    assert "Merge the models a SPEC names" in done.stdout
    assert done.stdout.split()[-2:] == ["False", "True"]


def test_console_script_merge_ends_with_its_files_and_report_complete(tmp_path: Path):
    states = [llava_like(seed, hidden=16) for seed in range(3)]
    repos = [write_repo(tmp_path / f"m{i}", s) for i, s in enumerate(states)]
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"method": "task_arithmetic", "base_model": str(repos[0]),
                                    "models": [{"model": str(r)} for r in repos[1:]], "out_shard_size": 2000}))
    done = _run_python("from pivotmerge.cli.main import main; main()", "merge", str(spec), "-o", str(tmp_path / "out"), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)  # the whole report, flushed before the process ended
    assert len(report["files"]) > 1
    for f in report["files"]:
        assert hashlib.sha256((tmp_path / "out" / f["name"]).read_bytes()).hexdigest() == f["sha256"]
    assert json.loads((tmp_path / "out" / "merge_report.json").read_text())["files"] == report["files"]


@pytest.mark.parametrize("method, parameters", [("ties", {"density": 0.5}), ("pivotmerge", {})])
def test_tensors_merged_side_by_side_write_the_bytes_of_one_at_a_time(tmp_path: Path, monkeypatch, method, parameters):
    states = [llava_like(seed, hidden=16) for seed in range(4)]
    repos = [write_repo(tmp_path / f"m{i}", s) for i, s in enumerate(states)]
    spec = {"method": method, "base_model": str(repos[0]), "parameters": parameters, "device": "cpu",
            "models": [{"model": str(r)} for r in repos[1:]]}
    in_flight: list[int] = []
    sizes: dict[str, int] = {}
    merge_one = engine._merge_one

    def recorded(plan, out, inputs, device):
        sizes[out.name] = sum(t.nbytes for t in inputs)
        in_flight.append(torch.get_num_threads())
        return merge_one(plan, out, inputs, device)

    threads = torch.get_num_threads()
    monkeypatch.setattr(engine, "_merge_one", recorded)
    monkeypatch.setattr(engine, "_maths_workers", lambda method, device: 3)
    pivotmerge.merge(spec, tmp_path / "side_by_side")
    assert set(in_flight) == {1} and torch.get_num_threads() == threads  # single-threaded maths, then restored
    monkeypatch.setattr(engine, "_maths_workers", lambda method, device: 1)
    pivotmerge.merge(spec, tmp_path / "one_at_a_time")
    digest = [hashlib.sha256((tmp_path / d / "model.safetensors").read_bytes()).hexdigest()
              for d in ("side_by_side", "one_at_a_time")]
    assert digest[0] == digest[1]
    assert len(sizes) == len(states[0])


def test_tensors_in_flight_never_hold_more_inputs_than_their_budget(tmp_path: Path, monkeypatch):
    states = [llava_like(seed, hidden=16) for seed in range(3)]
    repos = [write_repo(tmp_path / f"m{i}", s) for i, s in enumerate(states)]
    spec = {"method": "task_arithmetic", "base_model": str(repos[0]), "device": "cpu",
            "models": [{"model": str(r)} for r in repos[1:]]}
    lock, held, peaks = threading.Lock(), [0], []
    merge_one = engine._merge_one

    def counted(plan, out, inputs, device):
        size = sum(t.nbytes for t in inputs)
        with lock:
            held[0] += size
            peaks.append(held[0])
        try:
            return merge_one(plan, out, inputs, device)
        finally:
            with lock:
                held[0] -= size

    monkeypatch.setattr(engine, "_merge_one", counted)
    monkeypatch.setattr(engine, "_maths_workers", lambda method, device: 4)
    pivotmerge.merge(spec, tmp_path / "out")
    largest = max(sum(s[name].nbytes for s in states) for name in states[0])
    assert max(peaks) <= largest
