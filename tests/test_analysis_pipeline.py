"""`recallfix analyze` end to end on tiny random models of every architecture: outputs valid against the
schemas, the patch applies and reproduces what was fitted, determinism, and clear errors on bad inputs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import jsonschema
import pytest
import torch
from tiny import ARCHITECTURES

from recallfix.analysis.config import FitConfig
from recallfix.analysis.pipeline import AnalysisConfig, AnalysisError, run_analysis
from recallfix.analysis.rundiff import diff_runs
from recallfix.analysis.rundiff import main as rundiff_main
from recallfix.analysis.schema import SCHEMA_PATH, AnalysisResult, json_schema
from recallfix.patches import Patch, apply_patch
from recallfix.patches.calibrator import SCHEMA_PATH as CALIBRATION_SCHEMA_PATH
from recallfix.patches.calibrator import CalibrationFile
from recallfix.patches.cli import main as recallfix_main
from recallfix.patches.registry.load import load_causal_lm

CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Brazil": "Brasilia", "Egypt": "Cairo", "Peru": "Lima",
            "Chile": "Santiago", "Kenya": "Nairobi", "Spain": "Madrid", "Italy": "Rome", "Greece": "Athens"}
SYMBOLS = {"Gold": "Au", "Silver": "Ag", "Iron": "Fe", "Copper": "Cu", "Tin": "Sn"}

# Small and fast: the numbers are meaningless on random weights; the tests check shapes and consistency.
FAST = AnalysisConfig(batch_size=8, n_boot=40, progress=False, fit=FitConfig(max_epochs=3, patience=2))


def write_facts(path: Path) -> Path:
    rows = []
    for subject, answer in CAPITALS.items():
        for template in ("The capital of {} is", "{} has its capital in"):
            rows.append({"prompt": template.format(subject), "answer": answer, "subject": subject,
                         "relation": "capital", "template": template})
    for subject, answer in SYMBOLS.items():
        rows.append({"prompt": f"{subject} has the chemical symbol", "answer": answer, "subject": subject,
                     "relation": "symbol"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_unknown(path: Path) -> Path:
    rows = [{"prompt": f"The capital of {s} is", "answer": a, "subject": s, "relation": "capital"}
            for s, a in {"Zorvia": "Velmar", "Quaston": "Drel", "Miravel": "Ostun"}.items()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_neutral(path: Path) -> Path:
    path.write_text("The weather today is mild.\nWe walked to the market.\nThe sky is clear.\n"
                    "A cat sat on the mat.\nThe train was late again.\nShe read a book.\n")
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("analysis-inputs")
    return {"facts": write_facts(root / "facts.jsonl"), "unknown": write_unknown(root / "unknown.jsonl"),
            "neutral": write_neutral(root / "neutral.txt")}


def validate_run(run: Path) -> dict:
    """Every output file exists and is valid: analysis.json against the committed schema, the patch
    against the Patch format and its schema, every referenced file present."""
    doc = json.loads((run / "analysis.json").read_text())
    jsonschema.validate(doc, json.loads(SCHEMA_PATH.read_text()))
    AnalysisResult.model_validate(doc)
    for name in doc["files"].values():
        assert (run / name).is_file(), name
    text = (run / "report.md").read_text()
    for key, name in doc["files"].items():
        if key.startswith("plot_"):
            assert f"({name})" in text, f"{name} not shown in the report"
            assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    patch_schema = json.loads((Path(__import__("recallfix.patches").patches.__file__).parent
                               / "patch.schema.json").read_text())
    for method in (doc["evaluation"] or {}).get("methods", []):
        jsonschema.validate(json.loads((run / method["file"]).read_text()), patch_schema)
        patch = Patch.load(run / method["file"])
        assert patch.id == method["patch_id"] and patch.provenance.dataset_sha256 == doc["data"]["facts_sha256"]
    if doc["evaluation"] is not None:  # a calibrator per variant, tied to the model and to each patch
        calibration_doc = json.loads((run / "calibration.json").read_text())
        jsonschema.validate(calibration_doc, json.loads(CALIBRATION_SCHEMA_PATH.read_text()))
        calibration = CalibrationFile.load(run / "calibration.json")
        summary = doc["evaluation"]["calibration"]
        assert set(calibration.variants) == {"base", *(m["name"] for m in doc["evaluation"]["methods"])}
        for method in doc["evaluation"]["methods"]:  # two fits may end at the same patch: either calibrator is it
            patch = Patch.load(run / method["file"])
            assert calibration.variants[method["name"]].patch_id == patch.id == calibration.for_patch(patch)[1].patch_id
        assert calibration.for_patch(None)[0] == "base"
        assert calibration.recommended == doc["evaluation"]["chosen"]  # what the router serves as patched
        assert {n: v.id for n, v in calibration.variants.items()} == {
            n: v["calibrator_id"] for n, v in summary["variants"].items()}
        assert "## 7. A calibrated confidence" in text and "calibration.png" in text
    if doc["patch"] is not None:
        patch = Patch.load(run / doc["patch"]["file"])
        assert {e.component: e.gain for e in patch.edits} == pytest.approx(doc["patch"]["gains"])
    if doc["evaluation"] is not None and doc["evaluation"]["chosen"] is not None:  # the chosen method is patch.json
        chosen = next(m for m in doc["evaluation"]["methods"] if m["name"] == doc["evaluation"]["chosen"])
        assert chosen["file"] == "patch.json" and chosen["dev_nll_change"]["ci_high"] < 0
    elif doc["evaluation"] is not None:  # no patch recommended: none is written as patch.json
        assert not (run / "patch.json").exists() and "No patch is recommended" in text
    return doc


def test_committed_schema_is_up_to_date() -> None:
    assert json.loads(SCHEMA_PATH.read_text()) == json_schema(), \
        "run `python -m recallfix.analysis.schema` to regenerate analysis/analysis.schema.json"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_pipeline_on_every_architecture(arch: str, tiny_dirs: dict[str, Path], inputs: dict[str, Path],
                                        tmp_path: Path) -> None:
    final = 1  # the tiny models have two layers
    config = replace(FAST, components=(f"L{final}H0", f"L{final}MLP"), recall_rank=10**9)
    run = tmp_path / "run"
    result = run_analysis(tiny_dirs[arch], inputs["facts"], run, unknown=inputs["unknown"],
                          neutral=inputs["neutral"], config=config, command="test")
    doc = validate_run(run)
    assert doc["model"]["architecture"] == arch
    n_layers = doc["model"]["num_layers"]
    assert len(doc["logit_lens"]["all"]["mean_p_answer"]) == n_layers + 1
    assert set(doc["logit_lens"]["by_relation"]) == {"capital", "symbol"}
    assert doc["data"]["splits"]["test"] > 0 and sum(doc["data"]["splits"].values()) == doc["data"]["n_facts"] == 25
    assert doc["data"]["n_unknown"] == 3
    names = [c["name"] for c in doc["final_layer"]["components"]]
    assert names[:doc["model"]["num_heads"]] == [f"L{final}H{h}" for h in range(doc["model"]["num_heads"])]
    assert names[-1] == f"L{final}MLP"
    assert len(doc["mechanisms"]["mlp_regression"]) == n_layers
    assert doc["mechanisms"]["movers"]["n_prompts"] == 25
    assert len(doc["mechanisms"]["movers"]["heads"]) == n_layers * doc["model"]["num_heads"]
    # the findings' "after" is the logit lens's last layer; "before" its second to last
    test = doc["findings"]["all"]
    assert test["mean_p_after"] == pytest.approx(doc["logit_lens"]["all"]["mean_p_answer"][-1], rel=1e-4)
    assert test["mean_p_before"] == pytest.approx(doc["logit_lens"]["all"]["mean_p_answer"][-2], rel=1e-4)
    # the headline at both levels: the block (with its interval) and every final-block component
    findings = doc["findings"]
    assert findings["test"]["share_suppressed_ci"][0] <= findings["test"]["share_suppressed"]
    assert {c["name"] for c in findings["components"]} == set(names)
    assert "Final block (layer 1)" in findings["text"] and "Components:" in findings["text"]
    patch = doc["patch"]
    assert set(patch["gains"]) == {f"L{final}H0", f"L{final}MLP"}
    assert patch["verified"] and patch["max_verify_error"] < 1e-3
    assert all(0.0 <= g <= 2.0 for g in patch["gains"].values())
    assert set(doc["suppress"]["gains"]) == set(patch["gains"])
    assert all(0.0 <= g <= 1.0 for g in doc["suppress"]["gains"].values())  # suppressors scaled down only
    # Gemma 3 normalises the MLP's output before the residual add: the intercept (a bias edit) is not applicable
    intercept = ["intercept"] if arch != "gemma3_text" else []
    assert doc["intercept"]["component"] == f"L{final}MLP" if intercept else doc["intercept"] is None
    ev = doc["evaluation"]
    assert ev["test"]["n"] == doc["data"]["splits"]["test"]
    assert [m["name"] for m in ev["methods"]] == ["gains", "suppress", *intercept]
    qualified = [m for m in ev["methods"] if m["dev_nll_change"]["ci_high"] < 0]
    assert (ev["chosen"] is None) == (not qualified), ev["choice"]
    assert set(ev["by_relation"]) == {"capital", "symbol"}
    assert sum(r["n"] for r in ev["by_relation"].values()) == ev["test"]["n"]
    for model in ("base", "gains", "suppress", *intercept, "temperature"):
        assert set(ev["test"]["models"][model]) >= {"accuracy", "ece_equal_width", "ece_equal_mass", "brier", "nll",
                                                    "auroc", "mean_p_answer"}
    # temperature scaling never changes the top-1 token
    assert ev["test"]["models"]["temperature"]["accuracy"]["value"] == ev["test"]["models"]["base"]["accuracy"]["value"]
    assert all(ev["neutral"][m]["n_lines"] == 3 for m in ("gains", *intercept))
    assert doc["checks"] == []  # none asked for: findings only, no PASS/FAIL
    assert {"block.lowers_share", "gains.unknown_confidence_change", "suppress.nll_change",
            *(f"{m}.neutral_nll_change" for m in intercept), f"component.L{final}H0.mean_effect"} <= set(doc["values"])
    assert ("patch.nll_change" in doc["values"]) == (ev["chosen"] is not None)
    # every amplified component (gain > 1) is explained path by path; the suppress-only fit amplifies none
    assert [r["name"] for r in ev["amplified"]["gains"]] == [n for n, g in patch["gains"].items() if g > 1]
    assert ev["amplified"]["suppress"] == []
    assert ("What the learned gains amplify" in (run / "report.md").read_text()) == bool(ev["amplified"]["gains"])
    assert result.patch is not None and result.patch.id == Patch.load(run / result.patch.file).id


def test_pipeline_in_bfloat16(tiny_dirs: dict[str, Path], inputs: dict[str, Path], tmp_path: Path) -> None:
    """The GPU path's dtype on CPU: hooks, fit and verification work in bf16 (within bf16 rounding)."""
    config = replace(FAST, dtype="bfloat16", recall_rank=10**9, components=("L1H0", "L1MLP"))
    result = run_analysis(tiny_dirs["llama"], inputs["facts"], tmp_path / "run", neutral=inputs["neutral"],
                          config=config)
    doc = validate_run(tmp_path / "run")
    assert doc["model"]["dtype"] == "bfloat16"
    assert result.patch is not None and result.patch.verified
    assert any(g != 1.0 for g in result.patch.gains.values())  # every fact counts as recalled: the NLL moves them


