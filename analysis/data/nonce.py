"""Made-up words, and nonce-subject prompts: the training templates filled with subjects the relation
has no answer for.

Two kinds of nonce subject, half each: invented names (random syllables: strings the model has never
seen) and borrowed names (subjects and answers of *other* relations: familiar strings, but "the capital
of mammals" has no answer). Whatever the final layer does on such prompts is what it does when the model
cannot know. The fit keeps the patched model's next-token distribution there close to the base model's
(a KL guard with a budget on the top-1 probability), so that undoing the suppression on known facts does
not make the model more confident where it knows nothing. Only training (or dev) facts are used; the
unknown-subject evaluation set is never looked at.

The demo model's unknown subjects (`demo_model.corpus`) are made-up words too, shaped after the relation's
real names (`name_like`, `symbol_like`); every made-up word is drawn `fresh`: never a real name, never
twice.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from functools import partial

from .facts import Fact

_SYLLABLES = (
    "zor", "vel", "qua", "mir", "dra", "ska", "tel", "lun", "bri", "ost", "kae", "ven", "tho",
    "rix", "pal", "dun", "yar", "mel", "fen", "gor", "hal", "nix", "oru", "sev", "tam", "wex",
)  # fmt: skip
_NAME_SUFFIXES = ("ia", "land", "ora", "istan", "ovia", "ania")
_LOWER_SUFFIXES = ("ium", "on", "ine", "ite", "ar")
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "st", "gr", "pl")
_VOWELS = ("a", "e", "i", "o", "u")


def nonce_word(rng: random.Random, capitalize: bool) -> str:
    """Two or three consonant-vowel syllables, optionally a final consonant."""
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3)))
    if rng.random() < 0.5:
        word += rng.choice(("n", "r", "s", "l"))
    return word.capitalize() if capitalize else word


def name_like(rng: random.Random, lowercase: bool) -> str:
    """One or two syllables and a suffix: a country-like name ("Zorvelia"), or lowercase an element-like one."""
    stem = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 2)))
    if lowercase:
        return stem + rng.choice(_LOWER_SUFFIXES)
    return (stem + rng.choice(_NAME_SUFFIXES)).capitalize()


def symbol_like(rng: random.Random) -> str:
    """An uppercase and a lowercase letter: the shape of an element symbol."""
    return rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") + rng.choice("abcdefghijklmnopqrstuvwxyz")


def fresh(draw: Callable[[], str], taken: set[str]) -> str:
    """The first word from `draw` that is not in `taken` (compared lowercase), which then records it."""
    while True:
        word = draw()
        if word.lower() not in taken:
            taken.add(word.lower())
            return word


def nonce_facts(facts: Sequence[Fact], per_template: int, seed: int, *, borrow: bool = True) -> list[Fact]:
    """Each distinct (relation, template) of `facts` filled with `per_template` nonce subjects: invented
    names (capitalised when most of the relation's subjects are; never a real subject or answer) and, when
    there are other relations and `borrow`, names borrowed from them, alternately. The answer field is empty: there is
    none (these prompts are only ever guarded, never fitted)."""
    if per_template <= 0:
        return []
    rng = random.Random(seed)
    taken = {w.lower() for f in facts for w in (f.subject or "", f.answer)}
    templates: dict[tuple[str | None, str], list[Fact]] = {}
    for f in facts:
        if f.template and f.subject:
            templates.setdefault((f.relation, f.template), []).append(f)
    names_of: dict[str | None, set[str]] = {}
    for f in facts:
        names_of.setdefault(f.relation, set()).update(n for n in (f.subject, f.answer) if n)
    out = []
    for (relation, template), members in sorted(templates.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        capitalize = sum(m.subject[:1].isupper() for m in members if m.subject) * 2 >= len(members)
        own = {n.lower() for n in names_of[relation]}
        borrowed = sorted({n for r, names in names_of.items() if r != relation for n in names
                           if n.lower() not in own})
        for k in range(per_template):
            if borrow and k % 2 == 1 and borrowed:
                subject = rng.choice(borrowed)
            else:
                subject = fresh(partial(nonce_word, rng, capitalize), taken)
            out.append(Fact(prompt=template.format(subject), answer="", subject=subject, relation=relation,
                            template=template))
    return out
