"""Checking a patch against a model: the one check every consumer runs before it uses a patch.

`check_patch_against(model, patch)` refuses, with a `PatchError` that says why, a patch that

- names a component the model does not have, or holds a bias of the wrong length (the document itself
  is validated when it is read, `Patch.load`),
- was made for another model, or is applied already (the fingerprint: the shape numbers and the
  sha256 of every tensor the patch touches), or
- would make a weight non-finite, as stored or in the dtype the model is served in.

It changes nothing. `model` is a loaded model, or a checkpoint on disk read through `Checkpoint`: only
the tensors the patch touches are read, the model is never loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .components import ComponentMap
from .io import checkpoint_key, safetensors_index
from .patch import FingerprintMismatchError, ModelFingerprint, Patch, PatchError
from .registry.models import resolve_model
from .rule import (
    GetTensor,
    HasTensor,
    TensorEdit,
    edit_,
    missing_tensor,
    tensor_edits,
    tensor_sha256,
    touched_tensor_names,
)

SHAPE_FIELDS = ("architecture", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size")


class Checkpoint:
    """Lazy, read-only access to a safetensors checkpoint's tensors by model parameter name."""

    def __init__(self, model_dir: Path, config: object, cmap: ComponentMap, index: dict[str, str]) -> None:
        self.dir, self.config, self.cmap, self.index = model_dir, config, cmap, index

    @classmethod
    def open(cls, model: str | Path, trust_remote_code: bool = False) -> Checkpoint:
        """A checkpoint directory or hub name; its config is read, its tensors only when asked for."""
        from transformers import AutoConfig

        model_dir = resolve_model(model)
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        return cls(model_dir, config, ComponentMap.from_config(config), safetensors_index(model_dir))

    def key(self, name: str) -> str:
        return checkpoint_key(name, self.index)

    def has(self, name: str) -> bool:
        try:
            self.key(name)
        except KeyError:
            return False
        return True

    def get(self, name: str) -> torch.Tensor:
        key = self.key(name)
        with safe_open(str(self.dir / self.index[key]), framework="pt") as f:
            return f.get_tensor(key)

    def check(self, patch: Patch, dtype: torch.dtype | None = None) -> list[TensorEdit]:
        """`check_patch_against` this checkpoint: the edits the patch makes, or PatchError."""
        return check_patch_against(self, patch, dtype=dtype)


def model_tensors(model: nn.Module) -> tuple[GetTensor, HasTensor]:
    """A loaded model's parameters by name, the way `Checkpoint` serves a checkpoint's."""
    params = dict(model.named_parameters())
    return params.__getitem__, params.__contains__


def check_fingerprint(patch: Patch, cmap: ComponentMap, get_tensor: GetTensor,
                      has_tensor: HasTensor) -> list[TensorEdit]:
    """Refuse a patch that does not belong to this model; return the edits it makes. Changes nothing."""
    expected = patch.model
    check_shape(expected, cmap, "the patch was made for")
    edits = tensor_edits(cmap, patch.edits, has_tensor)
    names = touched_tensor_names(cmap, patch.edits, has_tensor)
    if sorted(expected.tensors) != names:
        created = sorted((set(names) - set(expected.tensors)) & {e.tensor for e in edits if e.add is not None})
        if created:
            raise FingerprintMismatchError(
                f"model.tensors: this model has {', '.join(created)}, which the patch would add; the patch was "
                "made for another checkpoint, or this model is already patched"
            )
        raise FingerprintMismatchError(
            f"model.tensors: the patch fingerprints {sorted(expected.tensors)}, its edits touch {names}"
        )
    check_tensors(expected, get_tensor, "the patch was made for another checkpoint, or this model is already patched")
    return edits


def check_shape(expected: ModelFingerprint, cmap: ComponentMap, made_for: str) -> None:
    """Refuse a fingerprint of another shape; `made_for` words the refusal ("the patch was made for")."""
    for field in SHAPE_FIELDS:
        ours, theirs = getattr(cmap.shape, field), getattr(expected, field)
        if ours != theirs:
            raise FingerprintMismatchError(f"model.{field}: {made_for} {theirs!r}, this model has {ours!r}")


def check_tensors(expected: ModelFingerprint, get_tensor: GetTensor, why: str) -> None:
    """Refuse a fingerprint whose tensors' sha256 differ from this model's; `why` says what that means."""
    for name in sorted(expected.tensors):
        if tensor_sha256(get_tensor(name)) != expected.tensors[name]:
            raise FingerprintMismatchError(f"model.tensors[{name!r}]: sha256 differs; {why}")


def check_finite(name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Refuse a patched tensor that holds inf/NaN, as stored or once cast to the serving dtype."""
    for candidate in (tensor, tensor.to(dtype) if dtype is not None else None):
        if candidate is not None and not bool(torch.isfinite(candidate).all()):
            where = f" in {str(candidate.dtype).removeprefix('torch.')}"
            raise PatchError(f"the patch makes {name} non-finite{where}: an edit is too large for this model")


def check_patch_against(model: str | Path | Checkpoint | nn.Module, patch: Patch, *, dtype: torch.dtype | None = None,
                        trust_remote_code: bool = False) -> list[TensorEdit]:
    """The edits `patch` makes to `model` (a loaded model, a `Checkpoint`, or a checkpoint directory or hub
    name), after checking that they belong to it and keep its weights finite (also in `dtype`, the
    serving dtype, when given). Every refusal is a PatchError; nothing changes."""
    try:
        if isinstance(model, nn.Module):
            cmap, (get_tensor, has_tensor) = ComponentMap(model), model_tensors(model)
        else:
            ckpt = model if isinstance(model, Checkpoint) else Checkpoint.open(model, trust_remote_code)
            cmap, get_tensor, has_tensor = ckpt.cmap, ckpt.get, ckpt.has
        edits = check_fingerprint(patch, cmap, get_tensor, has_tensor)
    except PatchError:
        raise
    except ValueError as err:  # an unknown component, an unsupported model: refusals of the same kind
        raise PatchError(str(err)) from None
    with torch.no_grad():
        for name in sorted({edit.tensor for edit in edits}):
            mine = [e for e in edits if e.tensor == name]
            tensor = get_tensor(name).detach().clone() if has_tensor(name) else missing_tensor(mine[0])
            for edit in mine:
                edit_(tensor, edit)
            check_finite(name, tensor, dtype)
    return edits