def test_reported_patched_numbers_come_from_the_applied_patch(tiny_dirs: dict[str, Path], inputs: dict[str, Path],
                                                              tmp_path: Path) -> None:
    """Re-measure the test split's patched p(answer) independently with apply_patch and a plain forward."""
    from recallfix.analysis.data.facts import answer_token_id, assign_splits, load_facts

    config = replace(FAST, components=("L1H0", "L1H1", "L1MLP"), method="gains")
    run_analysis(tiny_dirs["gpt2"], inputs["facts"], tmp_path / "run", neutral=inputs["neutral"], config=config)
    doc = json.loads((tmp_path / "run" / "analysis.json").read_text())
    model, tok = load_causal_lm(tiny_dirs["gpt2"])
    facts = [f for f in assign_splits(load_facts(inputs["facts"]), seed=0) if f.split == "test"]
    probs = []
    file = doc["evaluation"]["methods"][0]["file"]  # patch.json, or patch.gains.json where none is recommended
    assert file == ("patch.json" if doc["evaluation"]["chosen"] == "gains" else "patch.gains.json")
    with apply_patch(model, Patch.load(tmp_path / "run" / file)), torch.no_grad():
        for f in facts:
            p = model(**tok(f.prompt, return_tensors="pt")).logits[0, -1].softmax(-1)
            probs.append(float(p[answer_token_id(tok, f.prompt, f.answer)]))
    reported = doc["evaluation"]["test"]["models"]["gains"]["mean_p_answer"]["value"]
    assert reported == pytest.approx(sum(probs) / len(probs), rel=1e-4)


