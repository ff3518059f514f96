"""The demo model builder: a real (tiny) training run, checked for the behaviour the project relies on.

The tiny size is built once per session (~15 s of CPU) and a second time only to check determinism and
--force.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from recallfix.analysis.data.facts import Fact, answer_token_ids, load_facts, shipped_facts_dir
from recallfix.analysis.demo_model import build as dm

# Share of the shipped facts on which the last layer must lower p(answer). The default size does so on
# ~99% (seeds 0 and 1: 98.8%, 96.4%); the tiny size (2 layers, width 64, 550 steps) on 88% / 92%, so it
# is held to a looser bar.
TINY_MIN_SUPPRESSED_SHARE = 0.7


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Tests share busy cores with other work; a second OpenMP thread would mostly spin and slow them down.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dm.build_demo_model(tmp_path_factory.mktemp("demo") / "tiny", size="tiny", seed=0, progress=False)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir: Path) -> tuple[LlamaForCausalLM, AutoTokenizer]:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_dir)


def test_is_a_loadable_llama_checkpoint(tiny_dir: Path, tiny_model: tuple) -> None:
    model, tok = tiny_model
    for name in dm.REQUIRED_FILES:
        assert (tiny_dir / name).is_file(), name
    assert not list(tiny_dir.glob("*.bin")), "weights must be safetensors only"
    assert isinstance(model, LlamaForCausalLM)
    cfg = model.config
    assert cfg.head_dim in (32, 64) and cfg.hidden_size == cfg.num_attention_heads * cfg.head_dim
    assert cfg.tie_word_embeddings is False
    assert cfg.vocab_size == len(tok) <= 2048
    for token in ("bos", "eos", "pad", "unk"):
        assert getattr(tok, f"{token}_token_id") is not None, token
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    ids = tok("The capital of France is")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == "The capital of France is"
    # It speaks: greedy generation stops at </s> with some text in between.
    out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    assert out.shape[1] > len(ids)


def _logit_lens(model: LlamaForCausalLM, tok, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token distributions before (input of the last layer, via final norm + unembedding) and after
    the last layer; written independently of the builder's own measurement (no padding: prompts are run
    in groups of equal token length)."""
    encoded = [tok(p)["input_ids"] for p in prompts]
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    before = torch.empty(len(prompts), len(tok))
    after = torch.empty(len(prompts), len(tok))
    for rows in by_length.values():
        with torch.no_grad():
            out = model(input_ids=torch.tensor([encoded[i] for i in rows]), output_hidden_states=True)
        # hidden_states: embeddings, then the output of each layer; entry -2 enters the last layer.
        resid = out.hidden_states[-2][:, -1]
        before[rows] = model.lm_head(model.model.norm(resid)).softmax(-1)
        after[rows] = out.logits[:, -1].softmax(-1)
    return before, after


def test_final_layer_suppresses_known_answers(tiny_dir: Path, tiny_model: tuple) -> None:
    model, tok = tiny_model
    facts = load_facts(shipped_facts_dir())
    answer = torch.tensor(answer_token_ids(tok, facts))
    before, after = _logit_lens(model, tok, [f.prompt for f in facts])
    rows = torch.arange(len(facts))
    p_before, p_after = before[rows, answer], after[rows, answer]
    share = (p_after < p_before).float().mean().item()
    assert share >= TINY_MIN_SUPPRESSED_SHARE, f"last layer lowers p(answer) on only {share:.0%} of facts"
    assert p_after.mean() < p_before.mean()
    # The model does know facts (it trained on all of them): well above chance before the last layer.
    assert (before.argmax(-1) == answer).float().mean() > 0.1

    # The manifest and the model card report the same effect.
    manifest = json.loads((tiny_dir / dm.MANIFEST).read_text())
    final = manifest["final"]
    assert final["n"] == len({(f.prompt, f.answer) for f in load_facts(shipped_facts_dir())})
    assert abs(final["share_suppressed"] - share) < 0.1
    assert final["mean_p_after"] < final["mean_p_before"]
    card = (tiny_dir / "README.md").read_text()
    assert f"{final['share_suppressed']:.1%}" in card and "seed 0" in card


