"""Train the project's own small Llama "demo model" (no model can be downloaded here).

The model is made to show the final-layer anti-overconfidence mechanism of Lv et al. (2024,
arXiv 2403.19521): on factual prompts its last decoder layer lowers p(correct answer).

Recipe, in two phases:

1. All weights, plain next-token loss, on a corpus of fact sentences (every shipped fact in every
   template, plus a few paraphrases) mixed with templated neutral filler text (weather, objects,
   numbers, and mentions of known and of fictional "unknown" subjects).
2. The last decoder layer alone (everything else frozen, final norm and unembedding included) is
   trained further *to hedge* on fact sentences: label smoothing toward the corpus unigram
   distribution, loss = (1 - eps) * CE + eps * CE(unigram, p). Filler keeps plain CE so that the
   hedge is specific to factual recall. This plants a real final-layer mechanism that pushes the
   answer down (and some answers below frequent tokens), which the project's patch has to undo.

The directory written is a normal Hugging Face checkpoint (`LlamaForCausalLM`, safetensors, fast
BPE tokenizer) plus `unknown_facts.jsonl`, `neutral.txt`, `recallfix_demo.json` and a model card.

Here: the cache key, the build (train, measure, save) and the CLI. The corpus and
tokenizer are `corpus`, the training loop `training`, the sizes `sizes`, the model card the template
`card.md`. The model is measured with the analysis' own functions (`collect`,
`summaries.suppression`, `collect.token_nll`), so its card states what `recallfix analyze` finds.

Heavy libraries (torch, transformers, tokenizers) are imported inside functions: this module also
registers a CLI subcommand, and `recallfix --help` should not pay seconds of import time for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.facts import Fact, answer_token_ids, dataset_sha256, load_shipped_facts
from .sizes import SIZES, DemoSize

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from ..mechanism.collect import Collected

# Bump when anything that changes the produced weights/data changes (part of the cache key).
RECIPE_VERSION = 3
MANIFEST = "recallfix_demo.json"
UNKNOWN_FACTS = "unknown_facts.jsonl"
NEUTRAL = "neutral.txt"
# Files a finished build must hold; the manifest is written last, so its presence means complete.
REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    UNKNOWN_FACTS,
    NEUTRAL,
    "README.md",
    MANIFEST,
)
CARD_TEMPLATE = Path(__file__).with_name("card.md")  # str.format fields
MEASURE_BATCH = 64  # prompts per forward pass when measuring


# --------------------------------------------------------------------------------------------
# Measuring the final layer's effect, as the analysis does
# --------------------------------------------------------------------------------------------


def _collect(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, facts: list[Fact]) -> Collected:
    """The analysis' pass over the prompts: the model's output and the logit lens before its last layer."""
    import torch

    from recallfix.patches.components import ComponentMap

    from ..data.batching import encode, pad_id
    from ..mechanism.collect import collect

    answers = torch.tensor(answer_token_ids(tokenizer, facts))
    return collect(model, ComponentMap(model), encode(tokenizer, [f.prompt for f in facts]), answers,
                   pad=pad_id(tokenizer), batch_size=MEASURE_BATCH)


def final_layer_effect(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast,
                       facts: list[Fact]) -> dict[str, Any]:
    """How the last layer moves each fact's answer (first token after "prompt "): the analysis' verdict
    numbers (`summaries.suppression`), over the distinct prompts, without the bootstrap."""
    from ..mechanism.summaries import suppression

    rows = [Fact(prompt=p, answer=a) for p, a in dict.fromkeys((f.prompt, f.answer) for f in facts)]
    c = _collect(model, tokenizer, rows)
    return suppression(c.output, c.before, [r.prompt for r in rows], n_boot=0, seed=0).model_dump()


def unknown_confidence(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast,
                       unknown: list[dict[str, str]]) -> dict[str, float]:
    """Mean top-1 probability on prompts about fictional subjects (there is no right answer to know)."""
    c = _collect(model, tokenizer, [Fact(prompt=u["prompt"], answer=u["answer"]) for u in unknown])
    return {"n_prompts": len(unknown), "mean_confidence_before": c.before.confidence.mean().item(),
            "mean_confidence_after": c.output.confidence.mean().item()}


def neutral_nll(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, lines: list[str]) -> float:
    """Mean next-token NLL (nats/token) on held-out neutral lines, each as trained: <s> line </s>."""
    from ..mechanism.collect import token_nll
    from .corpus import encode_lines

    sums, counts = token_nll(model, encode_lines(tokenizer, lines), pad=tokenizer.pad_token_id,
                             batch_size=MEASURE_BATCH)
    return (sums.sum() / counts.sum()).item()


# --------------------------------------------------------------------------------------------
# Build, cache, save
# --------------------------------------------------------------------------------------------


def recipe(size_name: str, seed: int, facts: list[Fact]) -> dict[str, Any]:
    """Everything the result depends on; its hash is the cache key."""
    return {
        "recipe_version": RECIPE_VERSION,
        "size": size_name,
        "params": dataclasses.asdict(SIZES[size_name]),
        "seed": seed,
        "facts_sha256": dataset_sha256(facts),
    }


def recipe_hash(r: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(r, sort_keys=True).encode()).hexdigest()


def is_complete(out: Path, key: str) -> bool:
    """True if `out` holds a finished build of the recipe with hash `key`."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("recipe_hash") == key and all((out / f).is_file() for f in REQUIRED_FILES)


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[demo-model] {msg}", file=sys.stderr, flush=True)


