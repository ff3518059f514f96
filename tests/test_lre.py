"""The LRE relations as the named facts set `lre`: vendored unchanged, read with the reader's normalisation policy
(counted, logged, recorded), selected by relation and by templates, split by relation, and analysed end to end
with the transfer per relation in the report; compare and the lm-eval task select the same facts."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from tiny import save_model

from recallfix.analysis.compare.client import CompareError
from recallfix.analysis.compare.run import select_facts
from recallfix.analysis.config import AnalysisConfig, CompareConfig
from recallfix.analysis.data.facts import (
    SPLIT_BY,
    SPLITS,
    TEMPLATE_KEYS,
    Fact,
    FactsFormatError,
    FactsSelectionError,
    SplitError,
    assign_splits,
    dataset_sha256,
    load_shipped_facts,
    read_facts,
)
from recallfix.analysis.data.inputs import select_known, subject_group, subsample
from recallfix.analysis.data.sets import FACTS_HELP, FACTS_SETS, lre_facts_dir, resolve_facts
from recallfix.analysis.pipeline import inputs_key
from recallfix.patches.cli import main as recallfix_main

ROOT = Path(__file__).resolve().parents[1]
LRE = lre_facts_dir()
# sha256 of each vendored file: the upstream bytes (evandez/relations, data/factual/, commit 1b9ec3c) unchanged
VENDORED = {
    "LICENSE": "45f55e5b125dcdd0bcd8d4f8ed4db7a75ce892901e4ebfcbc485d3915dcd760c",
    "city_in_country.json": "5fd8f9e99e6d8567d05cfb4e7c9324ed03b07ba1ebf827614b7b58a811bc11a5",
    "company_ceo.json": "c75f9b31c872b85601b7163b2c7a8f11c439f2852a876d5a126401d57ea3a81b",
    "country_capital_city.json": "9945d2da1fa1145c1d7e59ac61a25ebee74299c00bd53fc9308167f9e1d44fc0",
    "country_currency.json": "4a1a49afbdc4792fc330196475f456a22bc49dfe0ec9eb966439e4f36081d99b",
    "country_language.json": "0996525735107934f0d2e467e6fac7d2c785c42e8300ccb41ae6e9b5dfde2b76",
    "landmark_in_country.json": "58d545ec481a0d22be5f8ce1f50410093349daf002f3e7c1f8ad26c2c1fde581",
    "landmark_on_continent.json": "64ec992304e0cc91ac4ada2e7d32d13401e171ea9e09fa65525273842b82160b",
    "person_band_lead_singer.json": "ad4943c8bc14d649577dafce7acb8d81b2a56ea1f39ca806cdba20880dcd6742",
    "person_father.json": "796e03665de86d7441b2374fb443c1ddebc77749c01c4bab92c571fda4c8753d",
    "person_mother.json": "bcf99ade0df1d9d8a03d40149aaf054cc7ecbd7f20ec6afe071d9361d2875d02",
    "person_native_language.json": "ad6f699fbad04cecf45a424713249803921598187c6302dd2a8e20702f4c1928",
    "person_occupation.json": "57e89f94c17ff0fd55d5e3ad3aa24ee5e118a3ff7447fff88457113a0e4ce7a7",
    "person_plays_position_in_sport.json": "adfc0605d1f31809329171e9ef348ca354b372934d8197e6e20693b0cb9e1c6f",
    "person_plays_pro_sport.json": "adfea3a51c0315818a63ec0a421fba45818f3854212f9999910c80eac934165c",
    "pokemon_evolutions.json": "254e3982935571cfd4311ea774da0d2a4b2a577c6c86e0f74508a9651efc6494",
    "presidents_birth_year.json": "4b6e7cf48aff48db010a0aa78ab674f0cebeb2d950203d0723a1e7227cb3ad23",
    "presidents_election_year.json": "16a81b72fd253b82d7571d63e0e5ed3906eb62fde565b31ed2cd81967bfc46ee",
    "superhero_person.json": "3b3a3a03d4b5c0b91343d4e7d562a434a17ae85ef286ed151bafee65c19a7804",
}
# What the reader changes in the upstream files, per file: (whitespace, escapes, duplicates, ambiguous).
CHANGES = {
    "country_capital_city.json": (0, 2, 0, 0),  # "Bras\\u00edlia", "Bogot\\u00e1": double-escaped upstream
    "landmark_in_country.json": (0, 0, 0, 2),
    "landmark_on_continent.json": (0, 0, 0, 4),
    "person_band_lead_singer.json": (1, 0, 0, 0),  # "Bon Jovi "
    "person_native_language.json": (0, 0, 0, 2),
    "presidents_birth_year.json": (1, 0, 1, 0),  # "Jimmy Carter "; Richard Nixon twice
    "presidents_election_year.json": (1, 0, 0, 0),  # "Jimmy Carter "
    "superhero_person.json": (0, 0, 0, 17),  # 7 heroes with several identities
}
SMALL = ("country capital city", "person lead singer of band", "president birth year")  # 48 + 21 + 18 prompts


def raw_docs() -> dict[str, dict]:
    return {p.name: json.loads(p.read_bytes()) for p in sorted(LRE.glob("*.json"))}


@pytest.fixture(scope="module")
def lre() -> dict[str, list[Fact]]:
    return {kind: read_facts(resolve_facts("lre"), templates=kind).facts for kind in TEMPLATE_KEYS}


# -- the vendored data ------------------------------------------------------------------------------------------


def test_vendored_files_are_the_upstream_bytes_with_licence_and_citation() -> None:
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in LRE.iterdir()
            if p.name != "README.md"} == VENDORED
    assert "MIT License" in (LRE / "LICENSE").read_text()
    readme = (LRE / "README.md").read_text()
    assert "Linearity of Relation Decoding in Transformer Language Models" in readme and "1b9ec3c" in readme


def test_named_sets_resolve_and_a_path_stays_a_path(tmp_path: Path) -> None:
    assert resolve_facts("lre") == LRE and resolve_facts("shipped") == resolve_facts(None)
    assert resolve_facts("shipped").name == "shipped"
    assert resolve_facts(Path("lre")) == Path("lre")  # a Path is a path, even one called like a set
    assert resolve_facts("./lre") == Path("lre") and resolve_facts(str(tmp_path)) == tmp_path
    assert all(name in FACTS_HELP for name in FACTS_SETS)


def test_lre_prompt_counts_follow_the_files(lre: dict[str, list[Fact]]) -> None:
    docs = raw_docs()
    assert len(docs) == 18
    # the files' own count (the upstream README's 9,584), then what is read: each dropped sample takes its prompts
    assert sum(len(d["samples"]) * len(d["prompt_templates"]) for d in docs.values()) == 9584
    by_relation = Counter(f.relation for f in lre["default"])
    for name, doc in docs.items():
        dropped = sum(CHANGES.get(name, (0, 0, 0, 0))[2:])
        for kind, key in TEMPLATE_KEYS.items():
            facts = [f for f in lre[kind] if f.relation == doc["name"]]
            assert len(facts) == (len(doc["samples"]) - dropped) * len(doc[key]), (name, kind)
            assert {f.template for f in facts} == set(doc[key])
            assert all(f.prompt == f.template.format(f.subject) for f in facts)
    assert len(lre["default"]) == 9558 and len(lre["zs"]) == 15962
    # the README's table is what is read
    rows = re.findall(r"^\| ([^|*]+?) \| `([a-z_]+\.json)` \| (\d+) \| (\d+) \| (\d+) \|$",
                      (LRE / "README.md").read_text(), re.M)
    assert len(rows) == 18
    for name, _, subjects, default, zs in rows:
        assert len({f.subject for f in lre["default"] if f.relation == name}) == int(subjects)
        assert (by_relation[name], sum(f.relation == name for f in lre["zs"])) == (int(default), int(zs))


def test_lre_normalisation_counts_warnings_and_values(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="recallfix.analysis.data.facts"):
        read = read_facts(LRE)
    got = {c.file: (c.whitespace, c.escapes, c.duplicates, c.ambiguous) for c in read.cleaning}
    assert got == CHANGES
    assert sum(c[0] for c in got.values()) == 3
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == len(CHANGES)  # one line per changed file, naming it and its counts
    assert any(line.startswith(f"{LRE / 'presidents_birth_year.json'}: normalised: 1 value(s) stripped") and
               "1 exact duplicate sample(s) dropped (18 of 19 samples kept)" in line for line in lines)
    answers = {(f.relation, f.subject): f.answer for f in read.facts}
    assert answers["country capital city", "Brazil"] == "Brasília"
    assert answers["country capital city", "Colombia"] == "Bogotá"
    assert answers["person lead singer of band", "Jon Bon Jovi"] == "Bon Jovi"
    assert "Jimmy Carter was born in" in {f.prompt for f in read.facts}
    assert not any(f.subject == "Green Lantern" for f in read.facts)
    prompts: dict[str, set[str]] = defaultdict(set)
    for f in read.facts:
        prompts[f.prompt].add(f.answer)
        assert f.answer == f.answer.strip() and "\\u" not in f.answer and f.subject == f.subject.strip()
    assert all(len(a) == 1 for a in prompts.values())  # no prompt asks for two answers
    assert len(set(read.facts)) == len(read.facts)
    assert read_facts(resolve_facts("shipped")).cleaning == []  # the shipped set is clean


def test_normalisation_on_small_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    relation = {"name": " capitals ", "prompt_templates": ["The capital of {} is"],
                "samples": [{"subject": "France", "object": "Paris"}, {"subject": "France ", "object": " Paris"},
                            {"subject": "Peru", "object": "Lima"}, {"subject": "Georgia", "object": "Tbilisi"},
                            {"subject": "Georgia", "object": "Atlanta"}, {"subject": "Brazil",
                                                                          "object": "Bras\\u00edlia"}]}
    (tmp_path / "a.json").write_text(json.dumps(relation))
    lines = [{"prompt": "Gold has the symbol", "answer": "Au"}, {"prompt": "Gold has the symbol ", "answer": "Au"},
             {"prompt": "Iron has the symbol", "answer": "Fe"}, {"prompt": "Iron has the symbol", "answer": "Ir"},
             {"prompt": "Tin has the symbol", "answer": "Sn"}]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    with caplog.at_level(logging.WARNING, logger="recallfix.analysis.data.facts"):
        read = read_facts(tmp_path)
    assert [(f.prompt, f.answer) for f in read.facts] == [
        ("The capital of France is", "Paris"), ("The capital of Peru is", "Lima"),
        ("The capital of Brazil is", "Brasília"), ("Gold has the symbol", "Au"), ("Tin has the symbol", "Sn")]
    assert {f.relation for f in read.facts} == {"capitals", None}
    assert [c.as_dict() for c in read.cleaning] == [
        {"file": "a.json", "samples": 6, "kept": 3, "whitespace": 3, "escapes": 1, "duplicates": 1, "ambiguous": 2},
        {"file": "b.jsonl", "samples": 5, "kept": 2, "whitespace": 1, "escapes": 0, "duplicates": 1, "ambiguous": 2}]
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'a.json'}: normalised: 3 value(s) stripped of surrounding whitespace; 1 value(s) with literal "
        "\\uXXXX escapes decoded; 1 exact duplicate sample(s) dropped; 2 sample(s) dropped whose question has more "
        "than one answer (3 of 6 samples kept)",
        f"{tmp_path / 'b.jsonl'}: normalised: 1 value(s) stripped of surrounding whitespace; 1 exact duplicate "
        "sample(s) dropped; 2 sample(s) dropped whose question has more than one answer (2 of 5 samples kept)"]
    # what cannot be repaired is still refused, naming the file, the JSON path and the field
    relation["samples"].append({"subject": "Chile", "object": 3})
    (tmp_path / "a.json").write_text(json.dumps(relation))
    with pytest.raises(FactsFormatError, match=r"a\.json: samples\[6\]: field 'object' must be a non-empty string"):
        read_facts(tmp_path)
    (tmp_path / "a.json").write_text(json.dumps({**relation, "samples": relation["samples"][3:5]}))
    with pytest.raises(FactsFormatError, match=r"a\.json: no sample left after normalisation \(.*2 sample\(s\) drop"):
        read_facts(tmp_path / "a.json")


# -- choosing relations and templates -----------------------------------------------------------------------------


def test_relations_select_and_an_unknown_name_lists_the_available(tmp_path: Path) -> None:
    facts = read_facts(LRE, relations=("company CEO", "president birth year")).facts
    assert Counter(f.relation for f in facts) == {"company CEO": 596, "president birth year": 18}
    with pytest.raises(FactsSelectionError) as err:
        read_facts(LRE, relations=("company CEO", "capital of", "nope"))
    message = str(err.value)
    assert message.startswith(f"{LRE}: no relation named 'capital of', 'nope'; its relations: 'city in country'")
    assert all(repr(doc["name"]) in message for doc in raw_docs().values())
    # JSONL records select by their own relation; the selection's warnings are only the selected files'
    (tmp_path / "x.jsonl").write_text('{"prompt": "a ", "answer": "b", "relation": "r"}\n'
                                      '{"prompt": "c", "answer": "d", "relation": "s"}\n')
    read = read_facts(tmp_path, relations=("s",))
    assert read.facts == [Fact("c", "d", relation="s")] and read.cleaning == []
    assert read_facts(LRE, relations=SMALL).cleaning[0].file == "country_capital_city.json"


def test_zero_shot_templates_and_files_without_them(tmp_path: Path) -> None:
    facts = read_facts(LRE, templates="zs", relations=("country capital city",)).facts
    assert facts[0].prompt == "The capital of United States is the city of"
    assert dataset_sha256(facts) != dataset_sha256(read_facts(LRE, relations=("country capital city",)).facts)
    with pytest.raises(FactsFormatError, match=r"shipped/animal_class\.json: no field 'prompt_templates_zs'"):
        read_facts(resolve_facts("shipped"), templates="zs")
    (tmp_path / "f.jsonl").write_text('{"prompt": "a", "answer": "b"}\n')
    with pytest.raises(FactsFormatError, match=r"f\.jsonl: a JSONL file has no zero-shot templates"):
        read_facts(tmp_path, templates="zs")
    with pytest.raises(FactsSelectionError, match="templates must be one of default, zs"):
        read_facts(LRE, templates="few")


# -- splitting by relation ----------------------------------------------------------------------------------------


def test_split_by_relation_keeps_whole_relations_apart(lre: dict[str, list[Fact]]) -> None:
    facts = lre["default"]
    split = assign_splits(facts, seed=0, by="relation")
    assert [(f.prompt, f.answer) for f in split] == [(f.prompt, f.answer) for f in facts]  # order kept
    where: dict[str, set[str | None]] = defaultdict(set)
    for f in split:
        where[f.relation or ""].add(f.split)
    assert all(len(s) == 1 for s in where.values()), "a relation crosses splits"
    counts = Counter(next(iter(s)) for s in where.values())
    assert counts == {"train": 11, "dev": 4, "test": 3}  # 60/20/20 of 18 relations, largest remainder
    test = {r for r, s in where.items() if s == {"test"}}
    assert {f.relation for f in split if f.split in ("train", "dev")}.isdisjoint(test)
    assert split == assign_splits(facts, seed=0, by="relation")
    assert {r for r, s in where.items() if s == {"test"}} != {
        f.relation for f in assign_splits(facts, seed=1, by="relation") if f.split == "test"}
    # three relations: one each (largest remainders alone would give 2, 1, 0)
    three = assign_splits([f for f in facts if f.relation in SMALL], seed=0, by="relation")
    assert sorted(Counter(f.split for f in three)) == sorted(SPLITS)
    assert all(len({f.split for f in three if f.relation == r}) == 1 for r in SMALL)
    with pytest.raises(SplitError, match="at least 3 relations.*the facts have 2: country capital city, president"):
        assign_splits([f for f in facts if f.relation in SMALL[::2]], by="relation")
    with pytest.raises(SplitError, match="1 facts carry no relation"):
        assign_splits([*facts[:50], Fact("a", "b")], by="relation")
    assert SPLIT_BY == ("subject", "relation")


def test_split_by_subject_is_what_it_was() -> None:
    """The default split of the shipped set, pinned from before --split-by existed: runs and patches made then
    keep their dataset sha256."""
    facts = load_shipped_facts()
    assert dataset_sha256(assign_splits(facts, seed=0)) == \
        "9143cb117c5e2452c8bc67b4c7e249260d1fc0d81021d548a57bb5f64edd278c"
    assert dataset_sha256(assign_splits(facts, seed=7, by="subject")) == \
        "93f6055358ca802823290769f660d1b9e212e462e4be8492b28285c0ebae9b50"


def test_max_facts_by_relation_keeps_every_relation_and_is_stable(lre: dict[str, list[Fact]]) -> None:
    split = assign_splits(lre["default"], seed=0, by="relation")
    small = subsample(split, 60, 0, by="relation")
    assert {f.relation for f in small} == {f.relation for f in split}  # so every split keeps a relation
    assert {f.split for f in small} == set(SPLITS)
    sizes = Counter(subject_group(f) for f in split)
    assert Counter(subject_group(f) for f in small) == {g: sizes[g] for g in {subject_group(f) for f in small}}
    assert 60 <= len(small) < 60 + max(sizes.values())  # whole subjects until 60 prompts
    assert subsample(split, len(small), 0, by="relation") == small  # how compare --run finds them again
    bigger = subsample(split, 2000, 0, by="relation")
    assert 2000 <= len(bigger) < 2010 and subsample(split, len(bigger), 0, by="relation") == bigger
    assert len({f.relation for f in subsample(split, 60, 0)}) < 18  # by subject: small relations can go missing


def test_settings_change_the_fingerprints(tmp_path: Path) -> None:
    def sha(**settings: object) -> str:
        chosen = {"templates": "default", "relations": SMALL, "split_by": "subject", **settings}
        return dataset_sha256(select_known("lre", seed=0, max_facts=None, **chosen).facts)  # type: ignore[arg-type]

    shas = [sha(), sha(relations=SMALL[:2] + ("city in country",)), sha(templates="zs"), sha(split_by="relation")]
    assert len(set(shas)) == 4
    model = tmp_path / "model"  # inputs_key reads a model directory's file names and sizes, nothing more
    model.mkdir()
    (model / "config.json").write_text("{}")
    configs = [AnalysisConfig(), AnalysisConfig(relations=SMALL), AnalysisConfig(templates="zs"),
               AnalysisConfig(split_by="relation")]
    keys = {inputs_key(model, "lre", None, None, c) for c in configs} | {inputs_key(model, "shipped", None, None,
                                                                                   AnalysisConfig())}
    assert len(keys) == 5
    # the CLI's choices are the reader's
    fields = AnalysisConfig.__dataclass_fields__
    assert fields["templates"].metadata["choices"] == tuple(TEMPLATE_KEYS)
    assert fields["split_by"].metadata["choices"] == SPLIT_BY
    assert (CompareConfig.templates, CompareConfig.relations) == (AnalysisConfig.templates, AnalysisConfig.relations)


# -- end to end ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`recallfix analyze --facts lre --relations ... --split-by relation` on a tiny random GPT-2. The intercept
    fix is the one candidate: it is fitted in one regression (the gain fits take tens of epochs), and the transfer
    table reads every candidate alike."""
    root = tmp_path_factory.mktemp("lre-run")
    model = save_model("gpt2", root / "model")
    out = root / "run"
    code = recallfix_main(["analyze", "--model", str(model), "--facts", "lre", "--relations", ",".join(SMALL),
                           "--split-by", "relation", "--out", str(out), "--n-boot", "20", "--batch-size", "32",
                           "--method", "intercept", "--mechanism-prompts", "16", "--unknown-per-template", "2",
                           "--no-progress"])
    assert code == 0
    return out


