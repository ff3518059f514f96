"""The analysis on the trained demo model (tiny size): the suppression is found and the patch undoes it.

The demo model's criteria are the shipped check sets `analysis/evaluate/checks/demo.json` (default size, what
`recallfix demo --model demo` checks) and `demo-tiny.json` (this tiny size: 2 layers, width 64, a few hundred
training steps; it knows far fewer facts, so the thresholds are looser). This test runs with
`--require demo-tiny` and asserts every check passes, plus what the check language does not say.

The model is built once into `.cache/` (or $RECALLFIX_TEST_CACHE) and reused while its recipe is unchanged.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from recallfix.analysis.data.facts import shipped_facts_dir
from recallfix.analysis.demo_model.build import build_demo_model
from recallfix.analysis.pipeline import AnalysisConfig, run_analysis

CACHE = Path(os.environ.get("RECALLFIX_TEST_CACHE", Path(__file__).resolve().parents[1] / ".cache"))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    model_dir = build_demo_model(CACHE / "demo-model-tiny", size="tiny", seed=0, progress=False)
    out = tmp_path_factory.mktemp("demo-analysis") / "run"
    run_analysis(model_dir, shipped_facts_dir(), out, config=replace(AnalysisConfig(), n_boot=200, progress=False,
                                                                     require=("demo-tiny",)))
    return json.loads((out / "analysis.json").read_text())


def test_demo_meets_its_check_set(demo_run: dict) -> None:
    checks = demo_run["checks"]
    assert {c["source"] for c in checks} == {"demo-tiny"} and len(checks) == 7
    assert [c["name"] for c in checks if not c["passed"]] == []


def test_demo_final_layer_suppresses_the_answer(demo_run: dict) -> None:
    test = demo_run["findings"]["test"]
    assert test["share_suppressed"] >= 0.70
    assert test["mean_p_after"] < test["mean_p_before"]
    assert demo_run["findings"]["block_lowers"]
    assert "lowers p(answer) on most held-out prompts" in demo_run["findings"]["text"]
    # what the final block does is found by the decomposition: its components lower log p(answer)
    assert any(r["mean_effect"] < 0 for r in demo_run["findings"]["components"])
    # the logit lens agrees: p(answer) falls across the last layer, and rises before it
    curve = demo_run["logit_lens"]["all"]["mean_p_answer"]
    assert curve[-1] < curve[-2] and curve[-2] > curve[0]


def test_demo_patch_undoes_the_suppression_on_held_out_facts(demo_run: dict) -> None:
    patch = demo_run["patch"]
    assert patch is not None and patch["verified"]
    assert patch["gains"] and all(g < 1.0 for g in patch["gains"].values()), "suppressors are turned down"
    diff = demo_run["evaluation"]["test"]["differences"]
    base_diff, temp_diff = diff["gains_minus_base"], diff["gains_minus_temperature"]
    assert base_diff["mean_p_answer"]["value"] > 0 and base_diff["mean_p_answer"]["ci_low"] > 0
    assert base_diff["accuracy"]["value"] >= 0
    assert base_diff["ece_equal_width"]["value"] <= 0.01
    assert temp_diff["accuracy"]["value"] >= 0
    after = demo_run["evaluation"]["suppression_after_patch"]["gains"]["share_suppressed"]
    assert after < demo_run["findings"]["test"]["share_suppressed"]


def test_demo_patch_adds_no_overconfidence_elsewhere(demo_run: dict) -> None:
    ev = demo_run["evaluation"]
    assert ev["unknown"] is not None and ev["unknown"]["n"] > 0  # found next to the model
    assert demo_run["data"]["unknown_path"].endswith("unknown_facts.jsonl")
    assert ev["unknown"]["differences"]["gains_minus_base"]["mean_confidence"]["value"] <= 0.08
    assert ev["neutral"]["gains"]["relative_change"] <= 0.05


def test_demo_reuses_an_up_to_date_run_and_recomputes_a_changed_one(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from recallfix.patches.cli import main as recallfix_main

    out = tmp_path / "demo"
    args = ["demo", "--model", "demo", "--size", "tiny", "--model-dir", str(CACHE / "demo-model-tiny"),
            "--out", str(out), "--no-progress", "--max-facts", "200"]
    assert recallfix_main([*args, "--n-boot", "20"]) in (0, 1)  # 1: a check of the set failed on 200 facts
    first = (out / "analysis.json").stat().st_mtime_ns
    capsys.readouterr()
    assert recallfix_main([*args, "--n-boot", "20"]) in (0, 1)
    assert "is up to date" in capsys.readouterr().out
    assert (out / "analysis.json").stat().st_mtime_ns == first  # nothing recomputed or rewritten
    assert recallfix_main([*args, "--n-boot", "21"]) in (0, 1)
    assert "is up to date" not in capsys.readouterr().out  # another setting: a new run replaces the old one
    assert json.loads((out / "analysis.json").read_text())["evaluation"]["n_boot"] == 21