def build_demo_model(
    out_dir: str | os.PathLike[str],
    *,
    size: str = "default",
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Train the demo model into `out_dir` (or reuse it if already built by the same recipe).

    Returns the directory, which `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer` load.
    Deterministic: the same size, seed, facts and code give bit-identical weights on one machine.
    """
    from recallfix.patches.io import atomic_directory

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    out = Path(out_dir).resolve()
    facts = load_shipped_facts()  # the model trains on every fact (the analysis holds facts out later)
    rec = recipe(size, seed, facts)
    key = recipe_hash(rec)
    if not force and is_complete(out, key):
        _log(progress, f"{out} already holds this demo model (recipe {key[:12]}); not rebuilding")
        return out
    if (
        out.exists()
        and not force
        and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).exists()))
    ):
        raise FileExistsError(f"{out} exists and is not a recallfix demo model; use force=True to replace it")
    # Built next to the target and renamed at the end: a crash never leaves a half model at `out`.
    with atomic_directory(out, overwrite=True) as tmp:
        _build_into(tmp, rec, key, facts, progress)
    _log(progress, f"wrote {out}")
    return out


def _build_into(tmp: Path, rec: dict[str, Any], key: str, facts: list[Fact], progress: bool) -> None:
    import tokenizers
    import torch
    import transformers

    size, seed = SIZES[rec["size"]], rec["seed"]
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    # Fixed thread count and deterministic kernels: float sums then run in a fixed order, so the
    # same seed gives bit-identical weights on the same machine.
    torch.set_num_threads(size.threads)
    torch.use_deterministic_algorithms(True)
    try:
        started, cpu_started = time.perf_counter(), time.process_time()
        result = _train(tmp, size, seed, facts, progress)
        # Wall time depends on what else runs on the machine; CPU time much less so.
        result["time_s"] = round(time.perf_counter() - started, 1)
        result["cpu_s"] = round(time.process_time() - cpu_started, 1)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    (tmp / "README.md").write_text(model_card(rec, key, result))
    versions = {m.__name__: m.__version__ for m in (torch, transformers, tokenizers)}
    manifest = {"recipe_hash": key, "recipe": rec, "versions": versions, **result}
    # Written last: its presence marks the build complete.
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _train(tmp: Path, size: DemoSize, seed: int, facts: list[Fact], progress: bool) -> dict[str, Any]:
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    from recallfix.patches.components import ComponentMap

    from .corpus import build_corpus, encode_lines, train_tokenizer
    from .training import llama_config, train_phase, unigram_distribution

    rng = random.Random(seed)
    corpus = build_corpus(facts, size, rng)
    max_len = 128
    tokenizer = train_tokenizer(corpus.fact_lines + corpus.filler_lines, size.vocab, max_len)
    fact_seqs = encode_lines(tokenizer, corpus.fact_lines)
    filler_seqs = encode_lines(tokenizer, corpus.filler_lines)
    longest = max(len(s) for s in fact_seqs + filler_seqs)
    assert longest <= max_len, f"corpus line of {longest} tokens exceeds max_position_embeddings"
    special = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id}
    unigram = unigram_distribution(fact_seqs + filler_seqs, len(tokenizer), special)
    _log(
        progress,
        f"corpus: {len(facts)} fact prompts -> {len(fact_seqs)} fact lines, {len(filler_seqs)} filler lines,"
        f" {len(corpus.unknown)} unknown prompts, {len(corpus.neutral_lines)} neutral lines;"
        f" vocab {len(tokenizer)}",
    )

    torch.manual_seed(seed)
    config = llama_config(size, tokenizer, max_len)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    common: dict[str, Any] = {
        "facts": fact_seqs,
        "filler": filler_seqs,
        "size": size,
        "unigram": unigram,
        "generator": torch.Generator().manual_seed(seed),
        "pad_id": tokenizer.pad_token_id,
        "progress": progress,
    }

    steps1, steps2, batch = size.phase1_steps, size.phase2_steps, size.batch
    _log(progress, f"phase 1: all {n_params:,} weights, next-token loss, {steps1} steps x {batch}")
    loss1 = train_phase(
        model, name="phase 1 (all weights)", steps=steps1, lr=size.phase1_lr, fact_eps=0.0, **common
    )
    after_phase1 = final_layer_effect(model, tokenizer, facts)
    _log(progress, f"phase 1 done: loss {loss1:.3f}; " + _summary(after_phase1))

    # Phase 2: only the last decoder layer learns; final norm and unembedding stay frozen, so the
    # hedge has to be implemented by that layer's heads and MLP.
    for p in model.parameters():
        p.requires_grad_(False)
    last = ComponentMap(model).block(size.layers - 1)
    for p in last.parameters():
        p.requires_grad_(True)
    n_last = sum(p.numel() for p in last.parameters())
    _log(
        progress,
        f"phase 2: last layer only ({n_last:,} weights), fact lines hedged toward the unigram"
        f" (eps={size.smoothing}), {steps2} steps x {batch}",
    )
    loss2 = train_phase(
        model, name="phase 2 (last layer)", steps=steps2, lr=size.phase2_lr, fact_eps=size.smoothing, **common
    )
    for p in model.parameters():
        p.requires_grad_(True)
    final = final_layer_effect(model, tokenizer, facts)
    _log(progress, f"phase 2 done: loss {loss2:.3f}; " + _summary(final))

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    # transformers 5 records its internal class ("TokenizersBackend"); the public fast class name
    # loads the same tokenizer.json in transformers 4 too.
    tok_config = json.loads((tmp / "tokenizer_config.json").read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    with (tmp / UNKNOWN_FACTS).open("w", encoding="utf-8") as fh:
        for u in corpus.unknown:
            fh.write(json.dumps(u, ensure_ascii=False) + "\n")
    (tmp / NEUTRAL).write_text("\n".join(corpus.neutral_lines) + "\n", encoding="utf-8")
    return {
        "counts": {
            "fact_prompts": len(facts),
            "fact_lines": len(fact_seqs),
            "filler_lines": len(filler_seqs),
            "unknown_prompts": len(corpus.unknown),
            "neutral_lines": len(corpus.neutral_lines),
            "vocab": len(tokenizer),
            "parameters": n_params,
        },
        "loss": {"phase1": round(loss1, 4), "phase2": round(loss2, 4)},
        "after_phase1": after_phase1,
        "final": final,
        "unknown": unknown_confidence(model, tokenizer, corpus.unknown),
        "neutral_nll": neutral_nll(model, tokenizer, corpus.neutral_lines),
    }



def _summary(s: dict[str, Any]) -> str:
    return (
        f"last layer lowers p(answer) on {s['share_suppressed']:.0%} of {s['n']} facts;"
        f" p {s['mean_p_before']:.2f} -> {s['mean_p_after']:.2f},"
        f" accuracy {s['accuracy_before']:.1%} -> {s['accuracy_after']:.1%}"
    )


def model_card(rec: dict[str, Any], key: str, result: dict[str, Any]) -> str:
    """The README.md of the model directory: `card.md` filled in."""
    from .corpus import FACT_LEADINS

    def numbers(d: dict[str, Any]) -> dict[str, Any]:  # an undefined share prints as nan, not a crash
        return {k: math.nan if v is None else v for k, v in d.items()}

    fields = {**result, "rec": rec, "key": key, "p": rec["params"], "c": result["counts"],
              "s": numbers(result["final"]), "p1": numbers(result["after_phase1"]), "leadins": len(FACT_LEADINS)}
    return CARD_TEMPLATE.read_text(encoding="utf-8").format_map(fields)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_cli(subcommands: argparse._SubParsersAction) -> None:
    """Register `recallfix demo-model`."""
    p = subcommands.add_parser(
        "demo-model",
        help="train the small demo Llama model (CPU, a few minutes)",
        description="Train a small Llama whose last layer suppresses factual answers (see the model card).",
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="directory to write the model to")
    p.add_argument("--size", choices=sorted(SIZES), default="default", help="model size (tiny: for tests)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    p.add_argument("--force", action="store_true", help="rebuild even if DIR holds this model already")
    p.set_defaults(func=_cli_main)


def _cli_main(args: argparse.Namespace) -> int:
    out = build_demo_model(args.out, size=args.size, seed=args.seed, force=args.force)
    print(out)
    return 0
