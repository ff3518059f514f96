"""Run prompts through a real vLLM engine and dump greedy tokens with top-k logprobs as JSON.

vLLM starts its engine core in a spawned process, so it must run from a `__main__` script: the
tests call this file as a subprocess.

    python vllm_runner.py --model DIR [--lora NAME=DIR ...] [--reload NAME=DIR ...] [--kv-cache-memory-bytes N]
        --prompt P ... --out results.json

Output: {variant: [{"prompt": P, "prompt_ids": [id, ...], "steps": [{"token": id, "top": {id: logprob, ...}}, ...]}]}
with variant "base" for the model itself, NAME for each LoRA adapter, and NAME for each `--reload`: the same engine
with its weights replaced in place by those of checkpoint DIR (vLLM's own loader, as at start; the config and the
tokenizer stay the first model's), after the variants before it. A reload is a weight load (3-9 s for Gemma 3 270M
and Qwen2.5-Coder-0.5B on a busy 2-core machine) where a second engine is a start (11-34 s there), and memory holds one
engine (the reload added 0.6 GiB at its peak for Qwen's 2.5 GB of weights).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from recallfix.patches.export import VLLM_LORA_RANKS


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--lora", action="append", default=[], help="NAME=DIR")
    parser.add_argument("--reload", action="append", default=[], help="NAME=DIR: a checkpoint of the same config")
    parser.add_argument("--prompt", action="append", required=True)
    parser.add_argument("--max-tokens", type=int, default=3)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--kv-cache-memory-bytes", type=int, help="instead of VLLM_CPU_KVCACHE_SPACE's whole GiB")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()

    if args.kv_cache_memory_bytes:  # vLLM's CPU platform lets the variable, where set, override the engine argument
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    else:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    adapters = dict(item.split("=", 1) for item in args.lora)
    reloads = dict(item.split("=", 1) for item in args.reload)
    ranks = [json.loads((Path(d) / "adapter_config.json").read_text())["r"] for d in adapters.values()]
    engine_args = dict(model=args.model, dtype="float32", max_model_len=128, max_logprobs=20,
                       enforce_eager=True, seed=0)
    if args.kv_cache_memory_bytes:
        engine_args.update(kv_cache_memory_bytes=args.kv_cache_memory_bytes)
    if reloads:  # a prompt's cached KV blocks would be the old weights' (reset below too: either would do)
        engine_args.update(enable_prefix_caching=False)
    if adapters:
        engine_args.update(enable_lora=True, max_loras=len(adapters),
                           max_lora_rank=min(r for r in VLLM_LORA_RANKS if r >= max(ranks)))
    llm = LLM(**engine_args)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, logprobs=args.top)

    def generate(lora: LoRARequest | None) -> list[dict]:
        return [
            {
                "prompt": out.prompt,
                "prompt_ids": list(out.prompt_token_ids),
                "steps": [
                    {"token": token, "top": {str(t): lp.logprob for t, lp in step.items()}}
                    for token, step in zip(out.outputs[0].token_ids, out.outputs[0].logprobs, strict=True)
                ],
            }
            for out in llm.generate(args.prompt, params, lora_request=lora)
        ]

    results = {"base": generate(None)}
    for i, (name, path) in enumerate(adapters.items(), start=1):
        results[name] = generate(LoRARequest(name, i, str(Path(path).resolve())))
    for name, path in reloads.items():
        # vLLM's in-place reload (its RL weight-sync path): the engine's own loader reads the checkpoint's files.
        llm.collective_rpc("reload_weights", kwargs={"weights_path": str(Path(path).resolve())})
        llm.reset_prefix_cache()
        results[name] = generate(None)
    args.out.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
