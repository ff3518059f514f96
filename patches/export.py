"""Exporting a patch: a merged checkpoint, or a PEFT LoRA adapter that vLLM serves beside the base.

Both read the base checkpoint from disk without loading the model (`checkpoint.Checkpoint`) and check
the patch against it first (`check_patch_against`: fingerprint and finiteness of the tensors it
touches). The merged export rewrites only the shards that hold those tensors, one shard at a time, so
peak memory is one shard, not the model.

A bias edit merges into the MLP output projection's bias. Where that projection has none, the
architecture's config switch (`ArchSpec.mlp_bias_switch`, Llama's `mlp_bias`) is turned on and every
bias it implies is written (zeros, plus the edit); an architecture without a switch is refused
(`merged_refusal`), and so is one that normalises the MLP's output before the residual add (Gemma 3,
`ComponentMap.bias_edit_refusal`: no way of applying the patch carries it there). LoRA cannot carry a
bias change at all (`lora_refusal`). `export_refusals` says both for a model before anything is written.

LoRA: for a projection y = W x, a gain g on input features S is W' = W + W[:, S] (g - 1) E_S, where
E_S selects S. That is a LoRA update B A with A = E_S (one-hot rows) and B = W[:, S] (g - 1),
rank |S| = edited heads x head dim + edited neurons. With lora_alpha = r the scaling is 1.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .checkpoint import Checkpoint, model_tensors
from .components import Component, ComponentMap
from .io import PICKLE_SUFFIXES, atomic_directory
from .patch import Patch, PatchError
from .registry.models import resolve_model
from .rule import HasTensor, TensorEdit, edit_

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values of max_lora_rank vLLM accepts
MAX_LORA_RANK = VLLM_LORA_RANKS[-1]
PATCH_FILE = "recallfix_patch.json"


class LoraUnsupportedError(PatchError):
    """LoRA cannot express this patch exactly (or vLLM cannot serve it): use the merged export."""


class MergedUnsupportedError(PatchError):
    """A merged checkpoint of this architecture cannot carry the patch (transformers and vLLM would drop it)."""


def merged_refusal(cmap: ComponentMap, patch: Patch, has_tensor: HasTensor) -> str | None:
    """Why a merged checkpoint cannot carry this patch, or None when it can."""
    for c in patch.biases:
        reason = cmap.bias_edit_refusal()
        if reason is None and not has_tensor(f"{cmap.module_name(c)}.bias"):
            reason = cmap.mlp_bias_refusal()
        if reason:
            return f"{c} adds a bias, but {reason}"
    return None


def _new_tensors(ckpt: Checkpoint, patch: Patch) -> tuple[dict[str, int], str | None]:
    """The biases a merged export must add (name -> length), and the config switch that makes them load."""
    missing = [c for c in patch.biases if not ckpt.has(f"{ckpt.cmap.module_name(c)}.bias")]
    if not missing:
        return {}, None
    return ckpt.cmap.switched_mlp_biases(), ckpt.cmap.spec.mlp_bias_switch


def _checkpoint_name(ckpt: Checkpoint, bias: str) -> tuple[str, str]:
    """Key and shard for a new bias: beside its module's weight, named the way the checkpoint names it."""
    weight = ckpt.key(bias.removesuffix(".bias") + ".weight")
    return weight.removesuffix(".weight") + ".bias", ckpt.index[weight]


def _copy_side_files(src: Path, dst: Path, skip: set[str]) -> None:
    """Config, tokenizer, generation config, model card: everything but weights and pickles."""
    for path in src.iterdir():
        if path.name in skip or path.suffix in PICKLE_SUFFIXES or path.name.startswith("."):
            continue
        if path.is_file():
            shutil.copy2(path, dst / path.name)


def export_merged(model_dir: str | Path, patch: Patch, out: str | Path, *, overwrite: bool = False,
                  trust_remote_code: bool = False) -> Path:
    """Write a complete checkpoint with the patch folded into the weights. Atomic."""
    ckpt = Checkpoint.open(model_dir, trust_remote_code)
    edits = ckpt.check(patch)
    reason = merged_refusal(ckpt.cmap, patch, ckpt.has)
    if reason:
        raise MergedUnsupportedError(f"cannot export as a merged checkpoint: {reason}")
    new_lengths, switch = _new_tensors(ckpt, patch)
    new = {name: _checkpoint_name(ckpt, name) for name in new_lengths}  # name -> (key, shard)
    key = {edit.tensor: new[edit.tensor][0] if edit.tensor in new else ckpt.key(edit.tensor) for edit in edits}
    index = {**ckpt.index, **dict(new.values())}
    by_shard: dict[str, list[TensorEdit]] = defaultdict(list)
    for edit in edits:
        by_shard[index[key[edit.tensor]]].append(edit)
    new_by_shard: dict[str, dict[str, int]] = defaultdict(dict)
    for name, (new_key, shard) in new.items():
        new_by_shard[shard][new_key] = new_lengths[name]
    shards = sorted(set(ckpt.index.values()))
    with atomic_directory(Path(out), overwrite=overwrite) as tmp:
        _copy_side_files(ckpt.dir, tmp, skip=set(shards))
        for shard in shards:
            if shard not in by_shard and shard not in new_by_shard:
                shutil.copy2(ckpt.dir / shard, tmp / shard)
                continue
            with safe_open(str(ckpt.dir / shard), framework="pt") as f:
                metadata = f.metadata() or {}
            tensors = load_file(ckpt.dir / shard)
            dtype = next(iter(tensors.values())).dtype
            tensors.update({k: torch.zeros(n, dtype=dtype) for k, n in new_by_shard[shard].items()})
            for edit in by_shard[shard]:
                edit_(tensors[key[edit.tensor]], edit)
            save_file(tensors, tmp / shard, metadata={"format": "pt", **metadata})
            del tensors
        if switch:
            _turn_on(tmp, switch, index)
        (tmp / PATCH_FILE).write_text(patch.model_dump_json(indent=2) + "\n")
    return Path(out)