def test_analyze_lre_split_by_relation_reports_the_transfer(run: Path) -> None:
    doc = json.loads((run / "analysis.json").read_text())
    data = doc["data"]
    assert (data["facts_path"], data["split_by"], data["templates"]) == ("lre", "relation", "default")
    assert data["selected_relations"] == list(SMALL)
    assert data["n_facts"] + data["n_dropped"] == 48 + 21 + 18
    parts = data["split_relations"]
    assert sorted(r for names in parts.values() for r in names) == sorted(SMALL)  # each relation in one split
    assert all(len(parts[s]) == 1 for s in SPLITS)
    assert {c["file"]: (c["whitespace"], c["escapes"], c["duplicates"], c["ambiguous"]) for c in data["cleaning"]} \
        == {k: v for k, v in CHANGES.items() if k in ("country_capital_city.json", "person_band_lead_singer.json",
                                                        "presidents_birth_year.json")}
    by_relation = doc["evaluation"]["by_relation"]
    (test_relation,) = parts["test"]
    assert list(by_relation) == [test_relation]
    assert by_relation[test_relation]["n"] == data["splits"]["test"]
    change = by_relation[test_relation]["differences"]["intercept_minus_base"]
    assert set(change) >= {"accuracy", "nll"} and change["nll"]["ci_low"] <= change["nll"]["value"] <= \
        change["nll"]["ci_high"]
    report = (run / "report.md").read_text()
    section = report[report.index("#### Transfer per relation (test split, split by relation)"):]
    assert "| relation | in train/dev | prompts | subjects | base accuracy | base NLL (nats) |" in section
    row = next(line for line in section.splitlines() if line.startswith(f"| {test_relation} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:3] == ["**no**", str(data["splits"]["test"])]
    assert cells[5].startswith(f"{by_relation[test_relation]['models']['base']['nll']['value']:.3f} [")
    assert "Facts normalised on reading: `country_capital_city.json`: 2 value(s) with literal \\u escapes decoded " \
           "(24 of 24 samples kept); " in report
    assert "`presidents_birth_year.json`: 1 value(s) stripped of surrounding whitespace, 1 exact duplicate(s) " \
           "dropped (18 of 19 samples kept)." in report
    assert "by relation, seed 0; templates: default; relations asked for: country capital city," in report
    assert f"| relations per split | train: {parts['train'][0]}; dev: {parts['dev'][0]}; test: {test_relation} |" \
        in report


def test_compare_and_lm_eval_select_the_run_facts(run: Path) -> None:
    doc = json.loads((run / "analysis.json").read_text())
    test_relation = doc["data"]["split_relations"]["test"][0]
    every = select_facts(None, run, None)
    assert every.path == "lre" and dataset_sha256(every.facts) == doc["data"]["facts_sha256"]
    test = select_facts(None, run, "test").facts
    assert {f.relation for f in test} == {test_relation} and len(test) == doc["data"]["splits"]["test"]
    assert select_facts(None, run, "test", relations=SMALL[::-1], templates="default").facts == test
    with pytest.raises(CompareError, match="analysed with --templates default, not zs"):
        select_facts(None, run, "test", templates="zs")
    with pytest.raises(CompareError, match="analysed with --relations .*, not company CEO"):
        select_facts(None, run, None, relations=("company CEO",))
    # without a run: the set by name, with --relations and --templates
    named = select_facts("lre", None, None, relations=("company CEO",), templates="zs")
    assert named.path == "lre" and len(named.facts) == 596
    spec = importlib.util.spec_from_file_location("lm_eval_utils", ROOT / "evals" / "lm_eval" / "utils.py")
    assert spec is not None and spec.loader is not None
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    rows = utils.load_facts(facts="lre", relations="company CEO, president birth year", templates="zs")["test"]
    expected = select_facts("lre", None, None, relations=("company CEO", "president birth year"), templates="zs")
    assert rows["prompt"] == [f.prompt for f in expected.facts] and len(rows) == 596 + 18
    assert utils.load_facts(run=str(run), split="test")["test"]["prompt"] == [f.prompt for f in test]
