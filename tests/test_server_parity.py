"""Offline parity with Hugging Face: the greedy tokens and logprobs `recallfix serve` gives for NAME and
NAME:patched, in both patch modes, are Hugging Face's own (base, and the patch applied in memory),
teacher-forced along the served tokens.

Tolerance: 2e-3 nats on every logprob. Both sides run float32, but vLLM's CPU kernels (fused
RMSNorm, its attention, LoRA's shrink/expand in lora mode) sum in another order than PyTorch's eager
modules; over SmolLM2's 30 layers that moves a logprob by up to about 1e-3 (the largest seen is
printed). A patch's effect on these prompts is far larger (checked below), so the tolerance cannot
hide a patch served wrong.
"""

from __future__ import annotations

import pytest
import torch
from server_fixtures import FACT_PROMPTS, NAME, PATCH_GAINS, patch_file, shared, smollm2_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from recallfix.patches import Patch, apply_patch

TOLERANCE = 2e-3
STEPS = 4
TOP = 5


@pytest.fixture(scope="module")
def hf() -> tuple[torch.nn.Module, object]:
    model_dir = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def served(server, model: str) -> list[list[tuple[int, dict[int, float]]]]:  # noqa: ANN001
    """Per prompt: per generated step, (token id, {id: logprob} of the top entries)."""
    reply = server.client().completions.create(model=model, prompt=FACT_PROMPTS, max_tokens=STEPS, temperature=0.0,
                                               logprobs=TOP, extra_body={"return_tokens_as_token_ids": True})
    out = []
    for choice in sorted(reply.choices, key=lambda c: c.index):
        steps = []
        for token, top in zip(choice.logprobs.tokens, choice.logprobs.top_logprobs, strict=True):
            steps.append((int(token.removeprefix("token_id:")),
                          {int(t.removeprefix("token_id:")): lp for t, lp in top.items()}))
        out.append(steps)
    return out


@torch.no_grad()
def worst_difference(results, model, tokenizer) -> float:  # noqa: ANN001
    """Checks greedy tokens and top sets against HF; returns the largest logprob difference."""
    worst = 0.0
    for prompt, steps in zip(FACT_PROMPTS, results, strict=True):
        ids = tokenizer(prompt).input_ids
        for token, top in steps:
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
            assert token == int(logprobs.argmax()), (prompt, ids)
            assert set(top) <= set(logprobs.topk(TOP + 1).indices.tolist())
            worst = max(worst, *(abs(lp - float(logprobs[t])) for t, lp in top.items()))
            ids = [*ids, token]
    return worst


@pytest.mark.parametrize("mode", ["merged", "lora"])
def test_served_logprobs_are_hugging_faces(mode: str, hf) -> None:  # noqa: ANN001
    model, tokenizer = hf
    (server,) = shared(f"serve-{mode}")
    base, patched = served(server, NAME), served(server, f"{NAME}:patched")
    worst_base = worst_difference(base, model, tokenizer)
    with apply_patch(model, Patch.load(patch_file(PATCH_GAINS, "learned"))):
        worst_patched = worst_difference(patched, model, tokenizer)
    print(f"{mode}: largest |logprob difference| base {worst_base:.2e}, patched {worst_patched:.2e}")
    assert worst_base <= TOLERANCE and worst_patched <= TOLERANCE
    # The patch moves these logprobs by far more than the tolerance: a patch served wrong cannot pass.
    effect = max(abs(base[i][0][1][t] - patched[i][0][1].get(t, base[i][0][1][t])) for i in range(len(base))
                 for t in base[i][0][1])
    assert effect > 10 * TOLERANCE