def test_no_suppressor_means_no_patch_and_a_valid_report(tiny_dirs: dict[str, Path], inputs: dict[str, Path],
                                                         tmp_path: Path) -> None:
    # no component can suppress on more than 100% of prompts
    config = replace(FAST, min_share=1.01, method="gains", require=("demo",))
    result = run_analysis(tiny_dirs["llama"], inputs["facts"], tmp_path / "run", neutral=inputs["neutral"],
                          config=config)
    doc = validate_run(tmp_path / "run")
    assert result.patch is None and doc["evaluation"] is None
    assert not (tmp_path / "run" / "patch.json").exists()
    assert doc["findings"]["suppressors"] == []  # the same share threshold decides a consistent suppressor
    # the demo set's patch checks cannot pass without a patch: an unmeasured finding fails
    checks = {c["name"]: c for c in doc["checks"]}
    assert checks["patch_raises_accuracy"]["value"] is None and not checks["patch_raises_accuracy"]["passed"]
    assert "Not fitted" in (tmp_path / "run" / "report.md").read_text()


def test_same_seed_same_patch_other_seed_other_split(tiny_dirs: dict[str, Path], inputs: dict[str, Path],
                                                     tmp_path: Path) -> None:
    config = replace(FAST, components=("L1H0", "L1MLP"), n_boot=10)
    runs = []
    for i, seed in enumerate((0, 0, 1)):
        out = tmp_path / f"run{i}"
        run_analysis(tiny_dirs["qwen2"], inputs["facts"], out, neutral=inputs["neutral"],
                     config=replace(config, seed=seed))
        runs.append((Patch.load(out / "patch.json"), json.loads((out / "analysis.json").read_text())))
    (p0, d0), (p1, d1), (p2, d2) = runs
    assert [e.model_dump() for e in p0.edits] == [e.model_dump() for e in p1.edits]
    assert p0.id == p1.id
    assert d0["evaluation"] == d1["evaluation"] and d0["patch"]["history"] == d1["patch"]["history"]
    assert d0["data"]["facts_sha256"] != d2["data"]["facts_sha256"]  # another seed splits differently
    # every number of both files, apart from times and the command line
    assert diff_runs(tmp_path / "run0", tmp_path / "run1") == []
    assert "analysis.json: data.seed: 0 != 1" in diff_runs(tmp_path / "run0", tmp_path / "run2")


