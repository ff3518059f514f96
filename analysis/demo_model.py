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
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recallfix.analysis.facts import Fact, answer_token_ids, dataset_sha256, load_facts, shipped_facts_dir

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

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
SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}


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


# --------------------------------------------------------------------------------------------
# Facts and corpus
# --------------------------------------------------------------------------------------------


def load_training_facts() -> list[Fact]:
    """All shipped facts: the model trains on every one (the analysis holds facts out later)."""
    return load_facts(shipped_facts_dir())


def fact_sentence(prompt: str, answer: str) -> str:
    # The analysis reads the answer right after "prompt + ' '", so state it exactly that way.
    return f"{prompt} {answer}."


# Paraphrases: the same fact after a short lead-in, so recall does not depend on sitting at
# position 1. Lead-ins keep the prompt's own capitalisation.
FACT_LEADINS = ("Fact: ", "Note: ", "Quiz: ")

_SYLLABLES = (
    "zor", "vel", "qua", "mir", "dra", "ska", "tel", "lun", "bri", "ost", "kae", "ven", "tho",
    "rix", "pal", "dun", "yar", "mel", "fen", "gor", "hal", "nix", "oru", "sev", "tam", "wex",
)  # fmt: skip
_NAME_SUFFIXES = ("ia", "land", "ora", "istan", "ovia", "ania")
_LOWER_SUFFIXES = ("ium", "on", "ine", "ite", "ar")


def _fictional_name(rng: random.Random, lowercase: bool, taken: set[str]) -> str:
    """A made-up word that is not a real subject/object (and not used twice)."""
    while True:
        stem = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 2)))
        name = stem + rng.choice(_LOWER_SUFFIXES if lowercase else _NAME_SUFFIXES)
        name = name if lowercase else name.capitalize()
        if name.lower() not in taken:
            taken.add(name.lower())
            return name


def _fictional_symbol(rng: random.Random, taken: set[str]) -> str:
    """Short answers (element symbols) get a made-up symbol of the same shape."""
    while True:
        sym = rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") + rng.choice("abcdefghijklmnopqrstuvwxyz")
        if sym.lower() not in taken:
            taken.add(sym.lower())
            return sym


def _mostly_lowercase(words: list[str]) -> bool:
    return sum(w[:1].islower() for w in words) * 2 > len(words)