def _turn_on(out: Path, switch: str, index: dict[str, str]) -> None:
    """Set the config switch that makes the new biases load, and list them in the shard index."""
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, switch: True}, indent=2, sort_keys=True) + "\n")
    index_file = out / "model.safetensors.index.json"
    if index_file.exists():
        doc = json.loads(index_file.read_text())
        doc["weight_map"] = dict(sorted(index.items()))
        index_file.write_text(json.dumps(doc, indent=2) + "\n")


def lora_rank(cmap: ComponentMap, components: list[Component]) -> int:
    """Rank of the exact adapter: edited heads x head dim + edited neurons (+ the smaller side of each
    whole-MLP matrix). Every module is padded to it, so the adapter has one r."""
    whole_mlp = min(cmap.shape.hidden_size, cmap.shape.intermediate_size)
    sizes = {"head": cmap.shape.head_dim, "neuron": 1, "mlp": whole_mlp}
    return sum(sizes[c.kind] for c in components)


def lora_refusal(cmap: ComponentMap, patch: Patch, has_tensor: HasTensor) -> str | None:
    """Why LoRA cannot carry this patch exactly, or None when it can."""
    for c in patch.biases:
        return f"{c} adds a bias to the MLP output, and LoRA cannot carry bias changes"
    if not cmap.spec.lora_in_vllm:
        return f"vLLM cannot serve LoRA adapters on {cmap.architecture}"
    for c in patch.gains:
        if c.kind == "mlp" and has_tensor(f"{cmap.module_name(c)}.bias"):
            return f"{c} scales the MLP output bias, and LoRA cannot change a bias"
    rank = lora_rank(cmap, list(patch.gains))
    if rank > MAX_LORA_RANK:
        return f"the exact adapter needs rank {rank}, above vLLM's maximum {MAX_LORA_RANK}"
    return None


def _lora_factors(
    cmap: ComponentMap, weight: torch.Tensor, edits: list[TensorEdit]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r, in] and B [out, r] with B @ A = W' - W for the edits of one projection."""
    w = weight.float().T if cmap.spec.layout == "conv1d" else weight.float()  # [out, in]
    a_rows, b_cols = [], []
    for edit in edits:
        if edit.component.kind == "mlp" and w.shape[0] < w.shape[1]:
            # Whole matrix, rank = out: A carries the matrix, B is the identity.
            a_rows.append(w * (edit.gain - 1.0))
            b_cols.append(torch.eye(w.shape[0]))
            continue
        cols = torch.arange(w.shape[1])[cmap.input_slice(edit.component)]
        a_rows.append(torch.nn.functional.one_hot(cols, w.shape[1]).float())
        b_cols.append(w[:, cols] * (edit.gain - 1.0))
    return torch.cat(a_rows, dim=0), torch.cat(b_cols, dim=1)


def export_lora(model_dir: str | Path, patch: Patch, out: str | Path, *, overwrite: bool = False,
                trust_remote_code: bool = False) -> Path:
    """Write a PEFT LoRA adapter holding only the edited projections. Atomic.

    Every module is padded to the adapter's rank r (zero rows/columns), so one `r` and
    `lora_alpha = r` (scaling exactly 1) describe the whole adapter for PEFT and vLLM alike.
    """
    ckpt = Checkpoint.open(model_dir, trust_remote_code)
    edits = ckpt.check(patch)
    reason = lora_refusal(ckpt.cmap, patch, ckpt.has)
    if reason:
        raise LoraUnsupportedError(f"cannot export as LoRA: {reason}; use --format merged")
    weight_edits: dict[str, list[TensorEdit]] = defaultdict(list)
    for edit in edits:
        if edit.tensor.endswith(".weight"):
            weight_edits[edit.tensor.removesuffix(".weight")].append(edit)
    factors = {m: _lora_factors(ckpt.cmap, ckpt.get(f"{m}.weight"), e) for m, e in weight_edits.items()}
    rank = lora_rank(ckpt.cmap, list(patch.gains))
    tensors = {}
    for module, (a, b) in factors.items():
        pad = rank - a.shape[0]
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.nn.functional.pad(a, (0, 0, 0, pad)).contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.nn.functional.pad(b, (0, pad)).contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(ckpt.dir.resolve()),
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "target_modules": sorted(factors),
    }
    with atomic_directory(Path(out), overwrite=overwrite) as tmp:
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / PATCH_FILE).write_text(patch.model_dump_json(indent=2) + "\n")
    return Path(out)


def export_refusals(model: str | Path | Checkpoint | nn.Module, patch: Patch) -> dict[str, str | None]:
    """{"merged": reason or None, "lora": reason or None}: whether each export (and so vLLM) can carry
    `patch` for `model` (a loaded model, a Checkpoint, or a checkpoint directory). Checks no fingerprint."""
    if isinstance(model, nn.Module):
        cmap, has_tensor = ComponentMap(model), model_tensors(model)[1]
    else:
        ckpt = model if isinstance(model, Checkpoint) else Checkpoint.open(resolve_model(model))
        cmap, has_tensor = ckpt.cmap, ckpt.has
    return {"merged": merged_refusal(cmap, patch, has_tensor), "lora": lora_refusal(cmap, patch, has_tensor)}
