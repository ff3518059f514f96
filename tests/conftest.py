"""Shared fixtures: tiny random checkpoints of every supported architecture, built once per session."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from tiny import ARCHITECTURES, save_model

pytest_plugins = ["real_model", "server_fixtures"]  # the real model (SmolLM2-135M); the live servers

# Disk a whole run needs beyond the venv (checkpoints, merged exports, vLLM's caches): it held at most 1.7 GB at once
# on a fresh clone (README). With less free, tests fail with ENOSPC far from the cause, so the run says so first.
DISK_NEEDED_GIB = 3


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
    config.addinivalue_line("markers", "vllm: runs vLLM (an engine or a server); `make check` leaves these out")


def pytest_sessionstart(session: pytest.Session) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")  # shown under -q too, unlike the header
    for where in {Path(tempfile.gettempdir()), Path(session.config.rootpath)}:
        free = shutil.disk_usage(where).free / 2**30
        if free < DISK_NEEDED_GIB and reporter is not None:
            reporter.write_line(f"LOW DISK: {free:.1f} GiB free at {where}; a whole run needs up to {DISK_NEEDED_GIB} "
                                "GiB there (tmp_path, .cache/, vLLM's caches): expect 'No space left on device'",
                                yellow=True, bold=True)