def test_cli_options_are_the_config_fields_with_its_defaults() -> None:
    from recallfix.patches.cli import build_parser
    from recallfix.patches.options import from_args

    parser = build_parser()
    for command in (["analyze", "--model", "m"], ["demo"]):
        assert from_args(AnalysisConfig, parser.parse_args([*command, "--out", "o"])) == AnalysisConfig()
    args = parser.parse_args(["analyze", "--model", "m", "--out", "o", "--components", "L1H0, L1MLP", "--mlp",
                              "neurons", "--min-share", "0.7", "--no-progress"])
    assert from_args(AnalysisConfig, args) == replace(AnalysisConfig(), components=("L1H0", "L1MLP"), mlp="neurons",
                                                      min_share=0.7, progress=False)
    with pytest.raises(SystemExit):
        parser.parse_args(["analyze", "--model", "m", "--out", "o", "--mlp", "half"])


def test_rundiff_lists_every_difference_but_times_and_paths(tmp_path: Path) -> None:
    doc = {"created": "2026-01-01T00:00:00+00:00", "runtime_s": {"total": 1.5}, "command": "recallfix analyze",
           "tool_version": "0.1.0", "model": {"path": "/a/model", "num_layers": 2},
           "data": {"facts_path": "/a/facts", "unknown_path": None, "seed": 0},
           "evaluation": {"nll": [0.25, 0.5], "n": 3}}
    patch = {"edits": [{"component": "L1H0", "gain": 0.5}],
             "provenance": {"created": "2026-01-01T00:00:00+00:00", "command": "x", "tool_version": "0.1.0"}}

    def write(name: str, analysis: dict, patch_doc: dict) -> Path:
        run = tmp_path / name
        run.mkdir()
        (run / "analysis.json").write_text(json.dumps(analysis))
        (run / "patch.json").write_text(json.dumps(patch_doc))
        return run

    a = write("a", doc, patch)
    other = json.loads(json.dumps(doc))
    other.update(created="2027-01-01T00:00:00+00:00", runtime_s={"total": 9.0}, command="other", tool_version="9")
    other["model"]["path"], other["data"]["facts_path"] = "/b/model", "/b/facts"
    other_patch = json.loads(json.dumps(patch))
    other_patch["provenance"].update(created="2027-01-01T00:00:00+00:00", command="y", tool_version="9")
    assert diff_runs(a, write("b", other, other_patch)) == []
    assert diff_runs(a, tmp_path / "b", paths=True) == ["analysis.json: model.path: '/a/model' != '/b/model'",
                                                           "analysis.json: data.facts_path: '/a/facts' != '/b/facts'"]
    other["evaluation"]["nll"][1] = 0.5 + 1e-15
    other["evaluation"]["n"] = 3.0  # 3 != 3.0 in the file
    other_patch["edits"][0]["gain"] = 0.25
    found = diff_runs(a, write("c", other, other_patch))
    assert found == ["analysis.json: evaluation.nll[1]: 0.5 != 0.500000000000001",
                     "analysis.json: evaluation.n: 3 != 3.0",
                     "patch.json: edits[0].gain: 0.5 != 0.25"]
    assert diff_runs(a, tmp_path / "c", rel_tol=1e-12) == found[1:]
    assert rundiff_main([str(a), str(tmp_path / "b")]) == 0
    assert rundiff_main([str(a), str(tmp_path / "c")]) == 1


