"""The example models with their synthetic datasets, made once for the tuning tests."""

from __future__ import annotations

import pytest

from pivotmerge.data.example import ExampleSet, make_example


@pytest.fixture(scope="session")
def example(tmp_path_factory) -> ExampleSet:
    return make_example(tmp_path_factory.mktemp("tune-example"), n_experts=3, with_data=True, n_samples=8)
