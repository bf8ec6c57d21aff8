from __future__ import annotations


import pytest

from tests.repos.tiny_families import FAMILIES, Built, build_family


@pytest.fixture(scope="session")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    """Every family's base and two experts, built once per test session."""
    root = tmp_path_factory.mktemp("families")
    return {name: build_family(family, root / name) for name, family in FAMILIES.items()}