# -- errors -----------------------------------------------------------------------------------------


def test_bad_inputs_are_refused_with_the_file_named(tiny_dirs: dict[str, Path], inputs: dict[str, Path],
                                                    tmp_path: Path) -> None:
    from recallfix.analysis.data.facts import FactsFormatError

    model = tiny_dirs["llama"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "The capital of France is"}\n')
    with pytest.raises(FactsFormatError, match="bad.jsonl:1.*answer"):
        run_analysis(model, bad, tmp_path / "r1", config=FAST)
    one = tmp_path / "one.jsonl"
    one.write_text('{"prompt": "The capital of France is", "answer": "Paris", "subject": "France"}\n')
    with pytest.raises(AnalysisError, match="one.jsonl.*split is empty"):
        run_analysis(model, one, tmp_path / "r2", config=FAST)
    short = tmp_path / "short.txt"
    short.write_text("only one line\n")
    with pytest.raises(AnalysisError, match="short.txt.*at least 2"):
        run_analysis(model, inputs["facts"], tmp_path / "r3", neutral=short, config=FAST)
    with pytest.raises(FactsFormatError, match="missing.jsonl"):
        run_analysis(model, inputs["facts"], tmp_path / "r4", unknown=tmp_path / "missing.jsonl", config=FAST)
    with pytest.raises(AnalysisError, match="final layer"):
        run_analysis(model, inputs["facts"], tmp_path / "r5", config=replace(FAST, components=("L0H0",)))
    for i in range(1, 6):
        assert not (tmp_path / f"r{i}").exists(), "a failed run must leave no run directory"
    existing = tmp_path / "exists"
    existing.mkdir()
    with pytest.raises(FileExistsError, match="--force"):
        run_analysis(model, inputs["facts"], existing, config=FAST)