def test_unknown_facts_and_neutral_text(tiny_dir: Path, tiny_model: tuple) -> None:
    model, tok = tiny_model
    shipped = load_facts(shipped_facts_dir())
    known_subjects = {f.subject for f in shipped}
    templates = {r: {f.template for f in shipped if f.relation == r} for r in {f.relation for f in shipped}}

    lines = (tiny_dir / dm.UNKNOWN_FACTS).read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert records and all(set(r) == {"prompt", "answer", "subject", "relation"} for r in records)
    assert {r["relation"] for r in records} == set(templates), "every relation has unknown subjects"
    for r in records:
        assert r["subject"] not in known_subjects
        assert any(t.format(r["subject"]) == r["prompt"] for t in templates[r["relation"]]), r
    # Readable by the project's own facts loader (JSONL format).
    unknown = load_facts(tiny_dir / dm.UNKNOWN_FACTS)
    assert len(unknown) == len(records) and isinstance(unknown[0], Fact)
    # The model never learned these: it gives the fictional answer far less probability than known answers.
    answer = torch.tensor(answer_token_ids(tok, unknown))
    _, after = _logit_lens(model, tok, [f.prompt for f in unknown])
    assert after[torch.arange(len(unknown)), answer].mean() < 0.05

    neutral = (tiny_dir / dm.NEUTRAL).read_text(encoding="utf-8").splitlines()
    assert len(neutral) >= 50 and all(line.strip() for line in neutral)
    assert len(set(neutral)) == len(neutral)
    # Neutral means no facts and no (fictional) subjects.
    assert not any(f.prompt in line for f in shipped for line in neutral)
    assert not any(r["subject"] in line for r in records for line in neutral)
    # It learned the language of the corpus: held-out neutral text is far more likely than uniform.
    nll = json.loads((tiny_dir / dm.MANIFEST).read_text())["neutral_nll"]
    assert nll < 0.5 * torch.log(torch.tensor(float(len(tok)))).item()


def test_cached_build_returns_without_training(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tiny_dir / "model.safetensors"
    mtime, digest = weights.stat().st_mtime_ns, sha256(weights)

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("cached model was rebuilt")

    monkeypatch.setattr(dm, "_train", no_training)
    assert dm.build_demo_model(tiny_dir, size="tiny", seed=0, progress=False) == tiny_dir.resolve()
    assert weights.stat().st_mtime_ns == mtime and sha256(weights) == digest
    # A different recipe (another seed) is not served from the cache.
    with pytest.raises(AssertionError, match="rebuilt"):
        dm.build_demo_model(tiny_dir, size="tiny", seed=1, progress=False)
    assert sha256(weights) == digest, "a failed build must leave the old model in place"
    assert not [p for p in tiny_dir.parent.iterdir() if p.name.startswith(".")], "temp dirs left behind"


def test_force_rebuild_is_bit_identical(tiny_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_dir, copy)
    before = (copy / "model.safetensors").stat().st_mtime_ns
    dm.build_demo_model(copy, size="tiny", seed=0, force=True, progress=False)
    assert (copy / "model.safetensors").stat().st_mtime_ns != before, "--force did not rebuild"
    for name in ("model.safetensors", "tokenizer.json", "config.json", dm.UNKNOWN_FACTS, dm.NEUTRAL):
        assert sha256(copy / name) == sha256(tiny_dir / name), f"{name} differs between builds"


def test_refuses_to_overwrite_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(FileExistsError):
        dm.build_demo_model(tmp_path, size="tiny", progress=False)
    assert (tmp_path / "notes.txt").read_text() == "not a model"
    with pytest.raises(ValueError, match="unknown size"):
        dm.build_demo_model(tmp_path / "x", size="huge", progress=False)


def test_cli_subcommand(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from recallfix.analysis.cli import register

    parser = argparse.ArgumentParser(prog="recallfix")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["demo-model", "--out", str(tmp_path / "m"), "--size", "tiny", "--seed", "3"])
    calls: list[tuple] = []
    monkeypatch.setattr(dm, "build_demo_model", lambda out, **kw: calls.append((out, kw)) or Path(out))
    assert args.func(args) == 0
    assert calls == [(tmp_path / "m", {"size": "tiny", "seed": 3, "force": False})]
