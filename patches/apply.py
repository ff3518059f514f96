"""Making a patch for a loaded model, and applying one in memory (exactly, and reversibly).

    make_patch(model, {"L1H0": 0.5, "L1N7": 1.3})                  gains
    make_patch(model, {}, biases={"L29MLP": -b})                   a bias on layer 29's MLP output ([d] tensor)
    make_patch(model, gains, biases=..., command=..., dataset_sha256=..., metrics=...)

The tensor slices an edit changes are `rule.tensor_edits`, the same for every way of applying a patch;
`checkpoint.check_patch_against` refuses a patch that does not belong to the model before anything
changes. A bias edit on a projection built without a bias (Llama's down_proj) adds a bias parameter
for as long as the patch is applied; `revert()` removes it again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .checkpoint import check_patch_against, model_tensors
from .components import ComponentMap
from .patch import BiasEdit, GainEdit, Patch, Provenance, required_version
from .rule import Index, edit_, fingerprint, missing_tensor
from .version import __version__


def make_patch(model: nn.Module, gains: Mapping[str, float], *,
               biases: Mapping[str, torch.Tensor | Sequence[float]] | None = None, command: str = "",
               dataset_sha256: str | None = None, metrics: dict | None = None) -> Patch:
    """A patch for this model (fingerprint computed from its current weights): `gains` by component name,
    and `biases` by whole-MLP name ("L{l}MLP" -> [hidden_size] values added to that MLP's output)."""
    cmap = ComponentMap(model)
    edits: list[GainEdit | BiasEdit] = [GainEdit(component=str(cmap.validate(n)), gain=float(g))
                                        for n, g in gains.items()]
    for name, bias in (biases or {}).items():
        values = bias.detach().float().cpu().flatten().tolist() if isinstance(bias, torch.Tensor) else list(bias)
        edits.append(BiasEdit(component=str(cmap.validate(name)), bias=[float(v) for v in values]))
    return Patch(
        schema_version=required_version(edits),
        model=fingerprint(cmap, edits, *model_tensors(model)),
        edits=edits,
        provenance=Provenance(tool_version=__version__, command=command, dataset_sha256=dataset_sha256),
        metrics=metrics or {},
    )


class AppliedPatch:
    """A patch applied in memory. `revert()` (or leaving the `with` block) restores the exact weights,
    and removes the parameters the patch added."""

    def __init__(self, model: nn.Module, patch: Patch, saved: list[tuple[torch.Tensor, Index, torch.Tensor]],
                 added: list[tuple[nn.Module, str]] | None = None) -> None:
        self.model, self.patch, self._saved, self._added = model, patch, saved, added or []

    def revert(self) -> None:
        with torch.no_grad():
            for tensor, index, original in reversed(self._saved):
                tensor[index] = original
        for module, name in reversed(self._added):
            setattr(module, name, None)  # back to the registered-but-absent parameter it was
        self._saved, self._added = [], []

    def __enter__(self) -> AppliedPatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.revert()


def apply_patch(model: nn.Module, patch: Patch) -> AppliedPatch:
    """Edit the patched tensor slices of `model` in place, after `check_patch_against` the model."""
    edits = check_patch_against(model, patch)
    get_tensor, has_tensor = model_tensors(model)
    saved, added = [], []
    with torch.no_grad():
        for edit in edits:
            if has_tensor(edit.tensor):
                tensor = get_tensor(edit.tensor)
                saved.append((tensor, edit.index, tensor[edit.index].clone()))
            else:
                module_name, _, name = edit.tensor.rpartition(".")
                module = model.get_submodule(module_name)
                like = module.get_parameter("weight")
                tensor = nn.Parameter(missing_tensor(edit).to(like.device, like.dtype), requires_grad=False)
                setattr(module, name, tensor)
                added.append((module, name))
                get_tensor, has_tensor = model_tensors(model)
            edit_(tensor, edit)
    return AppliedPatch(model, patch, saved, added)
