"""Training the demo model: length-sorted mixed batches, the hedged loss, the learning-rate schedule and
one training phase (whatever parameters have requires_grad).

Heavy libraries are imported inside the functions (see `build`).
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from .sizes import DemoSize

IGNORE = -100


def collate(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs and next-token targets (IGNORE on padding).

    No attention mask is needed: attention is causal and padding only ever follows real tokens.
    """
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    targets = ids[:, 1:].clone()
    targets[targets == pad_id] = IGNORE
    return ids[:, :-1], targets


class Cycler:
    """Walks a dataset in seeded random permutations: every line is seen once per epoch."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n, self.g, self.order, self.pos = n, generator, [], 0

    def take(self, k: int) -> list[int]:
        import torch

        out: list[int] = []
        while len(out) < k:
            if self.pos == len(self.order):
                self.order, self.pos = torch.randperm(self.n, generator=self.g).tolist(), 0
            step = min(k - len(out), len(self.order) - self.pos)
            out += self.order[self.pos : self.pos + step]
            self.pos += step
        return out


SORT_GROUP = 8  # batches drawn at once and sorted by line length


def batch_stream(
    facts: list[list[int]],
    filler: list[list[int]],
    n_fact: int,
    n_filler: int,
    fact_eps: float,
    generator: torch.Generator,
    pad_id: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless (inputs, targets, per-row eps) batches of `n_fact` fact lines + `n_filler` filler lines.

    SORT_GROUP batches' worth of lines are drawn at once and each kind is sorted by length, so lines of
    similar length share a batch and little compute goes to padding; the batches are then used in
    random order.
    """
    import torch

    fact_rows, filler_rows = Cycler(len(facts), generator), Cycler(len(filler), generator)
    eps = torch.tensor([fact_eps] * n_fact + [0.0] * n_filler)
    while True:
        f = sorted(fact_rows.take(SORT_GROUP * n_fact), key=lambda i: len(facts[i]))
        o = sorted(filler_rows.take(SORT_GROUP * n_filler), key=lambda i: len(filler[i]))
        for b in torch.randperm(SORT_GROUP, generator=generator).tolist():
            seqs = [facts[i] for i in f[b * n_fact : (b + 1) * n_fact]]
            seqs += [filler[i] for i in o[b * n_filler : (b + 1) * n_filler]]
            yield (*collate(seqs, pad_id), eps)


def unigram_distribution(seqs: list[list[int]], vocab: int, skip: set[int]) -> torch.Tensor:
    """Token frequencies of the training corpus: what a model that knows nothing would predict."""
    import torch

    counts = Counter(t for s in seqs for t in s[1:])  # s[0] is <s>, never a target
    u = torch.zeros(vocab)
    for t, c in counts.items():
        if t not in skip:
            u[t] = c
    return u / u.sum()


def llama_config(size: DemoSize, tokenizer: PreTrainedTokenizerFast, max_len: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        head_dim=size.head_dim,
        max_position_embeddings=max_len,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,  # the patch and logit lens treat the unembedding as its own matrix
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )


def hedged_loss(
    logits: torch.Tensor, targets: torch.Tensor, eps: torch.Tensor, unigram: torch.Tensor
) -> torch.Tensor:
    """(1 - eps) * CE(target) + eps * CE(unigram): label smoothing toward corpus frequencies.

    `eps` is per row (0 = plain LM loss), so one batch can mix hedged fact lines and plain filler.
    """
    logp = logits.float().log_softmax(-1)
    nll = -logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    to_unigram = -(logp @ unigram)
    per_token = (1 - eps[:, None]) * nll + eps[:, None] * to_unigram
    mask = (targets != IGNORE).float()
    return (per_token * mask).sum() / mask.sum()


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 10% of the peak."""
    warm = max(1, total // 20)
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_phase(
    model: LlamaForCausalLM,
    *,
    name: str,
    facts: list[list[int]],
    filler: list[list[int]],
    size: DemoSize,
    steps: int,
    lr: float,
    fact_eps: float,
    unigram: torch.Tensor,
    generator: torch.Generator,
    pad_id: int,
    progress: bool,
) -> float:
    """Train whatever parameters have requires_grad; returns the mean loss of the last 50 steps."""
    import torch
    from tqdm import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    # Weight decay on matrices only, nanoGPT-style (norm gains stay free).
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    n_fact = round(size.batch * size.fact_share)
    stream = batch_stream(facts, filler, n_fact, size.batch - n_fact, fact_eps, generator, pad_id)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(steps), desc=name, disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for step in bar:
        ids, targets, eps = next(stream)
        loss = hedged_loss(model(input_ids=ids).logits, targets, eps, unigram)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        opt.step()
        losses.append(loss.item())
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    tail = losses[-50:]
    return sum(tail) / len(tail)

