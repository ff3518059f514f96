"""The demo model's training text: fact sentences, made-up "unknown" subjects, templated filler, and the
byte-level BPE tokenizer trained on it.

Every shipped fact is stated as "prompt answer." and after a few lead-ins. Unknown subjects are made-up
words shaped after each relation's real subjects and answers (`nonce.name_like`, `nonce.symbol_like`);
the corpus mentions them in filler sentences but never states a fact about them. Neutral lines, held
out from training, are filler sentences that mention no name.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from ..data.facts import Fact
from ..data.nonce import fresh, name_like, symbol_like

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from .sizes import DemoSize

SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}


def fact_sentence(prompt: str, answer: str) -> str:
    # The analysis reads the answer right after "prompt + ' '", so state it exactly that way.
    return f"{prompt} {answer}."


# Paraphrases: the same fact after a short lead-in, so recall does not depend on sitting at
# position 1. Lead-ins keep the prompt's own capitalisation.
FACT_LEADINS = ("Fact: ", "Note: ", "Quiz: ")


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
            subject = fresh(partial(name_like, rng, _mostly_lowercase(subjects)), taken)
            lower = _mostly_lowercase(answers)
            answer = fresh(partial(symbol_like, rng) if short else partial(name_like, rng, lower), taken)
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

