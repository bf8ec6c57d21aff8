"""Split merges: parts written by shard, in any order, finalize to the same bytes as one merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import pivotmerge
from pivotmerge.errors import PivotMergeError
from pivotmerge.run.split import finalize, merge_shards, partition, shard_count
from tests.repo_factory import llava_like, write_repo


def weight_files(folder: Path) -> dict[str, bytes]:
    """Files that must match byte for byte (the report and model card carry timings and dates)."""
    names = sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors") + ["model.safetensors.index.json", "config.json"]
    return {n: (folder / n).read_bytes() for n in names}


@pytest.fixture
def spec_factory(tmp_path: Path):
    base = write_repo(tmp_path / "base", llava_like(0, hidden=16, layers=4), extra_files={"tokenizer.json": "{}"})
    experts = [write_repo(tmp_path / f"e{k}", llava_like(k + 1, hidden=16, layers=4)) for k in range(3)]

    def make(method: str, **parameters: object) -> dict:
        return {"method": method, "base_model": str(base), "models": [{"model": str(e)} for e in experts],
                "parameters": parameters, "dtype": "bfloat16", "out_shard_size": 2000, "device": "cpu"}
    return make


@pytest.mark.parametrize("method, parameters", [("task_arithmetic", {"lambda": 0.7}), ("ties", {"density": 0.5}),
                                                ("tsv", {})])
def test_split_parts_are_byte_identical_to_one_merge(spec_factory, tmp_path, method, parameters):
    spec = spec_factory(method, **parameters)
    whole = tmp_path / "whole"
    report = pivotmerge.merge(spec, whole)
    n = shard_count(spec)
    assert n >= 4
    folder = tmp_path / "split"
    parts = [merge_shards(spec, folder, p) for p in reversed(partition(n, 3))]  # order does not matter
    split_report = finalize(spec, folder, json.loads(json.dumps(parts)))  # results travel as JSON
    assert weight_files(folder) == weight_files(whole)
    assert split_report.files == report.files
    assert split_report.layers == report.layers
    assert not [p for p in folder.iterdir() if p.name.endswith(".partial")]


def test_partition_is_contiguous_balanced_and_complete():
    assert partition(7, 3) == [[0, 1], [2, 3, 4], [5, 6]]
    assert partition(2, 5) == [[0], [1]]
    assert partition(1, 1) == [[0]]


def test_finalize_refuses_missing_or_repeated_shards(spec_factory, tmp_path):
    spec = spec_factory("task_arithmetic")
    folder = tmp_path / "split"
    first, *rest = partition(shard_count(spec), 2)
    part = merge_shards(spec, folder, first)
    with pytest.raises(PivotMergeError, match="expected each of"):
        finalize(spec, folder, [part])
    with pytest.raises(PivotMergeError, match="expected each of"):
        finalize(spec, folder, [part, part])
    with pytest.raises(PivotMergeError, match="shards: expected indices"):
        merge_shards(spec, folder, [99])
