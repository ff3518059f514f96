"""POST /v1/load_patch on a live server, for each engine: a new patch swaps in without a restart (vLLM: a
LoRA adapter loaded at run time), and a refused one (schema, fingerprint, not finite) says why and
leaves the variants that were serving untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from server_fixtures import (
    FACT_PROMPTS,
    NAME,
    OTHER_PATCH_GAINS,
    Server,
    demo_model_dir,
    patch_file,
    shared_server,
    tiny_model_dir,
)

from recallfix.patches import Patch, apply_patch

ENGINES = ["vllm", "transformers"]
PATCHED = f"{NAME}:patched"


@pytest.fixture(scope="module", params=ENGINES)
def server(request: pytest.FixtureRequest) -> Server:
    return shared_server(request.param, *(e for e in ENGINES if e != request.param))


@pytest.fixture(scope="module")
def original(server: Server) -> Path:
    return Path(next(a for a in server.args if a.endswith("demo-patch.json")))


def first_position(server: Server, model: str) -> dict[str, float]:
    """The 5 most likely first tokens and their logprobs (greedy, so the first is the choice)."""
    reply = server.client().completions.create(model=model, prompt=FACT_PROMPTS[0], max_tokens=1,
                                               temperature=0, logprobs=5)
    return reply.choices[0].logprobs.top_logprobs[0]


def patch_info(server: Server) -> list[dict[str, str]]:
    return [labels for name, labels, value in server.metrics().samples if name == "recallfix_patch_info" and value]


def assert_close(a: dict[str, float], b: dict[str, float], tol: float = 1e-4) -> None:
    assert set(a) == set(b)
    assert all(a[k] == pytest.approx(b[k], abs=tol) for k in a)


def test_a_new_patch_swaps_in_and_back_without_restart(server: Server, original: Path, tmp_path: Path) -> None:
    other = Patch.load(patch_file(demo_model_dir(), OTHER_PATCH_GAINS, tmp_path / "other.json"))
    base_before, patched_before = first_position(server, NAME), first_position(server, PATCHED)
    applied = "lora" if "vllm" in server.args else "in-memory"
    try:
        loaded = server.post("/v1/load_patch", {"patch": json.loads(other.model_dump_json())})
        assert loaded.status_code == 200, loaded.text
        body = loaded.json()
        assert body["patch"]["patch_id"] == other.id and body["patch"]["applied"] == applied
        assert body["patch"]["edits"] == OTHER_PATCH_GAINS
        assert body["previous_patch_id"] == Patch.load(original).id
        assert body["models"] == [NAME, PATCHED, f"{NAME}:ab"]
        (info,) = patch_info(server)
        assert info["patch_id"] == other.id and info["applied"] == applied
        # The new patched variant is the new patch applied to the model; base is untouched.
        swapped = first_position(server, PATCHED)
        assert_close(swapped, reference(other), tol=1e-3)
        assert swapped != pytest.approx(patched_before)
        assert_close(first_position(server, NAME), base_before)
    finally:
        restored = server.post("/v1/load_patch", {"path": str(original)})
        assert restored.status_code == 200, restored.text
    assert_close(first_position(server, PATCHED), patched_before)
    assert patch_info(server)[0]["patch_id"] == Patch.load(original).id


def reference(patch: Patch) -> dict[str, float]:
    """First-position top-5 of the demo model with `patch` applied in this process."""
    from recallfix.patches.io import load_causal_lm

    model, tokenizer = load_causal_lm(demo_model_dir())
    with torch.no_grad(), apply_patch(model, patch):
        logits = model(tokenizer(FACT_PROMPTS[0], return_tensors="pt").input_ids).logits[0, -1]
    logprobs = torch.log_softmax(logits, -1)
    top = logprobs.topk(5)
    return {tokenizer.decode([int(i)]): float(v) for v, i in zip(top.values, top.indices, strict=True)}


def refusals(original: Path, tmp_path: Path) -> list[tuple[str, dict, str]]:
    """(case, request body, what the message must say)."""
    document = json.loads(original.read_text())
    too_big = {**document, "edits": [{**document["edits"][0], "gain": 1e39}, *document["edits"][1:]]}  # float32 inf
    foreign = Patch.load(patch_file(tiny_model_dir("llama"), {"L1H0": 0.5}, tmp_path / "foreign.json"))
    return [
        ("schema", {"patch": {**document, "edits": []}}, "edits"),
        ("unknown field", {"patch": {**document, "surprise": 1}}, "surprise"),
        ("fingerprint", {"patch": json.loads(foreign.model_dump_json())}, "the patch was made for"),
        ("not finite", {"patch": too_big}, "non-finite"),
        ("no file", {"path": str(tmp_path / "missing.json")}, "cannot read"),
        ("unknown component", {"patch": {**document, "edits": [{"component": "L9H0", "gain": 0.5}]}}, "L9H0"),
    ]


def test_refused_patches_say_why_and_change_nothing(server: Server, original: Path, tmp_path: Path) -> None:
    base_before, patched_before = first_position(server, NAME), first_position(server, PATCHED)
    info_before = patch_info(server)
    for case, body, reason in refusals(original, tmp_path):
        refused = server.post("/v1/load_patch", body)
        assert refused.status_code == 400, (case, refused.text)
        error = refused.json()["error"]
        assert error["code"] == "patch_refused" and reason in error["message"], (case, error)
        assert Patch.load(original).id in error["message"]  # says which patch keeps serving
        assert "Traceback" not in refused.text
    both = server.post("/v1/load_patch", {"path": str(original), "patch": {}})
    assert both.status_code == 400
    assert patch_info(server) == info_before
    assert_close(first_position(server, PATCHED), patched_before)
    assert_close(first_position(server, NAME), base_before)


def test_vllm_serves_a_patch_beyond_its_lora_rank_from_a_merged_engine(tmp_path: Path) -> None:
    """The engine started with the max_lora_rank its first patch needs (128 at most); a patch on every
    neuron of an MLP (192) needs more: it runs merged in a second engine, started at run time; going
    back to the first patch (LoRA) retires that engine."""
    server = shared_server("vllm")
    original = Path(next(a for a in server.args if a.endswith("demo-patch.json")))
    width = json.loads((demo_model_dir() / "config.json").read_text())["intermediate_size"]
    assert width > 128
    wide = Patch.load(patch_file(demo_model_dir(), {f"L1N{i}": 0.5 for i in range(width)}, tmp_path / "wide.json"))
    try:
        # Starting the second engine took up to 270 s on a loaded 2-core machine: wait for it, not 120 s.
        loaded = server.post("/v1/load_patch", {"path": str(tmp_path / "wide.json")}, timeout=600)
        assert loaded.status_code == 200, loaded.text
        detail = loaded.json()["patch"]["detail"]
        assert loaded.json()["patch"]["applied"] == "merged" and "restart with --max-lora-rank" in detail
        assert patch_info(server)[0]["applied"] == "merged"
        assert_close(first_position(server, PATCHED), reference(wide), tol=1e-3)
    finally:
        assert server.post("/v1/load_patch", {"path": str(original)}).status_code == 200
    assert patch_info(server)[0]["applied"] == "lora"
    assert "vLLM engine (patched): ready" in server.log()
