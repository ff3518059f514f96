"""A real vLLM engine (CPU build) serves what the exporters write, and agrees with Hugging Face.

vLLM runs in a subprocess (tests/vllm_runner.py) because its engine core is spawned from __main__.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from real_model import REAL_PATCH, REAL_PROMPTS
from tiny import PROMPTS
from transformers import AutoModelForCausalLM, AutoTokenizer

from recallfix.patches import Patch, apply_patch, make_patch
from recallfix.patches.export import export_lora, export_merged

pytestmark = pytest.mark.vllm
RUNNER = Path(__file__).with_name("vllm_runner.py")
TOLERANCE = 1e-3
REAL_TOLERANCE = 1e-3  # see the real-model test


def run_vllm(model: Path, out: Path, loras: dict[str, Path] | None = None, prompts: list[str] = PROMPTS) -> dict:
    cmd = [sys.executable, str(RUNNER), "--model", str(model), "--out", str(out)]
    for name, path in (loras or {}).items():
        cmd += ["--lora", f"{name}={path}"]
    for prompt in prompts:
        cmd += ["--prompt", prompt]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # the model in the engine core: no worker process spinning beside it
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads(out.read_text())


@torch.no_grad()
def assert_matches_hf(results: list[dict], model: torch.nn.Module, tokenizer,  # noqa: ANN001
                      tolerance: float = TOLERANCE) -> float:
    """Greedy tokens and top-k logprobs at every generated step equal HF's, teacher-forced, within `tolerance`
    (a token in one top-k and not the other must be within it of the k-th). Returns the largest difference."""
    worst = 0.0
    for result in results:
        ids = tokenizer(result["prompt"], return_tensors="pt").input_ids[0].tolist()
        for step in result["steps"]:
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
            top = {int(t): lp for t, lp in step["top"].items()}
            hf_top = logprobs.topk(len(top))
            kth = float(hf_top.values[-1])
            for token in set(top) ^ set(hf_top.indices.tolist()):  # a near-tie at the k-th place only
                assert abs(float(logprobs[token]) - kth) <= tolerance, (result["prompt"], token)
            assert step["token"] == int(logprobs.argmax())
            for token, lp in top.items():
                worst = max(worst, abs(lp - float(logprobs[token])))
                assert abs(lp - float(logprobs[token])) <= tolerance, (result["prompt"], token)
            ids.append(step["token"])
    return worst


def top_first_step(results: list[dict]) -> list[dict[str, float]]:
    return [r["steps"][0]["top"] for r in results]


@pytest.fixture(scope="module")
def llama_served(tiny_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Patch]:
    """One vLLM engine on the tiny llama serving its base and a LoRA adapter (heads and a neuron): (what it
    served, the patch). Also the base reference of the bias test below (one engine start for both)."""
    base_dir = tiny_dirs["llama"]
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    patch = make_patch(model, {"L1H0": 0.3, "L1H3": 1.8, "L1N5": 2.5})
    out = tmp_path_factory.mktemp("vllm-llama")
    adapter = export_lora(base_dir, patch, out / "adapter")
    return run_vllm(base_dir, out / "out.json", loras={"patched": adapter}), patch


def test_one_engine_serves_llama_base_and_lora_adapter(tiny_dirs, llama_served) -> None:
    base_dir = tiny_dirs["llama"]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    results, patch = llama_served
    assert_matches_hf(results["base"], model, tokenizer)
    with apply_patch(model, patch):
        assert_matches_hf(results["patched"], model, tokenizer)
    assert top_first_step(results["base"]) != top_first_step(results["patched"]), "adapter had no effect"


def test_vllm_serves_a_gpt2_merged_export(tiny_dirs, tmp_path) -> None:
    base_dir = tiny_dirs["gpt2"]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    patch = make_patch(model, {"L1H1": 0.2, "L1MLP": 1.4})
    merged = export_merged(base_dir, patch, tmp_path / "merged")

    results = run_vllm(merged, tmp_path / "out.json")
    with apply_patch(model, patch):
        assert_matches_hf(results["base"], model, tokenizer)


def test_vllm_serves_a_llama_merged_export_with_a_bias_edit(tiny_dirs, llama_served, tmp_path) -> None:
    """The paper's fix on Llama: the bias only loads through `mlp_bias`, which vLLM must honour too."""
    base_dir = tiny_dirs["llama"]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    bias = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    patch = make_patch(model, {}, biases={"L1MLP": bias})
    merged = export_merged(base_dir, patch, tmp_path / "merged")

    results = run_vllm(merged, tmp_path / "out.json")
    with apply_patch(model, patch):
        assert_matches_hf(results["base"], model, tokenizer)
    base = llama_served[0]["base"]  # the same engine options and prompts, on the unpatched checkpoint
    assert top_first_step(base) != top_first_step(results["base"]), "the bias had no effect in vLLM"


