"""Patch handling shared by the engines: reading a patch, refusing bad ones early, and the export cache.

Every refusal is a `PatchRefused` whose message says why (schema, fingerprint, not finite: the checks
are `recallfix.patches.check_patch_against`), raised before anything that serves requests changes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from recallfix.patches import Patch, PatchError, __version__
from recallfix.patches.export import VLLM_LORA_RANKS
from recallfix.patches.io import DTYPES
from recallfix.patches.patch import format_validation_error

from .engine import PatchRefused

__all__ = ["DTYPES", "adapter_rank", "cache_key", "read_patch", "vllm_lora_rank"]


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


def cache_key(model_dir: Path, patch: Patch) -> str:
    """Names an export of `patch` for this checkpoint: the patch id (which fingerprints the tensors it
    touches) and the checkpoint files' identity (a merged export also carries the untouched ones)."""
    files = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in model_dir.iterdir() if p.suffix in (".safetensors", ".json")
    )
    body = json.dumps({"model": str(model_dir.resolve()), "files": files, "patch": patch.id, "tool": __version__})
    return f"{patch.id}-{hashlib.sha256(body.encode()).hexdigest()[:12]}"
