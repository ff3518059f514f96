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
from recallfix.patches.export import VLLM_LORA_RANKS
from recallfix.patches.patch import format_validation_error


class PatchRefused(ValueError):
    """A patch the server will not serve; the variants that were serving keep serving (HTTP 400). Its
    message is one line (the reasons of a multi-line validation error joined with "; ")."""

    def __init__(self, message: str) -> None:
        first, *rest = str(message).splitlines() or [""]
        super().__init__(f"{first.rstrip(':')}: {'; '.join(r.strip() for r in rest)}" if rest else first)


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
    """Refuse a patch made for another model, or whose edited tensors would not be finite in the serving
    dtype (`recallfix.patches.check_patch_against`, reading only the touched tensors), as a `PatchRefused`."""
    from recallfix.patches.checkpoint import check_patch_against

    try:
        check_patch_against(model_dir, patch, dtype=dtype, trust_remote_code=trust_remote_code)
    except PatchError as err:
        raise PatchRefused(str(err)) from None
