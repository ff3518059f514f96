"""Run prompts through a real vLLM engine and dump greedy tokens with top-k logprobs as JSON.

vLLM starts its engine core in a spawned process, so it must run from a `__main__` script: the
tests call this file as a subprocess.

    python vllm_runner.py --model DIR [--lora NAME=DIR ...] --prompt P ... --out results.json

Output: {variant: [{"prompt": P, "steps": [{"token": id, "top": {id: logprob, ...}}, ...]}]}
with variant "base" for the model itself and NAME for each LoRA adapter.
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
    parser.add_argument("--prompt", action="append", required=True)
    parser.add_argument("--max-tokens", type=int, default=3)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    adapters = dict(item.split("=", 1) for item in args.lora)
    ranks = [json.loads((Path(d) / "adapter_config.json").read_text())["r"] for d in adapters.values()]
    engine_args = dict(model=args.model, dtype="float32", max_model_len=128, max_logprobs=20,
                       enforce_eager=True, seed=0)
    if adapters:
        engine_args.update(enable_lora=True, max_loras=len(adapters),
                           max_lora_rank=min(r for r in VLLM_LORA_RANKS if r >= max(ranks)))
    llm = LLM(**engine_args)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, logprobs=args.top)

    variants: dict[str, LoRARequest | None] = {"base": None}
    for i, (name, path) in enumerate(adapters.items(), start=1):
        variants[name] = LoRARequest(name, i, str(Path(path).resolve()))
    results = {}
    for name, lora in variants.items():
        outputs = llm.generate(args.prompt, params, lora_request=lora)
        results[name] = [
            {
                "prompt": out.prompt,
                "steps": [
                    {"token": token, "top": {str(t): lp.logprob for t, lp in step.items()}}
                    for token, step in zip(out.outputs[0].token_ids, out.outputs[0].logprobs, strict=True)
                ],
            }
            for out in outputs
        ]
    args.out.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
