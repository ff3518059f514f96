"""Applying a patch: the scaling rule, the fingerprint check, and in-memory application.

The rule, in one place: a component's gain multiplies the weight entries that read the component's
inputs (a head's columns of W_O, a neuron's column of W_out, all of W_out for a whole MLP) and the
projection's bias only when the component is the whole MLP (a bias belongs to no single head or
neuron). Every way of applying a patch (in memory, merged checkpoint, LoRA) goes through
`tensor_edits`, so they agree by construction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from . import __version__
from .components import Component, ComponentMap, ModelShape
from .patch import (
    SCHEMA_VERSION,
    Edit,
    FingerprintMismatchError,
    ModelFingerprint,
    Patch,
    PatchError,
    Provenance,
)

Index = tuple[slice, ...]


@dataclass(frozen=True)
class TensorEdit:
    """Multiply `tensor[index]` by `gain`."""

    tensor: str  # parameter name, e.g. model.layers.3.self_attn.o_proj.weight
    index: Index
    gain: float
    component: Component


def tensor_edits(
    cmap: ComponentMap, gains: dict[Component, float], has_tensor: Callable[[str], bool]
) -> list[TensorEdit]:
    """The tensor slices a patch scales. `has_tensor` says whether a parameter exists (biases vary)."""
    edits = []
    for component, gain in sorted(gains.items()):
        module = cmap.module_name(component)
        edits.append(TensorEdit(f"{module}.weight", cmap.weight_index(component), gain, component))
        if cmap.owns_bias(component) and has_tensor(f"{module}.bias"):
            edits.append(TensorEdit(f"{module}.bias", (slice(None),), gain, component))
    return edits


def scale_(tensor: torch.Tensor, index: Index, gain: float) -> None:
    """In place; float32 arithmetic so the result does not depend on where the patch is applied."""
    if gain != 1.0:  # keeps gain 1.0 a bit-for-bit no-op in every dtype
        tensor[index] = (tensor[index].float() * gain).to(tensor.dtype)


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of the values as little-endian float32: the same whether stored as fp32, fp16 or bf16."""
    data = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    return hashlib.sha256(data.astype("<f4", copy=False).tobytes()).hexdigest()


def touched_tensor_names(
    cmap: ComponentMap, components: Iterable[Component], has_tensor: Callable[[str], bool]
) -> list[str]:
    return sorted({e.tensor for e in tensor_edits(cmap, dict.fromkeys(components, 1.0), has_tensor)})


def fingerprint(cmap: ComponentMap, components: Iterable[Component],
                get_tensor: Callable[[str], torch.Tensor], has_tensor: Callable[[str], bool]) -> ModelFingerprint:
    shape = cmap.shape
    names = touched_tensor_names(cmap, components, has_tensor)
    return ModelFingerprint(
        architecture=shape.architecture,
        hidden_size=shape.hidden_size,
        num_layers=shape.num_layers,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        vocab_size=shape.vocab_size,
        tensors={name: tensor_sha256(get_tensor(name)) for name in names},
    )


def check_patch(patch: Patch, cmap: ComponentMap, get_tensor: Callable[[str], torch.Tensor],
                has_tensor: Callable[[str], bool]) -> list[TensorEdit]:
    """Refuse a patch that does not belong to this model; return the edits it makes. Changes nothing."""
    expected = patch.model
    shape: ModelShape = cmap.shape
    for field in ("architecture", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size"):
        ours, theirs = getattr(shape, field), getattr(expected, field)
        if ours != theirs:
            raise FingerprintMismatchError(f"model.{field}: the patch was made for {theirs!r}, this model has {ours!r}")
    gains = {cmap.validate(e.component): e.gain for e in patch.edits}
    names = touched_tensor_names(cmap, gains, has_tensor)
    if sorted(expected.tensors) != names:
        raise FingerprintMismatchError(
            f"model.tensors: the patch fingerprints {sorted(expected.tensors)}, its edits touch {names}"
        )
    for name in names:
        if tensor_sha256(get_tensor(name)) != expected.tensors[name]:
            raise FingerprintMismatchError(
                f"model.tensors[{name!r}]: sha256 differs; the patch was made for another checkpoint, "
                "or this model is already patched"
            )
    return tensor_edits(cmap, gains, has_tensor)


def _model_accessors(model: nn.Module) -> tuple[Callable[[str], torch.Tensor], Callable[[str], bool]]:
    params = dict(model.named_parameters())
    return params.__getitem__, params.__contains__


def make_patch(model: nn.Module, gains: dict[str, float], *, command: str = "",
               dataset_sha256: str | None = None, metrics: dict | None = None) -> Patch:
    """A patch for this model (fingerprint computed from its current weights)."""
    cmap = ComponentMap(model)
    components = [cmap.validate(name) for name in gains]
    get_tensor, has_tensor = _model_accessors(model)
    return Patch(
        schema_version=SCHEMA_VERSION,
        model=fingerprint(cmap, components, get_tensor, has_tensor),
        edits=[Edit(component=str(c), gain=float(g)) for c, g in zip(components, gains.values(), strict=True)],
        provenance=Provenance(tool_version=__version__, command=command, dataset_sha256=dataset_sha256),
        metrics=metrics or {},
    )


class AppliedPatch:
    """A patch applied in memory. `revert()` (or leaving the `with` block) restores the exact weights."""

    def __init__(self, model: nn.Module, patch: Patch, saved: list[tuple[torch.Tensor, Index, torch.Tensor]]):
        self.model, self.patch, self._saved = model, patch, saved

    def revert(self) -> None:
        with torch.no_grad():
            for tensor, index, original in reversed(self._saved):
                tensor[index] = original
        self._saved = []

    def __enter__(self) -> AppliedPatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.revert()


def apply_patch(model: nn.Module, patch: Patch) -> AppliedPatch:
    """Scale the patched weight slices of `model` in place, after checking the fingerprint."""
    cmap = ComponentMap(model)
    get_tensor, has_tensor = _model_accessors(model)
    try:
        edits = check_patch(patch, cmap, get_tensor, has_tensor)
    except PatchError:
        raise
    except ValueError as err:  # unknown component and the like: same family of refusal
        raise PatchError(str(err)) from None
    saved = []
    with torch.no_grad():
        for edit in edits:
            tensor = get_tensor(edit.tensor)
            saved.append((tensor, edit.index, tensor[edit.index].clone()))
            scale_(tensor, edit.index, edit.gain)
    return AppliedPatch(model, patch, saved)