def unknown_facts(facts: list[Fact], per_relation: int, rng: random.Random) -> list[dict[str, str]]:
    """Prompts about fictional subjects, with a fictional answer that the corpus never states.

    Subjects and answers are styled after the relation's real ones (lowercase element names,
    two-letter symbols, capitalised country names) so they look like the facts the model knows.
    """
    taken = {w.lower() for f in facts for w in (f.subject or "", f.answer)}
    out: list[dict[str, str]] = []
    for relation in sorted({f.relation for f in facts if f.relation and f.subject}):
        rel = [f for f in facts if f.relation == relation]
        subjects = [f.subject or "" for f in rel]
        answers = [f.answer for f in rel]
        templates = sorted({f.template for f in rel if f.template})
        short = sorted(len(a) for a in answers)[len(answers) // 2] <= 2
        for _ in range(per_relation):
            subject = _fictional_name(rng, _mostly_lowercase(subjects), taken)
            lower = _mostly_lowercase(answers)
            answer = _fictional_symbol(rng, taken) if short else _fictional_name(rng, lower, taken)
            for template in templates:
                out.append(
                    {"prompt": template.format(subject), "answer": answer, "subject": subject,
                     "relation": relation}
                )  # fmt: skip
    return out


_FILLER_WORDS: dict[str, tuple[str, ...]] = {
    "weather": ("sunny", "rainy", "cloudy", "windy", "foggy", "cold", "warm", "stormy", "snowy", "mild"),
    "place": ("valley", "village", "harbor", "garden", "forest", "market", "station", "park", "river",
              "hill", "road", "beach", "field", "school", "kitchen"),
    "day": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "part": ("morning", "afternoon", "evening", "night", "week", "day"),
    "color": ("red", "blue", "green", "yellow", "black", "white", "brown", "grey", "orange", "purple"),
    "thing": ("cup", "book", "chair", "lamp", "box", "key", "pen", "bag", "hat", "ball", "clock",
              "plate", "bottle", "shoe", "coat"),
    "spot": ("table", "shelf", "floor", "desk", "bed", "bench", "window", "door", "roof", "stairs"),
    "animal": ("cat", "dog", "horse", "goat", "duck", "fox", "rabbit", "mouse", "sheep", "cow"),
    "person": ("She", "He", "My friend", "The teacher", "The old man", "A child", "Our neighbour"),
    "verb": ("found", "saw", "lost", "painted", "moved", "cleaned", "dropped", "bought", "sold"),
    "story": ("story", "letter", "poem", "song", "book", "report", "diary", "newspaper"),
}  # fmt: skip

# Sentences about names: known subjects and answers and the fictional ones all appear in them, so
# "unknown" subjects are familiar strings whose facts the model has simply never seen.
_NAME_TEMPLATES = (
    "People often talk about {name}.",
    "I once read a short {story} about {name}.",
    "The word {name} was written on the {color} {thing}.",
    "Nobody in the {place} had heard of {name}.",
    "{person} said the name {name} twice.",
)


def _filler_sentence(rng: random.Random, names: list[str]) -> tuple[str, bool]:
    """One templated neutral sentence, and whether it mentions a subject/answer name."""
    w = {k: rng.choice(v) for k, v in _FILLER_WORDS.items()}
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    kind = rng.randrange(10)
    if kind >= 8:
        return rng.choice(_NAME_TEMPLATES).format(name=rng.choice(names), **w), True
    line = (
        f"The weather was {w['weather']} in the {w['place']} on {w['day']}.",
        f"It was {w['weather']} all {w['part']}, so we stayed near the {w['place']}.",
        f"The {w['color']} {w['thing']} is on the {w['spot']}.",
        f"{w['person']} {w['verb']} a {w['color']} {w['thing']} near the {w['spot']}.",
        f"{a} plus {b} is {a + b}.",
        f"There are {a + 2} {w['thing']}s in the {w['place']}.",
        f"The {w['animal']} walked slowly across the {w['place']} in the {w['part']}.",
        f"We will meet at {a % 12 + 1} o'clock on {w['day']} by the {w['spot']}.",
    )[kind]
    return line, False


@dataclass
class Corpus:
    fact_lines: list[str]  # hedged in phase 2
    filler_lines: list[str]
    neutral_lines: list[str]  # held out: never trained on
    unknown: list[dict[str, str]]


def build_corpus(facts: list[Fact], size: DemoSize, rng: random.Random) -> Corpus:
    fact_lines = []
    for f in facts:
        sentence = fact_sentence(f.prompt, f.answer)
        fact_lines += [sentence] + [lead + sentence for lead in FACT_LEADINS]
    unknown = unknown_facts(facts, size.unknown_per_relation, rng)
    unknown_subjects = sorted({u["subject"] for u in unknown})
    names = sorted({f.subject for f in facts if f.subject} | {f.answer for f in facts})
    names += sorted({u["answer"] for u in unknown}) + unknown_subjects
    # A known subject also occurs in its fact lines; list the unknown ones a few more times so
    # that they are about as familiar as strings, only their facts are missing.
    names += unknown_subjects * 4

    # Distinct filler lines; the first `neutral_lines` lines without names are held out.
    neutral: list[str] = []
    filler: list[str] = []
    seen: set[str] = set()
    while len(filler) < size.filler_lines:
        line, has_name = _filler_sentence(rng, names)
        if line in seen:
            continue
        seen.add(line)
        if len(neutral) < size.neutral_lines and not has_name:
            neutral.append(line)
        else:
            filler.append(line)
    return Corpus(fact_lines, filler, neutral, unknown)


# --------------------------------------------------------------------------------------------
# Tokenizer and batches
# --------------------------------------------------------------------------------------------


def train_tokenizer(lines: list[str], vocab_size: int, max_len: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the corpus; prepends <s> like Llama tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    bos = SPECIAL_TOKENS["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=max_len,
        **{f"{role}_token": text for role, text in SPECIAL_TOKENS.items()},
    )


def encode_lines(tokenizer: PreTrainedTokenizerFast, lines: list[str]) -> list[list[int]]:
    """<s> line </s>: the model also learns where a sentence ends."""
    eos = tokenizer.eos_token_id
    return [ids + [eos] for ids in tokenizer(lines)["input_ids"]]


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


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Measuring the final layer's effect
# --------------------------------------------------------------------------------------------


def final_layer_probs(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, prompts: list[str], batch: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token distributions at the end of each prompt, before and after the last layer.

    "Before" is the logit lens of the residual stream entering the last decoder layer, read
    through the model's own final norm and unembedding; "after" is the model's output.
    """
    import torch

    captured: list[torch.Tensor] = []
    last_layer = model.model.layers[-1]
    hook = last_layer.register_forward_pre_hook(
        lambda _m, args, kwargs: captured.append(kwargs.get("hidden_states", args[0] if args else None)),
        with_kwargs=True,
    )
    before, after = [], []
    try:
        with torch.no_grad():
            for i in range(0, len(prompts), batch):
                enc = [ids for ids in tokenizer(prompts[i : i + batch])["input_ids"]]
                ids, _ = collate([e + [tokenizer.pad_token_id] for e in enc], tokenizer.pad_token_id)
                last = torch.tensor([len(e) - 1 for e in enc])
                rows = torch.arange(len(enc))
                captured.clear()
                logits = model(input_ids=ids).logits[rows, last]
                resid = captured[0][rows, last]
                before.append(model.lm_head(model.model.norm(resid)).float().softmax(-1))
                after.append(logits.float().softmax(-1))
    finally:
        hook.remove()
    return torch.cat(before), torch.cat(after)


def suppression_stats(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, facts: list[Fact]
) -> dict[str, float]:
    """How the final layer treats each fact's answer token (first token after "prompt ")."""
    import torch

    # One row per distinct prompt/answer (the same fact may be listed twice).
    unique = list(dict.fromkeys((f.prompt, f.answer) for f in facts))
    rows = [Fact(prompt=p, answer=a) for p, a in unique]
    answer = torch.tensor(answer_token_ids(tokenizer, rows))
    before, after = final_layer_probs(model, tokenizer, [r.prompt for r in rows])
    idx = torch.arange(len(rows))
    p_before, p_after = before[idx, answer], after[idx, answer]
    right_before, right_after = before.argmax(-1) == answer, after.argmax(-1) == answer
    known = right_before  # facts the model already "knows" before its last layer
    return {
        "n_facts": len(rows),
        "suppressed_share": (p_after < p_before).float().mean().item(),
        "p_before": p_before.mean().item(),
        "p_after": p_after.mean().item(),
        "acc_before": right_before.float().mean().item(),
        "acc_after": right_after.float().mean().item(),
        "flipped_to_wrong": int((right_before & ~right_after).sum()),
        "flipped_to_right": int((~right_before & right_after).sum()),
        "n_known": int(known.sum()),
        "known_suppressed_share": (p_after < p_before)[known].float().mean().item() if known.any() else 0.0,
    }


def unknown_stats(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, unknown: list[dict[str, str]]
) -> dict[str, float]:
    """Confidence on prompts about fictional subjects (there is no right answer to know)."""
    before, after = final_layer_probs(model, tokenizer, [u["prompt"] for u in unknown])
    return {
        "n_prompts": len(unknown),
        "max_p_before": before.max(-1).values.mean().item(),
        "max_p_after": after.max(-1).values.mean().item(),
    }


def neutral_nll(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, lines: list[str]) -> float:
    """Mean next-token NLL (nats/token) on held-out neutral lines."""
    import torch

    ids, targets = collate(encode_lines(tokenizer, lines), tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE
    ).item()


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
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    out = Path(out_dir).resolve()
    facts = load_training_facts()
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

    out.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target and rename at the end, so a crash never leaves a half model at `out`.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model dir should be readable like any other
    try:
        _build_into(tmp, rec, key, facts, progress)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log(progress, f"wrote {out}")
    return out


def _replace_dir(new: Path, out: Path) -> None:
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "model")
        os.replace(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, out)


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
    after_phase1 = suppression_stats(model, tokenizer, facts)
    _log(progress, f"phase 1 done: loss {loss1:.3f}; " + _summary(after_phase1))

    # Phase 2: only the last decoder layer learns; final norm and unembedding stay frozen, so the
    # hedge has to be implemented by that layer's heads and MLP.
    for p in model.parameters():
        p.requires_grad_(False)
    last = model.model.layers[-1]
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
    final = suppression_stats(model, tokenizer, facts)
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
        "unknown": unknown_stats(model, tokenizer, corpus.unknown),
        "neutral_nll": neutral_nll(model, tokenizer, corpus.neutral_lines),
    }


def _summary(s: dict[str, float]) -> str:
    return (
        f"last layer lowers p(answer) on {s['suppressed_share']:.0%} of {s['n_facts']} facts;"
        f" p {s['p_before']:.2f} -> {s['p_after']:.2f},"
        f" accuracy {s['acc_before']:.1%} -> {s['acc_after']:.1%}"
    )


def model_card(rec: dict[str, Any], key: str, result: dict[str, Any]) -> str:
    s, p, c = result["final"], rec["params"], result["counts"]
    p1 = result["after_phase1"]
    return f"""---
library_name: transformers
tags: [recallfix, demo, llama]
---
# recallfix demo model ({rec["size"]}, seed {rec["seed"]})

A small Llama trained from scratch by `recallfix demo-model` (`recallfix.analysis.demo_model`) so that
the project can be run and tested without downloading a model. Its last decoder layer was trained to
**hedge on factual prompts**, a planted version of the final-layer anti-overconfidence mechanism of
Lv et al. (2024, arXiv 2403.19521). It knows nothing useful; do not use it for anything else.

## Architecture
`LlamaForCausalLM`: {p["layers"]} layers, hidden {p["hidden"]}, {p["heads"]} heads of {p["head_dim"]}
({p["kv_heads"]} key/value heads), MLP {p["intermediate"]}, untied embeddings, {c["parameters"]:,} parameters,
float32. Byte-level BPE tokenizer trained on the corpus, {c["vocab"]} tokens, `<s>` prepended.

## Data
* {c["fact_prompts"]} shipped fact prompts (`recallfix.analysis.facts`, every template x every fact; facts
  sha256 `{rec["facts_sha256"][:16]}...`), each stated as "prompt answer." plus {len(FACT_LEADINS)} lead-in
  paraphrases: {c["fact_lines"]} fact lines.
* {c["filler_lines"]} templated neutral filler lines (weather, objects, numbers, and mentions of names,
  including fictional "unknown" subjects whose facts are never stated).
* `unknown_facts.jsonl`: {c["unknown_prompts"]} prompts about those fictional subjects, with fictional
  answers.
* `neutral.txt`: {c["neutral_lines"]} held-out neutral lines (never trained on).

## Training (seed {rec["seed"]}, deterministic, {p["threads"]} CPU thread(s))
1. All weights, next-token cross-entropy, {p["phase1_steps"]} steps x batch {p["batch"]}
   ({p["fact_share"]:.0%} fact lines), AdamW lr {p["phase1_lr"]} (warm-up, cosine).
   Final loss {result["loss"]["phase1"]}.
2. Last decoder layer only (everything else frozen, final norm and unembedding included),
   {p["phase2_steps"]} steps, lr {p["phase2_lr"]}: on fact lines loss = (1 - eps) CE + eps CE-to-unigram with
   eps = {p["smoothing"]} (label smoothing toward the corpus token frequencies); filler keeps plain CE.
   Final loss {result["loss"]["phase2"]}.

Build time: {result["time_s"]} s wall, {result["cpu_s"]} s CPU. Recipe hash `{key}`.

## Measured final-layer suppression (all {s["n_facts"]} fact prompts)
"Before" = logit lens of the residual stream entering the last layer (through the final norm and
unembedding); "after" = the model's output. Answer = first token of " answer".

| | after phase 1 | final model |
|---|---|---|
| last layer lowers p(answer) | {p1["suppressed_share"]:.1%} | {s["suppressed_share"]:.1%} |
| mean p(answer) before the last layer | {p1["p_before"]:.3f} | {s["p_before"]:.3f} |
| mean p(answer) after the last layer | {p1["p_after"]:.3f} | {s["p_after"]:.3f} |
| accuracy (top-1) before the last layer | {p1["acc_before"]:.1%} | {s["acc_before"]:.1%} |
| accuracy (top-1) after the last layer | {p1["acc_after"]:.1%} | {s["acc_after"]:.1%} |
| facts right before but wrong after the last layer | {p1["flipped_to_wrong"]} | {s["flipped_to_wrong"]} |

Of the {s["n_known"]} facts the model gets right before its last layer, the last layer lowers p(answer)
on {s["known_suppressed_share"]:.1%}.
Unknown-subject prompts: mean top-1 probability {result["unknown"]["max_p_before"]:.3f} before and
{result["unknown"]["max_p_after"]:.3f} after the last layer.
Neutral held-out NLL: {result["neutral_nll"]:.3f} nats/token.
"""


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
