"""`recallfix compare` without a model server: its reading of logprobs against the analysis' own definitions,
exact match, McNemar, the results schema, and the one-line errors that come before any server answers."""

from __future__ import annotations

import json
import math
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from cli_runner import recallfix

from recallfix.analysis import calibration as cal
from recallfix.analysis.compare.client import (
    CompareError,
    answer_start,
    exact_match,
    first_token_numbers,
    normalize_words,
    read_score,
)
from recallfix.analysis.compare.confidence import confidence_comparison, resolve_calibrators
from recallfix.analysis.compare.run import command_line, select_facts
from recallfix.analysis.compare.schema import COMPARE_SCHEMA_PATH, json_schema
from recallfix.analysis.mechanism.lens import answer_stats
from recallfix.analysis.records import Dist
from recallfix.patches.calibrator import CALIBRATION_TOP_K, Calibrator, VariantCalibration


def _top(logits: torch.Tensor, k: int) -> dict[str, float]:
    """What a server returns at one position: the k highest logprobs by token text."""
    logp = logits.log_softmax(-1)
    values, ids = logp.topk(k)
    return {f"t{int(i)}": float(v) for v, i in zip(values, ids, strict=True)}


@pytest.mark.parametrize("seed", range(5))
def test_first_token_numbers_are_the_analysis_record_when_the_top_k_covers_the_vocabulary(seed: int) -> None:
    """With k = vocabulary size the HTTP reading is exact: it must give `lens.answer_stats`' numbers."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, 40, generator=g, dtype=torch.float64) * 3
    for answer in (int(logits.argmax()), int(logits.argmin()), 7):
        ref = answer_stats(logits, torch.tensor([answer]))
        logp = float(logits.log_softmax(-1)[0, answer])
        got = first_token_numbers(f"t{answer}", logp, _top(logits[0], 40), k=40)
        assert got["p_answer"] == pytest.approx(float(ref.p_answer), rel=1e-6)
        assert got["confidence"] == pytest.approx(float(ref.confidence), rel=1e-6)
        assert got["rank"] == int(ref.rank)
        assert got["correct"] == bool(ref.correct)
        assert got["prediction"] == f"t{int(ref.prediction)}"
        assert got["brier"] == pytest.approx(float(ref.brier), abs=1e-6)
        assert got["brier_tail_max"] == pytest.approx(0.0, abs=1e-9)
        assert got["top_logprobs"][:CALIBRATION_TOP_K] == pytest.approx(ref.top_logprobs[0].tolist(), abs=1e-5)


def test_a_short_top_k_keeps_accuracy_and_confidence_exact_and_bounds_brier() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 200, generator=g, dtype=torch.float64) * 2
    order = logits[0].argsort(descending=True)
    for k in (1, 5, 20):
        for position in (0, 3, 150):  # the answer ranked 1st, 4th, 151st
            answer = int(order[position])
            ref = answer_stats(logits, torch.tensor([answer]))
            logp = float(logits.log_softmax(-1)[0, answer])
            got = first_token_numbers(f"t{answer}", logp, _top(logits[0], k), k=k)
            assert got["correct"] == bool(ref.correct)
            assert got["confidence"] == pytest.approx(float(ref.confidence), rel=1e-6)  # answer_stats: float32
            if position < k:
                assert got["rank"] == position + 1 and got["rank_above"] is None
            else:  # beyond the top k: only "rank > k" is known
                assert got["rank"] is None and got["rank_above"] == k
            assert got["brier"] - 1e-6 <= float(ref.brier) <= got["brier"] + got["brier_tail_max"] + 1e-6


def test_answer_start_needs_a_token_boundary_at_the_end_of_the_prompt() -> None:
    assert answer_start([0, 3, 8, 11], 8) == 2
    assert answer_start([0, 3, 9], 8) is None  # a token spans characters 3..9
    assert answer_start([0, 3], 8) is None


@pytest.mark.parametrize(("generation", "answer", "match"), [
    (" Paris, the city of light", "Paris", True),
    (" paris.\n", "Paris", True),
    (" the United States of America", "United States", True),
    ("  The  Hague is", "The Hague", True),
    (" Parisian", "Paris", False),
    (" Lyon", "Paris", False),
    (" New\nYork", "New York", True),
    (" New Jersey", "New York", False),
    ("", "Paris", False),
])
def test_exact_match_normalises_case_whitespace_punctuation_and_leading_articles(generation: str, answer: str,
                                                                                  match: bool) -> None:
    assert exact_match(generation, answer) is match


def test_normalize_words_drops_only_a_leading_article() -> None:
    assert normalize_words("The Hague, the city") == ["hague", "the", "city"]
    assert normalize_words("A") == ["a"]  # an answer that is only an article keeps it


@pytest.mark.parametrize(("a_only", "b_only", "p"), [
    (0, 0, 1.0), (0, 5, 2 / 32), (5, 0, 2 / 32), (3, 3, 1.0), (1, 9, 2 * 11 / 1024), (2000, 2000, 1.0),
])
def test_mcnemar_exact(a_only: int, b_only: int, p: float) -> None:
    assert cal.mcnemar_exact(a_only, b_only) == pytest.approx(p, rel=1e-12)


def test_mcnemar_exact_is_tiny_but_not_zero_for_many_discordant_pairs() -> None:
    p = cal.mcnemar_exact(0, 3000)  # 2^-2999: below float64's range; an exact computation gives 0.0, never NaN
    assert p == 0.0 or p > 0
    assert not math.isnan(cal.mcnemar_exact(1000, 1300))


def test_compare_schema_file_is_current() -> None:
    assert json.loads(COMPARE_SCHEMA_PATH.read_text()) == json_schema(), \
        "run `python -m recallfix.analysis.compare.schema` to regenerate analysis/compare/compare.schema.json"


def test_split_needs_a_run() -> None:
    with pytest.raises(CompareError, match="--split needs --run"):
        select_facts(None, None, "test")


def test_max_facts_keeps_whole_subjects_drawn_by_the_seed() -> None:
    from recallfix.analysis.data.inputs import subject_group

    every = select_facts(None, None, None).facts
    by_subject: dict[str, int] = {}
    for fact in every:
        by_subject[subject_group(fact)] = by_subject.get(subject_group(fact), 0) + 1
    drawn = {seed: select_facts(None, None, None, max_facts=100, seed=seed).facts for seed in (0, 1)}
    for facts in drawn.values():
        subjects = {subject_group(f) for f in facts}
        assert all(sum(subject_group(f) == s for f in facts) == by_subject[s] for s in subjects)  # whole subjects
        assert 100 <= len(facts) < 100 + max(by_subject.values())
        assert [f for f in every if subject_group(f) in subjects] == facts  # the input's order
    assert drawn[0] != drawn[1]
    assert select_facts(None, None, None, max_facts=100, seed=0).facts == drawn[0]


def _compare(*args: str) -> subprocess.CompletedProcess[str]:
    return recallfix("compare", *args)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("recallfix: error: ")
    return lines[0]


def test_a_bad_facts_line_names_file_line_and_field(tmp_path: Path) -> None:
    facts = tmp_path / "facts.jsonl"
    facts.write_text('{"prompt": "The capital of France is", "answer": "Paris"}\n'
                     '{"prompt": "The capital of Spain is", "answer": 7}\n')
    line = _one_line_error(_compare("--base-url", f"http://127.0.0.1:{_free_port()}", "--models", "a", "b",
                                    "--facts", str(facts), "--out", str(tmp_path / "out")))
    assert f"{facts}:2" in line and "'answer'" in line
    assert not (tmp_path / "out").exists()


def test_an_unreachable_server_fails_fast_with_one_line(tmp_path: Path) -> None:
    facts = tmp_path / "facts.jsonl"
    facts.write_text('{"prompt": "The capital of France is", "answer": "Paris"}\n')
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    line = _one_line_error(_compare("--base-url", url, "--models", "a", "b", "--facts", str(facts),
                                    "--out", str(tmp_path / "out")))
    assert url in line and "unreachable" in line
    assert not (tmp_path / "out").exists()


def _choice(tokens: list[str], values: list[float | None], tops: list[dict | None], special: int = 0) -> dict:
    """vLLM's echo: the offsets count every token's text, the echoed text leaves out the first `special` tokens."""
    offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    return {"text": "".join(tokens[special:]),
            "logprobs": {"tokens": tokens, "text_offset": offsets, "token_logprobs": values, "top_logprobs": tops}}


def test_read_score_places_the_answer_after_the_prompt_and_sums_its_tokens() -> None:
    prompt = "The capital of France is"
    choice = _choice(["The", " capital", " of", " France", " is", " Par", "is"],
                     [None, -5.0, -1.0, -3.0, -0.5, -0.7, -0.01],
                     [None, {" x": -1.0}, {" of": -1.0}, {" y": -2.0}, {" is": -0.5}, {" Par": -0.7, " Lyon": -1.2},
                      {"is": -0.01, "ic": -5.0}])
    score, before = read_score(choice, prompt, "Paris", k=2)
    assert before == ["The", " capital", " of", " France", " is"]
    assert score.unplaced is None and score.answer_tokens == [" Par", "is"]
    assert score.answer_logprob == pytest.approx(-0.71)
    assert score.correct and score.answer_greedy and score.rank == 1
    assert score.margin == pytest.approx(0.5)
    assert score.p_answer == pytest.approx(math.exp(-0.7))


def test_read_score_skips_a_bos_token_the_echoed_text_leaves_out_and_a_generated_token() -> None:
    # Gemma's tokenizer adds <bos>: vLLM echoes it as a token, counts it in text_offset, not in the text
    choice = _choice(["<bos>", "The", " sky", " is", " blue", "."],
                     [None, -5.0, -1.0, -0.5, -0.3, -2.0],
                     [None, {"The": -5.0}, {" sky": -1.0}, {" is": -0.5}, {" blue": -0.3, " grey": -1.5}, {".": -2.0}],
                     special=1)
    score, before = read_score(choice, "The sky is", "blue", k=2)
    assert before == ["<bos>", "The", " sky", " is"]
    assert score.answer_tokens == [" blue"]  # the "." is the token the server generated, not the answer
    assert score.answer_logprob == pytest.approx(-0.3) and score.correct


def test_read_score_counts_an_answer_the_tokenizer_merges_into_the_prompt_as_unplaced() -> None:
    choice = _choice(["ab", "c d"], [None, -1.0], [None, {"c d": -1.0}])  # a token spans "ab|c" -> " d"
    score, _ = read_score(choice, "abc", "d", k=1)
    assert score.unplaced is not None and score.p_answer is None


def test_the_recorded_command_hides_the_api_key() -> None:
    assert "sk-secret" not in command_line(["compare", "--api-key", "sk-secret", "--models", "a", "b"])
    assert "sk-secret" not in command_line(["compare", "--api-key=sk-secret"])


def _dist(confidence: list[float], correct: list[bool]) -> Dist:
    c = torch.tensor(confidence, dtype=torch.float64)
    top = torch.stack([c.log(), (1 - c).clamp(min=1e-9).log()], dim=1)
    return Dist(p_answer=c, rank=torch.tensor([1 if r else 2 for r in correct]), confidence=c,
                prediction=torch.zeros(len(c), dtype=torch.long), nll=-c.log(), brier=(1 - c) ** 2, top_logprobs=top)


def test_the_confidence_section_measures_both_models_raw_and_calibrated(tmp_path: Path) -> None:
    a = _dist([0.9, 0.8, 0.7, 0.6, 0.3, 0.2] * 5, [True, True, False, True, False, False] * 5)
    b = _dist([0.3, 0.8, 0.9, 0.6, 0.7, 0.2] * 5, [True, True, False, True, False, False] * 5)  # ranks worse
    groups = [f"s{i}" for i in range(30)]
    c = confidence_comparison({"A": a, "B": b}, groups, n_boot=200, seed=0)
    assert c.calibrated is None and c.calibration is None
    assert c.raw.models["A"]["aurc"].value == pytest.approx(cal.aurc(a.confidence.numpy(), a.correct.numpy()))
    assert c.raw.difference["aurc"].value > 0 and c.raw.difference["aurc"].ci_low is not None
    always_half = Calibrator(family="platt", features=["logit_p1"], coef=[0.0, 0.0])
    flat = VariantCalibration(patch_id=None, calibrator=always_half)
    c = confidence_comparison({"A": a, "B": b}, groups, 200, 0, tmp_path / "c.json", {"A": ("base", flat),
                                                                                      "B": ("base", flat)})
    assert c.calibrated is not None and c.calibrated.models["A"]["brier"].value == pytest.approx(0.25)
    assert c.calibrators == {"A": f"base ({flat.id})", "B": f"base ({flat.id})"}
    assert set(c.risk_coverage) == {"A raw", "B raw", "A calibrated", "B calibrated"}
    # a constant confidence cannot rank: its area is the error rate at every coverage, tie-broken at random
    assert c.calibrated_minus_raw["A"]["aurc"].value > 0
    # a constant 0.5 over 30 facts: |K - 15| / 30, K ~ Binomial(30, 0.5), in expectation 0.072
    assert c.ece_floor["A calibrated"] == pytest.approx(0.0722, abs=1e-3)
    table = [line for line in "\n".join(confidence_lines_of(c)).splitlines() if line.startswith("|")]
    floor_row = next(line for line in table if line.startswith("| ECE floor"))
    assert floor_row.count("|") == table[0].count("|") == 10  # as many cells as the header


def confidence_lines_of(c) -> list[str]:  # noqa: ANN001 (a ConfidenceComparison)
    from types import SimpleNamespace

    from recallfix.analysis.compare.report import confidence_lines

    return confidence_lines(SimpleNamespace(confidence=c), None)  # type: ignore[arg-type]  (only .confidence read)


def test_calibrators_are_named_or_refused_before_any_request(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    from test_calibrator import calibration_file

    path = calibration_file(tiny_dirs["llama"], patch_id="abc").save(tmp_path / "calibration.json")
    assert {k: v[0] for k, v in resolve_calibrators(path, "base,auto", None).items()} == {"A": "base", "B": "gains"}
    with pytest.raises(CompareError, match=r"--calibrators: .* has no variant 'suppress' \(base, gains\)"):
        resolve_calibrators(path, "base,suppress", None)
    with pytest.raises(CompareError, match=r"--calibrators: expected two variant names A,B"):
        resolve_calibrators(path, "base", None)
    with pytest.raises(CompareError, match=r"cannot read calibration file"):
        resolve_calibrators(tmp_path / "missing.json", "base,auto", None)
