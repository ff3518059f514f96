"""Parity on the demo model (float32): the vLLM engine (patch as LoRA) and the transformers engine (patch
in memory) give the same greedy tokens and log-probabilities, for base and for patched; and patched is
what `recallfix.patches.apply_patch` makes of the model."""

from __future__ import annotations

import openai
import pytest
import torch
from server_fixtures import FACT_PROMPTS, NAME, PATCH_GAINS, demo_model_dir, shared_server

TOLERANCE = 1e-3
PROMPTS = [*FACT_PROMPTS, "People in Brazil speak", "The Eiffel Tower is in the city of"]
MODELS = [NAME, f"{NAME}:patched"]


@pytest.fixture(scope="module")
def clients() -> dict[str, openai.OpenAI]:
    shared_server("vllm", "transformers")
    return {kind: shared_server(kind).client() for kind in ("vllm", "transformers")}


def greedy(client: openai.OpenAI, model: str, **kwargs):  # noqa: ANN003, ANN201
    return client.completions.create(model=model, prompt=PROMPTS, temperature=0, logprobs=5, **kwargs)


def assert_same_logprobs(a, b) -> None:  # noqa: ANN001 (openai Logprobs objects)
    assert a.tokens == b.tokens
    assert [x is None for x in a.token_logprobs] == [x is None for x in b.token_logprobs]
    for x, y in zip(a.token_logprobs, b.token_logprobs, strict=True):
        if x is not None:
            assert x == pytest.approx(y, abs=TOLERANCE)
    for ta, tb in zip(a.top_logprobs, b.top_logprobs, strict=True):
        if ta is None or tb is None:
            assert ta is tb is None
            continue
        assert set(ta) == set(tb)
        for token, value in ta.items():
            assert value == pytest.approx(tb[token], abs=TOLERANCE), token


@pytest.mark.parametrize("model", MODELS)
def test_greedy_generation_matches_across_engines(clients: dict[str, openai.OpenAI], model: str) -> None:
    vllm, hf = (greedy(clients[k], model, max_tokens=8) for k in ("vllm", "transformers"))
    for a, b in zip(vllm.choices, hf.choices, strict=True):
        assert a.text == b.text
        assert a.finish_reason == b.finish_reason
        assert_same_logprobs(a.logprobs, b.logprobs)
    assert vllm.usage == hf.usage


@pytest.mark.parametrize("model", MODELS)
def test_prompt_scoring_matches_across_engines(clients: dict[str, openai.OpenAI], model: str) -> None:
    vllm, hf = (greedy(clients[k], model, max_tokens=0, echo=True) for k in ("vllm", "transformers"))
    for a, b in zip(vllm.choices, hf.choices, strict=True):
        assert_same_logprobs(a.logprobs, b.logprobs)


def test_patched_is_the_patch_applied_to_the_model(clients: dict[str, openai.OpenAI]) -> None:
    """Each engine's patched variant, at the first generated position, against apply_patch in this process."""
    from recallfix.patches import apply_patch, make_patch
    from recallfix.patches.io import load_causal_lm

    model, tokenizer = load_causal_lm(demo_model_dir())
    prompt = PROMPTS[0]
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        base = torch.log_softmax(model(ids).logits[0, -1], -1)
        with apply_patch(model, make_patch(model, PATCH_GAINS)):
            patched = torch.log_softmax(model(ids).logits[0, -1], -1)
    assert float((patched - base).abs().max()) > 0.05  # the patch changes the prediction: the test can fail
    for kind, client in clients.items():
        for model_name, reference in ((NAME, base), (f"{NAME}:patched", patched)):
            reply = client.completions.create(model=model_name, prompt=prompt, max_tokens=1, temperature=0,
                                              logprobs=5)
            top = reply.choices[0].logprobs.top_logprobs[0]
            expected = {tokenizer.decode([int(i)]): float(reference[i]) for i in reference.topk(5).indices}
            assert set(top) >= set(expected), (kind, model_name)
            for token, value in expected.items():
                assert top[token] == pytest.approx(value, abs=TOLERANCE), (kind, model_name, token)
