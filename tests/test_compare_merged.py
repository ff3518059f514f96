"""`recallfix compare --together` against `recallfix serve` with a merged patch (base and patched on two engines):
both models asked at once give the numbers they give one after the other."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from server_fixtures import API_KEY, NAME, Process

from recallfix.analysis.data.facts import load_facts, shipped_facts_dir

pytestmark = [pytest.mark.real_model, pytest.mark.servers("serve-merged")]
ROOT = Path(__file__).resolve().parents[1]
N_FACTS = 8


def _compare(server: Process, facts: Path, out: Path, *args: str) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "recallfix.patches.cli", "compare", "--base-url", server.url,
                           "--api-key", API_KEY, "--models", NAME, f"{NAME}:patched", "--facts", str(facts),
                           "--n-boot", "20", "--concurrency", "4", "--no-progress", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (out / "per_fact.jsonl").read_text().splitlines()]


def test_both_models_at_once_give_the_numbers_of_one_after_the_other(servers: dict[str, Process],
                                                                     tmp_path: Path) -> None:
    facts = tmp_path / "facts.jsonl"
    chosen = load_facts(shipped_facts_dir())[:N_FACTS]
    facts.write_text("".join(json.dumps({"prompt": f.prompt, "answer": f.answer, "subject": f.subject,
                                         "relation": f.relation}) + "\n" for f in chosen))
    server = servers["serve-merged"]
    apart = _compare(server, facts, tmp_path / "apart")
    together = _compare(server, facts, tmp_path / "together", "--together")
    assert len(apart) == len(together) == N_FACTS
    moved = 0
    for a, t in zip(apart, together, strict=True):
        for key in ("A", "B"):
            assert t[key]["answer_tokens"] == a[key]["answer_tokens"] and t[key]["generation"] == a[key]["generation"]
            # Separate engines: batching changes float32 sums by a few ulps at most.
            assert t[key]["answer_logprob"] == pytest.approx(a[key]["answer_logprob"], abs=1e-5)
        moved += abs(a["B"]["answer_logprob"] - a["A"]["answer_logprob"]) > 1e-4
    assert moved > 0  # the patched variant differs from the base: the two models were both asked
    results = json.loads((tmp_path / "together" / "results.json").read_text())
    assert results["settings"]["together"] is True
