"""Making a patch for a loaded model, and applying one in memory (exactly, and reversibly).

The weight slices a gain scales are `rule.tensor_edits`, the same for every way of applying a patch;
`checkpoint.check_patch_against` refuses a patch that does not belong to the model before anything
changes.
"""

from __future__ import annotations

import torch
from torch import nn

from .checkpoint import check_patch_against, model_tensors
from .components import ComponentMap
from .patch import SCHEMA_VERSION, Edit, Patch, Provenance
from .rule import Index, fingerprint, scale_
from .version import __version__


def make_patch(model: nn.Module, gains: dict[str, float], *, command: str = "",
               dataset_sha256: str | None = None, metrics: dict | None = None) -> Patch:
    """A patch for this model (fingerprint computed from its current weights)."""
    cmap = ComponentMap(model)
    components = [cmap.validate(name) for name in gains]
    return Patch(
        schema_version=SCHEMA_VERSION,
        model=fingerprint(cmap, components, *model_tensors(model)),
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
    """Scale the patched weight slices of `model` in place, after `check_patch_against` the model."""
    edits = check_patch_against(model, patch)
    get_tensor, _ = model_tensors(model)
    saved = []
    with torch.no_grad():
        for edit in edits:
            tensor = get_tensor(edit.tensor)
            saved.append((tensor, edit.index, tensor[edit.index].clone()))
            scale_(tensor, edit.index, edit.gain)
    return AppliedPatch(model, patch, saved)
