"""The scaling rule, in one place: which weight slices a component's gain scales, and their fingerprint.

A component's gain multiplies the weight entries that read the component's inputs (a head's columns
of W_O, a neuron's column of W_out, all of W_out for a whole MLP) and the projection's bias only when
the component is the whole MLP (a bias belongs to no single head or neuron). Every way of applying a
patch (in memory, merged checkpoint, LoRA) goes through `tensor_edits`, so they agree by construction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .components import Component, ComponentMap
from .patch import ModelFingerprint

Index = tuple[slice, ...]
GetTensor = Callable[[str], torch.Tensor]
HasTensor = Callable[[str], bool]


@dataclass(frozen=True)
class TensorEdit:
    """Multiply `tensor[index]` by `gain`."""

    tensor: str  # parameter name, e.g. model.layers.3.self_attn.o_proj.weight
    index: Index
    gain: float
    component: Component


def tensor_edits(cmap: ComponentMap, gains: dict[Component, float], has_tensor: HasTensor) -> list[TensorEdit]:
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


def touched_tensor_names(cmap: ComponentMap, components: Iterable[Component], has_tensor: HasTensor) -> list[str]:
    return sorted({e.tensor for e in tensor_edits(cmap, dict.fromkeys(components, 1.0), has_tensor)})


def fingerprint(cmap: ComponentMap, components: Iterable[Component], get_tensor: GetTensor,
                has_tensor: HasTensor) -> ModelFingerprint:
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
