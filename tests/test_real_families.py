"""vLLM (the CPU build) serves the real Qwen2 and Gemma 3 models of models.json, base and patched, as Hugging Face
computes them: Qwen2.5-Coder-0.5B-Instruct and Gemma 3 270M, float32, on facts.

One vLLM engine per model (tests/vllm_runner.py, a subprocess): it serves the base checkpoint, then its weights are
replaced in place by the merged patched checkpoint's (vLLM's own loader reads that checkpoint's files) and it serves
those. A second engine would cost a start, and a LoRA adapter on the base would not be the merged checkpoint served.

Memory: the Qwen test peaks at 6.2 GiB of anonymous memory (vLLM's process: 2.5 GB of float32 weights, about as
much again that vLLM's CPU backend allocates beside them, a 256 MiB KV cache; the test's own Hugging Face model maps
the checkpoint's file, transformers' zero-copy load, and adds page cache only), Gemma's at 5.8 GiB. So these tests
run in the live servers' pytest-xdist group, after the last server test has stopped its servers
(`server_fixtures.rank` puts every test that needs none after those): never beside the servers' budget
(MAX_MEMORY_GIB), and on that worker never beside another engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from real_model import named_model_path
from transformers import AutoTokenizer

from recallfix.patches import apply_patch, make_patch
from recallfix.patches.export import export_merged
from recallfix.patches.registry.load import load_model

RUNNER = Path(__file__).with_name("vllm_runner.py")
PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "Tokyo is the capital of",
           "The Eiffel Tower is located in the city of"]
# The patch each model is served with, on its final layer: heads with large direct effects on these prompts' top
# tokens, and its MLP where that means something. Qwen2: the whole MLP (a merged checkpoint carries it, though no exact
# LoRA could). Gemma 3: two neurons, as its post-feedforward norm renormalises a whole MLP's gain away (no bias edit:
# refused on Gemma 3, the norm after the MLP).
PATCHES = {
    "qwen2.5-coder-0.5b": {"L23H1": 0.3, "L23H5": 1.8, "L23MLP": 1.3},
    "gemma3-270m": {"L17H2": 0.3, "L17N492": 1.8, "L17N1977": 0.5},
}
TOLERANCE = 1e-4  # |log-probability vLLM - Hugging Face|, float32 on both sides (see the test)
STEPS = 2  # the next token and one decoding step after it (vLLM's KV cache), greedy
TOP = 5
# vLLM's KV cache, below VLLM_CPU_KVCACHE_SPACE's smallest (it counts whole GiB): 256 MiB holds 10,880 tokens of
# Qwen2.5-Coder and 3,968 of Gemma 3 in float32 (vLLM's count); the prompts need under 20 each.
KV_CACHE_BYTES = 256 * 2**20


def run_vllm(model: Path, merged: Path, out: Path) -> dict:
    """vLLM's greedy steps on PROMPTS, with top-TOP log-probabilities: {"base": ..., "merged": ...}."""
    cmd = [sys.executable, str(RUNNER), "--model", str(model), "--reload", f"merged={merged}", "--out", str(out),
           "--max-tokens", str(STEPS), "--top", str(TOP), "--kv-cache-memory-bytes", str(KV_CACHE_BYTES)]
    for prompt in PROMPTS:
        cmd += ["--prompt", prompt]
    # The model in the engine-core process (no worker process spinning beside it); one OpenMP thread, as every
    # engine of the tests: the other pytest-xdist worker runs on the other core.
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "OMP_NUM_THREADS": "1", "VLLM_NO_USAGE_STATS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads(out.read_text())


@torch.no_grad()
def hf_logprobs(model: torch.nn.Module, result: dict) -> torch.Tensor:
    """Hugging Face's log-probabilities at each of vLLM's steps, teacher-forced on vLLM's tokens: one forward pass of
    the prompt and the tokens vLLM chose, read at the positions that predicted them ([STEPS, vocab])."""
    ids = result["prompt_ids"] + [step["token"] for step in result["steps"]][:-1]
    steps = len(result["steps"])  # the unembedding of those positions alone: Gemma 3's has 262,144 rows
    logits = model(torch.tensor([ids]), logits_to_keep=steps).logits[0]
    assert logits.shape[0] == steps
    return torch.log_softmax(logits.float(), dim=-1)


