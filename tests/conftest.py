"""Shared fixtures: tiny random checkpoints of every supported architecture, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import ARCHITECTURES, save_model

pytest_plugins = ["real_model", "server_fixtures"]  # the real model (SmolLM2-135M); the live servers


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """arch -> checkpoint dir. Llama is saved in several shards to exercise shard-by-shard export."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {
        arch: save_model(arch, root / arch, max_shard_size="60KB" if arch == "llama" else None)
        for arch in ARCHITECTURES
    }


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "faults: failure injection (killed servers and writers, refused patches, "
                                       "full or read-only disks): `pytest -m faults`")
