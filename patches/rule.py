"""The editing rule, in one place: which tensor slices an edit changes and how, and their fingerprint.

A component's gain multiplies the weight entries that read the component's inputs (a head's columns
of W_O, a neuron's column of W_out, all of W_out for a whole MLP) and the projection's bias only when
the component is the whole MLP (a bias belongs to no single head or neuron). A bias edit adds its
vector to the MLP output projection's bias; a projection without one (Llama) gets a zero bias first,
which is why a bias edit fingerprints the projection's weight (its bias may not exist yet); where a norm
follows the projection (Gemma 3) a bias edit is refused. Every way
of applying a patch (in memory, merged checkpoint, LoRA) goes through `tensor_edits`, so they agree
by construction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .components import Component, ComponentMap
from .patch import BiasEdit, GainEdit, ModelFingerprint

Index = tuple[slice, ...]
GetTensor = Callable[[str], torch.Tensor]
HasTensor = Callable[[str], bool]


@dataclass(frozen=True, eq=False)
class TensorEdit:
    """`tensor[index] = tensor[index] * gain + add`. A tensor the model lacks (`has_tensor` false: the
    bias of a projection built without one) is created as zeros first, by whoever applies the edit."""

    tensor: str  # parameter name, e.g. model.layers.3.self_attn.o_proj.weight
    index: Index
    gain: float
    component: Component
    add: torch.Tensor | None = None  # float32, for bias edits


PatchEdits = Sequence[GainEdit | BiasEdit]


def tensor_edits(cmap: ComponentMap, edits: PatchEdits, has_tensor: HasTensor) -> list[TensorEdit]:
    """The tensor slices a patch's edits change. `has_tensor` says whether a parameter exists (biases vary).
    Raises ValueError, naming the edit, for a component the model lacks or a bias of the wrong length."""
    out = []
    for i, edit in enumerate(edits):
        component = cmap.validate(edit.component)
        module = cmap.module_name(component)
        if isinstance(edit, BiasEdit):
            if (reason := cmap.bias_edit_refusal()) is not None:  # in memory, merged and LoRA alike
                raise ValueError(f"edits.{i}: {component} adds a bias, but {reason}")
            if len(edit.bias) != cmap.shape.hidden_size:
                raise ValueError(f"edits.{i}.bias: {len(edit.bias)} values, but the model's hidden_size is "
                                 f"{cmap.shape.hidden_size}")
            out.append(TensorEdit(f"{module}.bias", (slice(None),), 1.0, component,
                                  torch.tensor(edit.bias, dtype=torch.float32)))
            continue
        out.append(TensorEdit(f"{module}.weight", cmap.weight_index(component), edit.gain, component))
        if cmap.owns_bias(component) and has_tensor(f"{module}.bias"):
            out.append(TensorEdit(f"{module}.bias", (slice(None),), edit.gain, component))
    return sorted(out, key=lambda e: (e.component, e.tensor))


def scale_(tensor: torch.Tensor, index: Index, gain: float) -> None:
    """In place; float32 arithmetic so the result does not depend on where the patch is applied."""
    if gain != 1.0:  # keeps gain 1.0 a bit-for-bit no-op in every dtype
        tensor[index] = (tensor[index].float() * gain).to(tensor.dtype)


def edit_(tensor: torch.Tensor, edit: TensorEdit) -> None:
    """Apply one TensorEdit in place (float32 arithmetic, like `scale_`)."""
    scale_(tensor, edit.index, edit.gain)
    if edit.add is not None:
        tensor[edit.index] = (tensor[edit.index].float() + edit.add.to(tensor.device)).to(tensor.dtype)


def missing_tensor(edit: TensorEdit) -> torch.Tensor:
    """The zeros a tensor the model lacks starts as (only bias edits create tensors)."""
    if edit.add is None:
        raise ValueError(f"{edit.tensor} does not exist, and only a bias edit can create it")
    return torch.zeros_like(edit.add)


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of the values as little-endian float32: the same whether stored as fp32, fp16 or bf16."""
    data = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    return hashlib.sha256(data.astype("<f4", copy=False).tobytes()).hexdigest()


def touched_tensor_names(cmap: ComponentMap, edits: PatchEdits, has_tensor: HasTensor) -> list[str]:
    """What a patch fingerprints: the tensors it changes that exist, and a bias edit's projection weight."""
    names = {e.tensor for e in tensor_edits(cmap, edits, has_tensor) if has_tensor(e.tensor)}
    names |= {f"{cmap.module_name(cmap.validate(e.component))}.weight" for e in edits if isinstance(e, BiasEdit)}
    return sorted(names)


def fingerprint(cmap: ComponentMap, edits: PatchEdits, get_tensor: GetTensor,
                has_tensor: HasTensor) -> ModelFingerprint:
    shape = cmap.shape
    names = touched_tensor_names(cmap, edits, has_tensor)
    return ModelFingerprint(
        architecture=shape.architecture,
        hidden_size=shape.hidden_size,
        num_layers=shape.num_layers,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        vocab_size=shape.vocab_size,
        tensors={name: tensor_sha256(get_tensor(name)) for name in names},
    )
