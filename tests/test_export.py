"""In memory, merged checkpoint and PEFT LoRA adapter: three ways to apply a patch, all equal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_runner import recallfix
from peft import PeftModel
from safetensors import safe_open
from tiny import ARCHITECTURES, PROMPTS
from transformers import AutoModelForCausalLM, AutoTokenizer

from recallfix.patches import (
    Component,
    FingerprintMismatchError,
    Patch,
    PatchError,
    apply_patch,
    check_patch_against,
    make_patch,
)
from recallfix.patches.export import (
    LoraUnsupportedError,
    MergedUnsupportedError,
    export_lora,
    export_merged,
    export_refusals,
)
from recallfix.patches.patch import BiasEdit

LORA_ARCHS = ["opt", "llama", "mistral", "qwen2", "qwen3", "gemma3_text"]
BIAS_MERGED = ["gpt2", "opt", "llama", "gpt_neox"]  # MLP output bias, or (Llama) the mlp_bias switch
BIAS_REFUSED = ["mistral", "qwen2", "qwen3"]  # no bias and no switch: transformers and vLLM would drop it
EDITS = {"L1H0": 0.5, "L1H1": 1.5, "L1N3": 1.7, "L0N5": 0.2}


def load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def logits(model: torch.nn.Module, tokenizer) -> torch.Tensor:  # noqa: ANN001
    tokenizer.padding_side = "left"
    return model(**tokenizer(PROMPTS, return_tensors="pt", padding=True)).logits.float()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_in_memory_merged_and_lora_agree(arch: str, tiny_dirs, tmp_path) -> None:
    base_dir = tiny_dirs[arch]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = load(base_dir)
    patch = make_patch(model, EDITS)
    base = logits(model, tokenizer)
    with apply_patch(model, patch):
        in_memory = logits(model, tokenizer)
    assert (in_memory - base).abs().max() > 1e-2, "the patch should change the logits"

    merged = logits(load(export_merged(base_dir, patch, tmp_path / "merged")), tokenizer)
    assert (merged - in_memory).abs().max() <= 1e-5

    if arch in LORA_ARCHS:
        adapter = export_lora(base_dir, patch, tmp_path / "lora")
        config = json.loads((adapter / "adapter_config.json").read_text())
        head_dim = model.config.hidden_size // model.config.num_attention_heads
        assert config["r"] == config["lora_alpha"] == 2 * head_dim + 2
        with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
            modules = {k.split(".lora_")[0] for k in f.keys()}  # noqa: SIM118
        assert len(modules) == 3, "only the edited projections of the edited layers"
        peft_model = PeftModel.from_pretrained(load(base_dir), adapter).eval()
        assert (logits(peft_model, tokenizer) - in_memory).abs().max() <= 1e-5
    else:
        with pytest.raises(LoraUnsupportedError, match=f"vLLM cannot serve LoRA adapters on {arch}.*merged"):
            export_lora(base_dir, patch, tmp_path / "lora")
        assert not (tmp_path / "lora").exists()


def test_lora_refuses_a_whole_mlp_gain_on_a_biased_projection(tiny_dirs, tmp_path) -> None:
    patch = make_patch(load(tiny_dirs["opt"]), {"L1MLP": 0.8})
    with pytest.raises(LoraUnsupportedError, match="L1MLP scales the MLP output bias.*use --format merged"):
        export_lora(tiny_dirs["opt"], patch, tmp_path / "lora")


def test_lora_carries_a_whole_mlp_gain_without_bias(tiny_dirs, tmp_path) -> None:
    base_dir = tiny_dirs["qwen3"]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = load(base_dir)
    patch = make_patch(model, {"L1MLP": 0.7})
    with apply_patch(model, patch):
        in_memory = logits(model, tokenizer)
    peft_model = PeftModel.from_pretrained(load(base_dir), export_lora(base_dir, patch, tmp_path / "lora")).eval()
    assert (logits(peft_model, tokenizer) - in_memory).abs().max() <= 1e-5


def test_lora_refuses_rank_above_512(tiny_dirs, tmp_path) -> None:
    patch = make_patch(load(tiny_dirs["llama"]), {f"L1N{n}": 1.1 for n in range(256)} |
                       {f"L0N{n}": 1.1 for n in range(256)} | {"L1H0": 0.9})
    with pytest.raises(LoraUnsupportedError, match="rank 544, above vLLM's maximum 512"):
        export_lora(tiny_dirs["llama"], patch, tmp_path / "lora")


def test_merged_export_rewrites_only_shards_it_touches(tiny_dirs, tmp_path) -> None:
    base_dir = tiny_dirs["llama"]
    index = json.loads((base_dir / "model.safetensors.index.json").read_text())["weight_map"]
    patch = make_patch(load(base_dir), {"L1H2": 0.5})
    out = export_merged(base_dir, patch, tmp_path / "merged")
    touched = index["model.layers.1.self_attn.o_proj.weight"]
    shards = sorted(set(index.values()))
    assert len(shards) > 2
    for shard in shards:
        same = (base_dir / shard).read_bytes() == (out / shard).read_bytes()
        assert same == (shard != touched), shard
    assert Patch.load(out / "recallfix_patch.json") == patch
    assert (out / "tokenizer.json").exists() and (out / "config.json").exists()


def test_refused_export_writes_nothing(tiny_dirs, tmp_path) -> None:
    patch = make_patch(load(tiny_dirs["llama"]), {"L1H2": 0.5})
    for fmt, export in (("merged", export_merged), ("lora", export_lora)):
        with pytest.raises(FingerprintMismatchError):
            export(tiny_dirs["mistral"], patch, tmp_path / fmt)  # same shapes, other weights
        assert list(tmp_path.iterdir()) == [], "no output and no leftover temp directory"


def test_export_will_not_overwrite_without_force(tiny_dirs, tmp_path) -> None:
    patch = make_patch(load(tiny_dirs["gpt2"]), {"L0H1": 0.5})
    out = export_merged(tiny_dirs["gpt2"], patch, tmp_path / "merged")
    with pytest.raises(FileExistsError, match="--force"):
        export_merged(tiny_dirs["gpt2"], patch, out)
    export_merged(tiny_dirs["gpt2"], patch, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_pickle_only_checkpoint_is_refused(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    from recallfix.patches.io import safetensors_index

    with pytest.raises(ValueError, match="safetensors only"):
        safetensors_index(tmp_path)


def test_cli_new_inspect_export_and_apply_check(tiny_dirs, tmp_path) -> None:
    model = tiny_dirs["llama"]
    patch_file = tmp_path / "p.json"
    done = recallfix("patch", "new", "--model", model, "--edit", "L1H0=0.5", "--edit", "L1N7=1.3",
                     "--out", patch_file)
    assert done.returncode == 0, done.stderr
    assert [e.component for e in Patch.load(patch_file).edits] == ["L1H0", "L1N7"]

    done = recallfix("patch", "inspect", patch_file, "--model", model)
    assert done.returncode == 0 and "L1N7" in done.stdout and "LoRA export: yes" in done.stdout

    done = recallfix("patch", "apply-check", "--model", model, "--patch", patch_file)
    assert done.returncode == 0, done.stderr
    diffs = {line.split(" max")[0].strip(): float(line.rsplit("=", 1)[1])
             for line in done.stdout.splitlines() if "max |logit diff|" in line}
    assert diffs["merged vs in-memory"] <= 1e-5 and diffs["lora vs in-memory"] <= 1e-5
    assert diffs["in-memory vs base"] > 1e-3

    done = recallfix("patch", "export", "--model", model, "--patch", patch_file, "--format", "lora",
                     "--out", tmp_path / "lora")
    assert done.returncode == 0 and (tmp_path / "lora" / "adapter_model.safetensors").exists()


def test_cli_refusals_exit_nonzero_with_one_clear_line(tiny_dirs, tmp_path) -> None:
    patch_file = tmp_path / "p.json"
    assert recallfix("patch", "new", "--model", tiny_dirs["llama"], "--edit", "L1H0=0.5",
                     "--out", patch_file).returncode == 0
    done = recallfix("patch", "apply-check", "--model", tiny_dirs["gpt2"], "--patch", patch_file)
    assert done.returncode == 2
    assert done.stderr.strip().endswith("model.architecture: the patch was made for 'llama', this model has 'gpt2'")
    assert "Traceback" not in done.stderr

    done = recallfix("patch", "new", "--model", tiny_dirs["llama"], "--edit", "L1H0=nan", "--out", patch_file)
    assert done.returncode == 2 and "gain must be finite" in done.stderr

    done = recallfix("patch", "export", "--model", tiny_dirs["gpt2"], "--patch", patch_file, "--out", tmp_path / "x")
    assert done.returncode == 2 and "model.architecture" in done.stderr and not (tmp_path / "x").exists()


# -- bias edits --------------------------------------------------------------------------------------------


def bias_patch(model: torch.nn.Module) -> Patch:
    hidden = model.config.hidden_size
    b = torch.randn(hidden, generator=torch.Generator().manual_seed(5))
    return make_patch(model, {"L1H0": 0.5}, biases={"L1MLP": b, "L0MLP": -0.5 * b})


@pytest.mark.parametrize("arch", BIAS_MERGED)
def test_bias_edit_merged_equals_in_memory_and_lora_is_refused(arch: str, tiny_dirs, tmp_path) -> None:
    base_dir = tiny_dirs[arch]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = load(base_dir)
    patch = bias_patch(model)
    base = logits(model, tokenizer)
    with apply_patch(model, patch):
        in_memory = logits(model, tokenizer)
    assert (in_memory - base).abs().max() > 1e-2, "the patch should change the logits"
    lora_reason = "L1MLP adds a bias to the MLP output, and LoRA cannot carry bias changes"
    assert export_refusals(model, patch) == {"merged": None, "lora": lora_reason}
    assert export_refusals(base_dir, patch) == {"merged": None, "lora": lora_reason}

    out = export_merged(base_dir, patch, tmp_path / "merged")
    assert (logits(load(out), tokenizer) - in_memory).abs().max() <= 1e-5
    with pytest.raises(FingerprintMismatchError):
        check_patch_against(out, patch)  # the export is patched already
    with pytest.raises(LoraUnsupportedError, match=f"{lora_reason}; use --format merged"):
        export_lora(base_dir, patch, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_llama_merged_bias_turns_on_mlp_bias_and_writes_every_bias_it_implies(tiny_dirs, tmp_path) -> None:
    base_dir = tiny_dirs["llama"]
    model = load(base_dir)
    patch = bias_patch(model)
    out = export_merged(base_dir, patch, tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["mlp_bias"] is True
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    expected = {f"model.layers.{layer}.mlp.{proj}.bias" for layer in range(2) for proj in ("gate_proj", "up_proj",
                                                                                            "down_proj")}
    assert expected <= set(index)
    for name in expected:
        with safe_open(str(out / index[name]), framework="pt") as f:
            tensor = f.get_tensor(name)
        edited = {"model.layers.1.mlp.down_proj.bias": patch.biases[Component(1, "mlp")],
                  "model.layers.0.mlp.down_proj.bias": patch.biases[Component(0, "mlp")]}
        if name in edited:
            assert torch.equal(tensor, torch.tensor(edited[name])), name
        else:
            assert not tensor.any(), f"{name} should be zeros"


@pytest.mark.parametrize("arch", BIAS_REFUSED)
def test_bias_edit_is_refused_where_a_merged_checkpoint_cannot_carry_it(arch: str, tiny_dirs, tmp_path) -> None:
    base_dir = tiny_dirs[arch]
    model = load(base_dir)
    patch = bias_patch(model)
    reason = (f"L1MLP adds a bias, but {arch}'s MLP output projection has no bias, and {arch} has no config switch "
              "to add one")
    with pytest.raises(MergedUnsupportedError, match=f"cannot export as a merged checkpoint: {reason}"):
        export_merged(base_dir, patch, tmp_path / "merged")
    with pytest.raises(LoraUnsupportedError, match="LoRA cannot carry bias changes"):
        export_lora(base_dir, patch, tmp_path / "lora")
    assert list(tmp_path.iterdir()) == [], "a refused export writes nothing"
    refusals = export_refusals(base_dir, patch)
    assert refusals["merged"].startswith(reason) and "LoRA cannot carry bias changes" in refusals["lora"]
    with apply_patch(model, patch):  # in memory it still applies
        assert "model.layers.1.mlp.down_proj.bias" in dict(model.named_parameters())


def test_gemma3_refuses_bias_edits_everywhere(tiny_dirs, tmp_path) -> None:
    """Gemma 3 normalises the MLP's output (post_feedforward_layernorm) before the residual add: a bias on
    down_proj would be renormalised with the rest, not added to the stream. Making, applying in memory and
    exporting such a patch are all refused with that reason; gains still apply."""
    base_dir = tiny_dirs["gemma3_text"]
    model = load(base_dir)
    reason = ("L1MLP adds a bias, but gemma3_text normalises the MLP's output (post_feedforward_layernorm) before "
              "adding it to the residual stream")
    with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        bias_patch(model)
    gains = make_patch(model, {"L1H0": 0.5})
    bias = [0.1] * model.config.hidden_size
    forged = Patch(schema_version=2, model=gains.model, edits=[*gains.edits, BiasEdit(component="L1MLP", bias=bias)],
                   provenance=gains.provenance)  # as a patch made elsewhere would come
    before = {n: p.clone() for n, p in model.named_parameters()}
    for target in (model, base_dir):
        with pytest.raises(PatchError, match="L1MLP adds a bias, but gemma3_text normalises"):
            check_patch_against(target, forged)
    with pytest.raises(PatchError, match="L1MLP adds a bias, but gemma3_text normalises"):
        apply_patch(model, forged)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "a refused patch changes nothing"
    for export in (export_merged, export_lora):
        with pytest.raises(PatchError, match="L1MLP adds a bias, but gemma3_text normalises"):
            export(base_dir, forged, tmp_path / "out")
    assert list(tmp_path.iterdir()) == [], "a refused export writes nothing"
    refusals = export_refusals(base_dir, forged)
    assert refusals["merged"].startswith(reason) and "no weight edit carries it exactly" in refusals["merged"]
    assert "LoRA cannot carry bias changes" in refusals["lora"]
    assert export_refusals(model, gains) == {"merged": None, "lora": None}