def test_vllm_serves_a_gemma3_merged_export_and_a_lora_adapter_on_it(tiny_dirs, tmp_path) -> None:
    """Gemma 3 (sandwich norms, (1 + weight) RMSNorms, scaled embeddings, tied unembedding, a sliding-window layer
    whose window, 4, is shorter than the prompts): one engine serves a merged patched checkpoint as its base, and a
    LoRA adapter made against that checkpoint (a second patch on top), each as Hugging Face computes it with the
    patches applied in memory. One engine start: about 40 s on 2 cores."""
    base_dir = tiny_dirs["gemma3_text"]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    patch = make_patch(model, {"L0H1": 0.5, "L1H0": 0.3, "L1H3": 1.8, "L1N5": 2.5})
    merged = export_merged(base_dir, patch, tmp_path / "merged")
    on_top = make_patch(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32), {"L1H2": 1.6, "L0N7": 0.2})
    adapter = export_lora(merged, on_top, tmp_path / "adapter")

    results = run_vllm(merged, tmp_path / "out.json", loras={"patched": adapter})
    with apply_patch(model, patch):
        worst = assert_matches_hf(results["base"], model, tokenizer)
        with apply_patch(model, on_top):  # in memory, the patched weights are the merged ones, bit for bit
            worst = max(worst, assert_matches_hf(results["patched"], model, tokenizer))
    assert top_first_step(results["base"]) != top_first_step(results["patched"]), "adapter had no effect"
    with torch.no_grad():  # the merged patch itself moves the numbers far beyond the tolerance
        ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
        unpatched = torch.log_softmax(model(ids).logits[0, -1], dim=-1)
        with apply_patch(model, patch):
            patched = torch.log_softmax(model(ids).logits[0, -1], dim=-1)
    assert (patched - unpatched).abs().max() > 100 * TOLERANCE
    print(f"largest |logprob vLLM - HF| on the tiny Gemma 3: {worst:.2e}")


@pytest.mark.real_model
def test_vllm_serves_the_real_model_and_its_patch_as_hugging_face_does(real_model_dir, tmp_path) -> None:
    """SmolLM2-135M in float32: vLLM's CPU kernels sum in another order than PyTorch's (its own attention and
    fused layers, 30 blocks), which moved log-probabilities by at most 2.5e-5 here (base and LoRA-patched, 3
    prompts x 3 steps x top 5). The tolerance, 1e-3, is 40x that rounding and far below what the patch changes
    (it moves the answer's log-probability by 0.1-1 nats), so a wrong adapter or a wrong base cannot pass."""
    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    model = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    patch = make_patch(model, REAL_PATCH)
    adapter = export_lora(real_model_dir, patch, tmp_path / "adapter")

    results = run_vllm(real_model_dir, tmp_path / "out.json", loras={"patched": adapter}, prompts=REAL_PROMPTS)
    worst = assert_matches_hf(results["base"], model, tokenizer, tolerance=REAL_TOLERANCE)
    with apply_patch(model, patch):
        worst = max(worst, assert_matches_hf(results["patched"], model, tokenizer, tolerance=REAL_TOLERANCE))
    assert top_first_step(results["base"]) != top_first_step(results["patched"]), "adapter had no effect"
    print(f"largest |logprob vLLM - HF| on the real model: {worst:.2e}")
