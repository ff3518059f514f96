"""Patches in `recallfix serve`: reading one, refusing bad ones early, the serving mode, and the export cache.

Every refusal is a `PatchRefused` whose message says why (schema, fingerprint, not finite, not
servable in this mode), raised before anything that serves requests changes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from recallfix.patches import Patch, PatchError, __version__
from recallfix.patches.patch import format_validation_error


class PatchRefused(ValueError):
    """A patch the server will not serve; the variants that were serving keep serving (HTTP 400)."""

# vLLM accepts only these values of max_lora_rank.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_patch(path: str | Path | None = None, document: dict[str, Any] | None = None) -> Patch:
    """A patch from a file or from its JSON document; PatchRefused (with the reason) if it is invalid."""
    try:
        if path is not None:
            return Patch.load(path)
        return Patch.model_validate(document)
    except PatchError as err:
        raise PatchRefused(str(err)) from None
    except ValidationError as err:
        raise PatchRefused(f"invalid patch:\n{format_validation_error(err)}") from None


def vllm_lora_rank(adapter_rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds an adapter of rank `adapter_rank`."""
    for rank in VLLM_LORA_RANKS:
        if rank >= adapter_rank:
            return rank
    raise PatchRefused(f"adapter rank {adapter_rank} is above vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")


def adapter_rank(adapter_dir: Path) -> int:
    return int(json.loads((adapter_dir / "adapter_config.json").read_text())["r"])


def check_finite(name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Refuse a patched tensor that holds inf/NaN, as stored or once cast to the serving dtype."""
    for candidate in (tensor, tensor.to(dtype) if dtype is not None else None):
        if candidate is not None and not bool(torch.isfinite(candidate).all()):
            where = f" in {str(candidate.dtype).removeprefix('torch.')}"
            raise PatchRefused(f"the patch makes {name} non-finite{where}: a gain is too large for this model")


def export_cached(kind: str, model_dir: Path, patch: Patch, cache_dir: Path) -> Path:
    """The patch exported as `kind` (lora | merged) for this checkpoint, from the cache when it is there
    (an export is written atomically, so a directory that exists is whole)."""
    from recallfix.patches.export import export_lora, export_merged

    out = cache_dir / kind / cache_key(model_dir, patch)
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            (export_lora if kind == "lora" else export_merged)(model_dir, patch, out)
        except PatchError as err:
            raise PatchRefused(str(err)) from None
    return out


def lora_modules(adapter_dir: Path) -> list[str]:
    """The projection names an adapter touches (`o_proj`, `down_proj`): vLLM's --lora-target-modules."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    return sorted({module.rsplit(".", 1)[-1] for module in config["target_modules"]})


def cache_key(model_dir: Path, patch: Patch) -> str:
    """Names an export of `patch` for this checkpoint: the patch id (which fingerprints the tensors it
    touches) and the checkpoint files' identity (a merged export also carries the untouched ones)."""
    files = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in model_dir.iterdir() if p.suffix in (".safetensors", ".json")
    )
    body = json.dumps({"model": str(model_dir.resolve()), "files": files, "patch": patch.id, "tool": __version__})
    return f"{patch.id}-{hashlib.sha256(body.encode()).hexdigest()[:12]}"


def check_against_checkpoint(model_dir: Path, patch: Patch, *, dtype: torch.dtype | None = None,
                             trust_remote_code: bool = False) -> None:
    """Refuse a patch that was made for another model, or whose edited tensors would not be finite,
    reading only the tensors it touches from the checkpoint on disk (the model is never loaded)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    from recallfix.patches.apply import check_patch, scale_
    from recallfix.patches.components import ComponentMap
    from recallfix.patches.io import checkpoint_key, safetensors_index

    index = safetensors_index(model_dir)

    def has(name: str) -> bool:
        try:
            checkpoint_key(name, index)
        except KeyError:
            return False
        return True

    def get(name: str) -> torch.Tensor:
        key = checkpoint_key(name, index)
        with safe_open(str(model_dir / index[key]), framework="pt") as f:
            return f.get_tensor(key)

    try:
        cmap = ComponentMap.from_config(AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code))
        edits = check_patch(patch, cmap, get, has)
    except ValueError as err:  # PatchError, FingerprintMismatchError, UnknownComponentError, ...
        raise PatchRefused(str(err)) from None
    for edit in edits:
        tensor = get(edit.tensor)
        scale_(tensor, edit.index, edit.gain)
        check_finite(edit.tensor, tensor, dtype)
