"""Tests for the shipped facts set and its loader (recallfix.analysis.data.facts)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from recallfix.analysis.data.facts import (
    SPLITS,
    AnswerTokenError,
    Fact,
    FactsFormatError,
    answer_token_id,
    answer_token_ids,
    assign_splits,
    dataset_sha256,
    load_facts,
    load_shipped_facts,
    read_facts,
    save_facts_jsonl,
    shipped_facts_dir,
)

# ------------------------------------------------------------------------------------------------
# The shipped set
# ------------------------------------------------------------------------------------------------


def _shipped_relation_docs() -> dict[str, dict]:
    return {
        p.name: json.loads(p.read_text(encoding="utf-8")) for p in sorted(shipped_facts_dir().glob("*.json"))
    }


def test_shipped_set_size_and_shape() -> None:
    docs = _shipped_relation_docs()
    assert len(docs) >= 6
    names = [d["name"] for d in docs.values()]
    assert len(set(names)) == len(names), "relation names must be unique"
    total = 0
    for fname, d in docs.items():
        assert 2 <= len(d["prompt_templates"]) <= 3, fname
        for t in d["prompt_templates"]:
            assert t.count("{}") == 1 and t == t.rstrip(), (fname, t)
        subjects = [s["subject"] for s in d["samples"]]
        dupes = [s for s, c in Counter(subjects).items() if c > 1]
        assert not dupes, f"{fname}: duplicate subjects {dupes}"
        assert len(subjects) >= 40, fname
        total += len(subjects)
    assert total >= 600


def test_shipped_set_loads_consistently() -> None:
    facts = load_shipped_facts()
    docs = _shipped_relation_docs()
    assert len(facts) == sum(len(d["samples"]) * len(d["prompt_templates"]) for d in docs.values())
    pairs = {(f.relation, f.subject) for f in facts}
    assert len(pairs) >= 600
    assert len({f.relation for f in facts}) >= 6
    # One prompt must never ask for two different answers (e.g. "The capital of Georgia is").
    answers_by_prompt: dict[str, set[str]] = defaultdict(set)
    for f in facts:
        answers_by_prompt[f.prompt].add(f.answer)
        assert f.template is not None and f.prompt == f.template.format(f.subject)
        assert f.split is None
    ambiguous = {p: a for p, a in answers_by_prompt.items() if len(a) > 1}
    assert not ambiguous
    # Spot-check some well-known facts, so a shifted column would be caught.
    known = {
        ("country capital", "France"): "Paris",
        ("country capital", "Japan"): "Tokyo",
        ("element symbol", "gold"): "Au",
        ("element symbol", "sodium"): "Na",
        ("country currency", "Japan"): "yen",
        ("country continent", "Brazil"): "South America",
        ("US state capital", "Texas"): "Austin",
    }
    by_pair = {(f.relation, f.subject): f.answer for f in facts}
    for pair, answer in known.items():
        assert by_pair[pair] == answer, pair


def test_shipped_set_order_is_deterministic() -> None:
    assert dataset_sha256(load_shipped_facts()) == dataset_sha256(load_shipped_facts())


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------

RELATION = {
    "name": "country capital",
    "prompt_templates": ["The capital of {} is", "{}'s capital city is"],
    "samples": [{"subject": "France", "object": "Paris"}, {"subject": "Japan", "object": "Tokyo"}],
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_load_jsonl(tmp_path: Path) -> None:
    p = _write(
        tmp_path / "facts.jsonl",
        '{"prompt": "The capital of France is", "answer": "Paris", "subject": "France",'
        ' "relation": "capital", "split": "test"}\n'
        "\n"
        '{"prompt": "Water is made of hydrogen and", "answer": "oxygen", "extra": 1}\n',
    )
    facts = load_facts(p)
    assert facts == [
        Fact("The capital of France is", "Paris", "France", "capital", "test", None),
        Fact("Water is made of hydrogen and", "oxygen"),
    ]
    assert load_facts(str(p)) == facts  # str paths work too


def test_load_relation_file(tmp_path: Path) -> None:
    p = _write(tmp_path / "capital.json", json.dumps(RELATION))
    facts = load_facts(p)
    assert [(f.prompt, f.answer) for f in facts] == [
        ("The capital of France is", "Paris"),
        ("France's capital city is", "Paris"),
        ("The capital of Japan is", "Tokyo"),
        ("Japan's capital city is", "Tokyo"),
    ]
    assert {f.relation for f in facts} == {"country capital"}
    assert facts[1].template == "{}'s capital city is" and facts[1].subject == "France"


def test_load_folder_sorted_and_mixed(tmp_path: Path) -> None:
    _write(tmp_path / "b_capital.json", json.dumps(RELATION))
    _write(tmp_path / "a_extra.jsonl", '{"prompt": "One plus one is", "answer": "two"}\n')
    _write(tmp_path / "README.txt", "not facts")
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub" / "ignored.jsonl", '{"prompt": "x", "answer": "y"}\n')
    facts = load_facts(tmp_path)
    assert len(facts) == 1 + 4
    assert facts[0].prompt == "One plus one is"  # a_extra.jsonl sorts first
    assert facts[1].relation == "country capital"


def test_save_roundtrip(tmp_path: Path) -> None:
    facts = assign_splits(load_facts(_write(tmp_path / "r.json", json.dumps(RELATION))))
    out = tmp_path / "out.jsonl"
    save_facts_jsonl(facts, out)
    assert load_facts(out) == facts


def _rel(**changes: object) -> str:
    doc = json.loads(json.dumps(RELATION))
    doc.update(changes)
    return json.dumps(doc, indent=1)


JSONL_ERRORS = [
    # (content, expected fragments after the file name)
    ('{"prompt": "a", "answer": "b"}\n{"prompt": "a", "answer": }\n', [":2:", "invalid JSON"]),
    ('{"prompt": "a"}\n', [":1:", "'answer'", "missing"]),
    ('{"prompt": "a", "answer": "b"}\n{"prompt": "a", "answer": ""}\n', [":2:", "'answer'", "non-empty"]),
    ('{"prompt": "a", "answer": "   "}\n', [":1:", "'answer'", "non-empty"]),
    ('{"prompt": "a", "answer": 3}\n', [":1:", "'answer'", "int"]),
    ('{"prompt": ["a"], "answer": "b"}\n', [":1:", "'prompt'", "list"]),
    ('{"prompt": "a", "answer": "b", "subject": 7}\n', [":1:", "'subject'", "int"]),
    ('{"prompt": "a", "answer": "b", "subject": " \\t "}\n', [":1:", "'subject'", "non-empty"]),
    ('{"prompt": "a", "answer": "x\\\\ud800"}\n', [":1:", "'answer'", "escape"]),
    ('\n\n{"prompt": "a", "answer": "b", "split": "validation"}\n', [":3:", "'split'", "validation"]),
    ('["a", "b"]\n', [":1:", "JSON object"]),
    ("\n\n", ["empty"]),
]


@pytest.mark.parametrize(("content", "fragments"), JSONL_ERRORS)
def test_jsonl_errors_name_file_line_field(tmp_path: Path, content: str, fragments: list[str]) -> None:
    p = _write(tmp_path / "facts.jsonl", content)
    with pytest.raises(FactsFormatError) as exc:
        load_facts(p)
    msg = str(exc.value)
    assert msg.startswith(f"{p}"), msg
    assert "facts.jsonl" in msg
    for frag in fragments:
        assert frag in msg, (frag, msg)


RELATION_ERRORS = [
    ('{\n "name": "x",\n "samples": [,]\n}', [":3:", "invalid JSON"]),
    (_rel(prompt_templates=["The capital of {} is", "Capital:"]), ["prompt_templates[1]", "'{}'"]),
    (_rel(prompt_templates=["{} and {} is"]), ["prompt_templates[0]", "exactly one"]),
    (_rel(prompt_templates=["   "]), ["prompt_templates[0]", "non-empty"]),
    (_rel(prompt_templates=[]), ["'prompt_templates'"]),
    (_rel(name=""), ["'name'", "non-empty"]),
    (_rel(samples=[]), ["'samples'", "non-empty"]),
    (
        _rel(samples=[{"subject": "France", "object": "Paris"}, {"subject": "Japan"}]),
        ["samples[1]", "'object'"],
    ),
    (_rel(samples=[{"subject": 5, "object": "Paris"}]), ["samples[0]", "'subject'", "int"]),
    (_rel(samples=[{"subject": "France", "object": " "}]), ["samples[0]", "'object'", "non-empty"]),
    (_rel(samples=[{"subject": "France", "object": "Paris", "split": "val"}]), ["samples[0]", "'split'"]),
    (_rel(samples=["France"]), ["samples[0]", "JSON object"]),
    ("[1, 2]", ["relation object"]),
    ("", ["empty"]),
]


@pytest.mark.parametrize(("content", "fragments"), RELATION_ERRORS)
def test_relation_errors_name_file_path_field(tmp_path: Path, content: str, fragments: list[str]) -> None:
    p = _write(tmp_path / "rel.json", content)
    with pytest.raises(FactsFormatError) as exc:
        load_facts(p)
    msg = str(exc.value)
    assert msg.startswith(f"{p}"), msg
    for frag in fragments:
        assert frag in msg, (frag, msg)


# Surrounding whitespace used to be refused (the cases above once listed these three as errors); the reader now
# strips it, counts it and says so in one warning line per file (`data.clean`).
STRIPPED = [  # file name, content, the facts read, samples in the file
    ("facts.jsonl", '{"prompt": "a ", "answer": "b"}\n', [Fact("a", "b")], 1),
    ("facts.jsonl", '{"prompt": "a", "answer": " b"}\n', [Fact("a", "b")], 1),
    ("rel.json", _rel(prompt_templates=["The capital of {} is "]),
     [Fact("The capital of France is", "Paris", "France", "country capital", None, "The capital of {} is"),
      Fact("The capital of Japan is", "Tokyo", "Japan", "country capital", None, "The capital of {} is")], 2),
]


@pytest.mark.parametrize(("name", "content", "expected", "samples"), STRIPPED)
def test_surrounding_whitespace_is_stripped_counted_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                               name: str, content: str, expected: list[Fact],
                                                               samples: int) -> None:
    p = _write(tmp_path / name, content)
    with caplog.at_level(logging.WARNING, logger="recallfix.analysis.data.facts"):
        read = read_facts(p)
    assert read.facts == expected
    (cleaning,) = read.cleaning
    assert (cleaning.file, cleaning.whitespace, cleaning.duplicates, cleaning.ambiguous) == (name, 1, 0, 0)
    assert [r.getMessage() for r in caplog.records] == [
        f"{p}: normalised: 1 value(s) stripped of surrounding whitespace ({samples} of {samples} samples kept)"]


def test_error_in_folder_names_the_bad_file(tmp_path: Path) -> None:
    _write(tmp_path / "a.json", json.dumps(RELATION))
    _write(tmp_path / "b.jsonl", '{"prompt": "ok", "answer": "fine"}\n{"prompt": "x", "answer": null}\n')
    with pytest.raises(FactsFormatError, match=r"b\.jsonl:2: missing required field 'answer'"):
        load_facts(tmp_path)


def test_path_errors(tmp_path: Path) -> None:
    with pytest.raises(FactsFormatError, match="no such file"):
        load_facts(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty"
    empty.mkdir()
    _write(empty / "notes.txt", "hello")
    with pytest.raises(FactsFormatError, match="no .json or .jsonl"):
        load_facts(empty)
    with pytest.raises(FactsFormatError, match="unsupported file type"):
        load_facts(empty / "notes.txt")
    assert issubclass(FactsFormatError, ValueError)


# ------------------------------------------------------------------------------------------------
# Splits and hashing
# ------------------------------------------------------------------------------------------------


def _group_splits(facts: list[Fact]) -> dict[tuple[str | None, str | None], set[str | None]]:
    groups: dict[tuple[str | None, str | None], set[str | None]] = defaultdict(set)
    for f in facts:
        groups[(f.relation, f.subject)].add(f.split)
    return groups


def test_splits_deterministic_no_leakage_and_proportional() -> None:
    facts = load_shipped_facts()
    a = assign_splits(facts)
    assert a == assign_splits(facts)
    assert [(f.prompt, f.answer) for f in a] == [(f.prompt, f.answer) for f in facts]  # order kept
    groups = _group_splits(a)
    assert all(len(s) == 1 for s in groups.values()), "a (relation, subject) crosses splits"
    assert {next(iter(s)) for s in groups.values()} == set(SPLITS)
    # Per relation, subjects are split 60/20/20 up to rounding.
    by_rel: dict[str | None, Counter[str | None]] = defaultdict(Counter)
    for (rel, _), s in groups.items():
        by_rel[rel][next(iter(s))] += 1
    for rel, counts in by_rel.items():
        n = sum(counts.values())
        for split, frac in zip(SPLITS, (0.6, 0.2, 0.2), strict=True):
            assert abs(counts[split] - frac * n) <= 1, (rel, counts)
    b = assign_splits(facts, seed=1)
    assert a != b
    assert _group_splits(b).keys() == groups.keys()


def test_split_fractions_argument() -> None:
    facts = load_shipped_facts()
    groups = _group_splits(assign_splits(facts, fractions=(0.5, 0.0, 0.5)))
    counts = Counter(next(iter(s)) for s in groups.values())
    assert counts["dev"] == 0
    assert abs(counts["train"] - counts["test"]) <= len({f.relation for f in facts})
    with pytest.raises(ValueError):
        assign_splits(facts, fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError):
        assign_splits(facts, fractions=(1.0, 0.0))


def test_explicit_split_kept_and_followed() -> None:
    facts = [
        Fact("The capital of France is", "Paris", "France", "capital", "test", "The capital of {} is"),
        Fact("France's capital is", "Paris", "France", "capital", None, "{}'s capital is"),
        Fact("One plus one is", "two", None, None, "dev"),
    ] + [Fact(f"Q{i} is", f"A{i}", f"S{i}", "capital") for i in range(20)]
    out = assign_splits(facts, seed=3)
    assert out[0].split == "test" and out[1].split == "test"  # the group follows its explicit split
    assert out[2] == facts[2]
    assert all(f.split in SPLITS for f in out)


def test_splits_independent_of_python_hash_seed() -> None:
    code = (
        "from recallfix.analysis.data.facts import *;"
        "print(dataset_sha256(assign_splits(load_shipped_facts(), seed=7)))"
    )
    expected = dataset_sha256(assign_splits(load_shipped_facts(), seed=7))
    for hash_seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        res = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert res.stdout.strip() == expected


def test_dataset_sha256() -> None:
    facts = [Fact("a is", "b", "a", "r"), Fact("c is", "d", "c", "r")]
    h = dataset_sha256(facts)
    assert len(h) == 64 and int(h, 16) >= 0
    assert dataset_sha256(list(facts)) == h
    assert dataset_sha256(facts[::-1]) != h
    assert dataset_sha256([facts[0], Fact("c is", "e", "c", "r")]) != h
    assert dataset_sha256(assign_splits(facts)) != h


# ------------------------------------------------------------------------------------------------
# Answer tokens, with a real (tiny, locally trained) tokenizer
# ------------------------------------------------------------------------------------------------

CORPUS = [
    "The capital of France is Paris.",
    "Paris is a large city.",
    "The capital of Japan is Tokyo.",
    "Tokyo is a large city.",
    "The capital of Italy is Rome.",
    "The chemical symbol of gold is Au.",
] * 20


def _train_tokenizer(*, split_words: bool, vocab_size: int = 400):  # -> PreTrainedTokenizerFast
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split_words)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    # Like many real models, add BOS/EOS by default: answer_token_id must not be fooled by them.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))],
    )
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def test_answer_token_handles_leading_space() -> None:
    tok = _train_tokenizer(split_words=True)
    with_space = tok.convert_tokens_to_ids("ĠParis")
    without_space = tok.convert_tokens_to_ids("Paris")
    assert tok.unk_token_id not in (with_space, without_space) and with_space != without_space
    assert answer_token_id(tok, "The capital of France is", "Paris") == with_space
    tid = answer_token_id(tok, "The capital of Japan is", "Tokyo")
    assert tok.decode([tid]) == " Tokyo"
    # An answer the tokenizer never saw after a space: the literal next token is the bare space piece,
    # which is what the model must emit first, so that is what is returned.
    prompt = "The capital of Spain is"
    tid = answer_token_id(tok, prompt, "Madrid")
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert tid == tok(prompt + " Madrid", add_special_tokens=False)["input_ids"][len(p_ids)]
    assert tok.decode([tid]) == " "


def test_answer_token_ids_batch_matches_single() -> None:
    tok = _train_tokenizer(split_words=True)
    facts = [
        Fact("The capital of France is", "Paris"),
        Fact("The capital of Italy is", "Rome"),
        Fact("The chemical symbol of gold is", "Au"),
    ]
    batch = answer_token_ids(tok, facts)
    assert batch == [answer_token_id(tok, f.prompt, f.answer) for f in facts]
    assert [tok.decode([t]) for t in batch] == [" Paris", " Rome", " Au"]
    assert answer_token_ids(tok, []) == []


def test_answer_token_falls_back_when_tokens_merge_across_boundary() -> None:
    # Without word splitting, BPE learns merges across spaces ("is Paris" ...), so the prompt's tokens
    # are no longer a prefix of the joint tokenization.
    tok = _train_tokenizer(split_words=False, vocab_size=600)
    prompt, answer = "The capital of France is", "Paris"
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    full = tok(prompt + " " + answer, add_special_tokens=False)["input_ids"]
    assert full[: len(p_ids)] != p_ids, "test tokenizer should merge across the boundary"
    tid = answer_token_id(tok, prompt, answer)
    piece = tok.decode([tid])
    assert piece.strip() and answer.startswith(piece.strip()), piece
    assert answer_token_ids(tok, [Fact(prompt, answer)]) == [tid]


def test_answer_token_errors() -> None:
    tok = _train_tokenizer(split_words=True)
    with pytest.raises(AnswerTokenError, match="empty"):
        answer_token_id(tok, "The capital of France is", "")
    with pytest.raises(AnswerTokenError, match="empty"):
        answer_token_ids(tok, [Fact("The capital of France is", "  ")])
    assert issubclass(AnswerTokenError, ValueError)