def test_cli_analyze_and_its_errors(tiny_dirs: dict[str, Path], inputs: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code = recallfix_main(["analyze", "--model", str(tiny_dirs["opt"]), "--facts", str(inputs["facts"]),
                           "--unknown", str(inputs["unknown"]), "--neutral", str(inputs["neutral"]),
                           "--out", str(out), "--n-boot", "20", "--batch-size", "4", "--components", "L1H1,L1MLP",
                           "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    assert f"report: {out / 'report.md'}" in printed
    doc = validate_run(out)
    assert doc["data"]["n_unknown"] == 3
    assert doc["command"].startswith("recallfix ")  # sys.argv: the pytest command line here
    for method in doc["evaluation"]["methods"]:
        assert Patch.load(out / method["file"]).provenance.command == doc["command"]
    assert ("patch.json" in printed) == (doc["evaluation"]["chosen"] is not None)
    code = recallfix_main(["analyze", "--model", str(tiny_dirs["opt"]), "--facts", str(tmp_path / "nope.jsonl"),
                           "--out", str(tmp_path / "run2"), "--no-progress"])
    assert code == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_require_turns_findings_into_checks_with_an_exit_code(tiny_dirs: dict[str, Path], inputs: dict[str, Path],
                                                              tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """--require: a check on a measured finding passes or fails by its value; the exit code says which; a malformed
    check is refused before the run. Also: without --unknown, the unknown subjects are invented in the test
    templates (always measured), and --method intercept alone writes the bias patch as patch.json."""
    base = ["analyze", "--model", str(tiny_dirs["llama"]), "--facts", str(inputs["facts"]), "--neutral",
            str(inputs["neutral"]), "--n-boot", "20", "--batch-size", "4", "--method", "intercept", "--no-progress"]
    out = tmp_path / "pass"
    code = recallfix_main([*base, "--out", str(out), "--require",
                           "block.lowers_share>=0,intercept.nll_change.ci_high>-1000"])
    assert code == 0, capsys.readouterr()
    doc = validate_run(out)
    assert [c["passed"] for c in doc["checks"]] == [True, True]
    share = doc["findings"]["test"]["share_suppressed"]
    assert doc["checks"][0]["value"] == share
    assert doc["data"]["unknown_source"].startswith("invented") and doc["data"]["n_unknown"] > 0
    assert doc["evaluation"]["unknown"]["n"] == doc["data"]["n_unknown"]
    assert doc["patch"] is None and doc["evaluation"]["chosen"] == "intercept"
    patch = Patch.load(out / "patch.json")
    assert [e.component for e in patch.edits] == [doc["intercept"]["component"]]
    capsys.readouterr()
    # the same finding against a threshold it cannot meet: exit code 1, the check printed as FAIL
    code = recallfix_main([*base, "--out", str(tmp_path / "fail"), "--require", f"block.lowers_share>{share + 0.5}"])
    assert code == 1
    assert "[FAIL] block.lowers_share >" in capsys.readouterr().out
    assert "| **FAIL** |" in (tmp_path / "fail" / "report.md").read_text()
    for bad, message in (("block.lowers_share=>1", "not a check set"), ("nonsense.finding<1", "no finding named"),
                         (str(tmp_path / "missing.json"), "missing.json")):
        code = recallfix_main([*base, "--out", str(tmp_path / "bad"), "--require", bad])
        assert code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()
