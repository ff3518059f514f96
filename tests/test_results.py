"""`make results`' page (results/render.py): every number read from the runs' files, the goal judged from them,
the transfer table under a split by relation, and a clear error for a bad plan."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from test_analysis_pipeline import FAST, write_facts, write_neutral, write_unknown

from recallfix.analysis.pipeline import run_analysis
from recallfix.analysis.report.format import estimate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "results"))
import render  # noqa: E402  (results/ holds scripts, not a package)


def test_page_from_a_run(tiny_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    run = root / "tiny" / "held-out"
    result = run_analysis(tiny_dirs["llama"], write_facts(tmp_path / "facts.jsonl"), run,
                          unknown=write_unknown(tmp_path / "unknown.jsonl"),
                          neutral=write_neutral(tmp_path / "neutral.txt"),
                          config=replace(FAST, components=("L1H0", "L1MLP"), recall_rank=10**9))
    (run / "run.json").write_text(render.RunRecord(model="tiny", protocol="held-out", run=str(run), wall_s=12.5,
                                                   peak_gib=1.25).model_dump_json())
    plan = render.Plan(about="", analyze_options=[], goal=render.Goal(protocol="held-out", max_unknown_top1_rise=0.02,
                                                                       max_neutral_nll_rise=0.02),
                       protocols={"held-out": render.Protocol(facts="x", split_by="relation", title="TITLE"),
                                  "other": render.Protocol(facts="x", split_by="subject", title="OTHER")},
                       models={"tiny": render.ModelPlan(max_facts={"held-out": 25}, served=None)})
    monkeypatch.setattr(render, "PAGE", tmp_path / "results.md")
    text = render.render(plan, root, ["tiny"], ["held-out", "other"]).read_text()
    ev = result.evaluation
    assert ev is not None
    assert "## Across the models" in text and "### tiny: TITLE" in text and "capped at 25" in text
    assert "1 of the 2 planned analysis runs" in text and "0.0 h" in text and "Run: 0.2 min, peak 1.2 GiB" in text
    assert "### tiny: OTHER\n\nNot run yet." in text  # a protocol not run is said to be missing
    assert result.findings.text in text
    words = text.index("## What holds and what does not")  # the plain words end the page, after every section
    assert words > text.index("### tiny: OTHER") and "- **tiny (held-out)**:" in text[words:]
    for method in ("base", "gains", "suppress", "intercept"):  # the table's numbers are the run's own
        assert estimate(ev.test.models[method]["nll"]) in text
    met, why = render._goal(ev, plan.goal)
    assert (("| met |" in text) if met else f"not met: {why}" in text)
    if ev.chosen is None:  # no patch recommended on the tiny random model: the page says so and why
        assert "**Recommended:** none." in text and why.startswith("no patch recommended")
    assert "Transfer to the unseen test relations" in text and "| capital |" in text
    calibration = ev.calibration  # the base calibrator's numbers, in the table across the models and the section
    assert calibration is not None
    base = calibration.variants["base"]
    assert "### Calibrated confidence (calibration.json), base model, test split" in text
    assert f"| tiny | held-out | {base.family} | {estimate(base.raw['ece'])} | {estimate(base.calibrated['ece'])} |" \
        in text
    assert f"**Calibrated confidence** (calibration.json, the family chosen on dev by {calibration.folds}" in text


def test_a_bad_plan_names_the_field(tmp_path: Path) -> None:
    plan = json.loads(render.PLAN.read_text())
    del plan["models"]["smollm2-135m"]["served"]
    bad = tmp_path / "plan.json"
    bad.write_text(json.dumps(plan))
    with pytest.raises(SystemExit, match=r"plan.json: models.smollm2-135m.served: Field required"):
        render.Plan.load(bad)
    assert set(render.Plan.load(render.PLAN).models) == {"smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m",
                                                         "qwen2.5-coder-1.5b"}