def compare(results: list[dict], model: torch.nn.Module, tokenizer) -> float:  # noqa: ANN001
    """vLLM's steps against Hugging Face's: the same prompt tokens, the same greedy token (or a near-tie), and each
    top-k log-probability within TOLERANCE (a token in one top-k and not the other within it of the k-th). Returns the
    largest |difference|."""
    worst = 0.0
    for result in results:
        prompt = result["prompt"]
        assert result["prompt_ids"] == tokenizer(prompt).input_ids, f"vLLM tokenized {prompt!r} otherwise"
        for step, logprobs in zip(result["steps"], hf_logprobs(model, result), strict=True):
            top = {int(t): lp for t, lp in step["top"].items()}
            hf_top = logprobs.topk(len(top))
            kth = float(hf_top.values[-1])
            for token in set(top) ^ set(hf_top.indices.tolist()):  # a near-tie at the k-th place only
                assert abs(float(logprobs[token]) - kth) <= TOLERANCE, (prompt, token)
            assert float(logprobs.max() - logprobs[step["token"]]) <= TOLERANCE, (prompt, step["token"])
            for token, lp in top.items():
                worst = max(worst, abs(lp - float(logprobs[token])))
            assert worst <= TOLERANCE, (prompt, worst)
    return worst


@pytest.mark.vllm
@pytest.mark.real_model
@pytest.mark.xdist_group("servers")  # on the live servers' worker, after them (see the module doc)
@pytest.mark.parametrize("name", PATCHES)
def test_vllm_serves_the_base_and_the_merged_patch_as_hugging_face_does(name: str, tmp_path: Path,
                                                                        request: pytest.FixtureRequest) -> None:
    """Measured in float32 (4 prompts x 2 steps x top 5, base and merged): vLLM's CPU kernels sum in another order than
    PyTorch's (its own attention and fused layers), which moved log-probabilities by at most 2.4e-5 on Qwen2.5-Coder
    (24 blocks) and 2.0e-5 on Gemma 3 (18), as on SmolLM2 (2.5e-5, test_vllm_patches.py). The tolerance, 1e-4, is
    what this project states for vLLM against Hugging Face in float32 (test_compare_vllm.py): 4x that rounding, and
    far below what the patch changes (it moves the first step's top log-probabilities by 1.1 nats on Qwen and 0.76
    on Gemma in vLLM's own numbers; at least 100x the tolerance is required), so a merged checkpoint that vLLM reads
    otherwise than Hugging Face, a reload that did not happen, or a wrong base cannot pass. vLLM's prompt tokens are
    the tokenizer's as loaded (Gemma's <bos> included or left out alike)."""
    if request.config.getoption("loadgroup", default=False):  # `make test`: on the live servers' worker, after them
        assert request.node.nodeid.endswith("@servers"), "pytest-xdist put this test outside the servers' group"
    path = named_model_path(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = load_model(path)
    patch = make_patch(model, PATCHES[name])
    merged = export_merged(path, patch, tmp_path / "merged")
    # The reload keeps the engine's config and tokenizer: the merged checkpoint's are the same files.
    for side in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (merged / side).read_bytes() == (path / side).read_bytes(), side

    results = run_vllm(path, merged, tmp_path / "out.json")
    worst = compare(results["base"], model, tokenizer)
    with apply_patch(model, patch):
        worst = max(worst, compare(results["merged"], model, tokenizer))
    # The patch moves vLLM's own numbers far beyond the tolerance (the reload took effect): the first step's
    # log-probabilities of the tokens in both top-k lists.
    moved = 0.0
    for before, after in zip(results["base"], results["merged"], strict=True):
        base_top, merged_top = before["steps"][0]["top"], after["steps"][0]["top"]
        moved = max([moved, *(abs(lp - merged_top[t]) for t, lp in base_top.items() if t in merged_top)])
    assert moved > 100 * TOLERANCE, moved
    print(f"{name}: largest |logprob vLLM - HF| {worst:.2e} (base and merged patch); the patch moves them {moved:.2f}")
