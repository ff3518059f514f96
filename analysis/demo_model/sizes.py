"""The demo model's sizes: everything about a size that changes the trained model (all of it is in the cache key).

`default` is what `recallfix demo --model demo` builds; `tiny` is the tests' fast fixture.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DemoSize:
    """Everything about a size that changes the result (all of it goes into the cache key)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int  # < heads means grouped-query attention
    head_dim: int  # 32 or 64: what vLLM's CPU attention supports
    intermediate: int
    vocab: int  # BPE vocabulary size target
    batch: int
    phase1_steps: int
    phase1_lr: float
    phase2_steps: int
    phase2_lr: float
    smoothing: float  # eps of the phase-2 hedge toward the unigram distribution
    fact_share: float  # share of each batch that is fact sentences (rest is filler)
    filler_lines: int  # distinct filler sentences in the training corpus
    neutral_lines: int  # held-out neutral lines written to neutral.txt
    unknown_per_relation: int  # fictional subjects per relation
    # CPU threads. Float sums depend on it, so it is part of the recipe. The tiny size (tests, which run
    # next to other work) uses one: on a busy machine a second OpenMP thread mostly spins and slows down.
    threads: int


SIZES: dict[str, DemoSize] = {
    "default": DemoSize(
        hidden=192, layers=4, heads=6, kv_heads=2, head_dim=32, intermediate=512, vocab=2048,
        batch=64, phase1_steps=900, phase1_lr=3e-3, phase2_steps=250, phase2_lr=1e-3,
        smoothing=0.6, fact_share=0.6, filler_lines=6000, neutral_lines=300, unknown_per_relation=8,
        threads=2,
    ),
    "tiny": DemoSize(
        hidden=64, layers=2, heads=2, kv_heads=1, head_dim=32, intermediate=192, vocab=1024,
        batch=32, phase1_steps=400, phase1_lr=5e-3, phase2_steps=150, phase2_lr=2e-3,
        smoothing=0.6, fact_share=0.6, filler_lines=1500, neutral_lines=100, unknown_per_relation=3,
        threads=1,
    ),
}  # fmt: skip
