"""Learnable gains on components of one layer, applied by hooks where `apply_patch` scales the weights.

A gain g_c on component c multiplies its write to the residual stream, exactly as `apply_patch` scales its
weights: a head's slice of the attention output projection's input z (the projection's bias belongs to no head
and is left alone), a neuron's activation entering the MLP output projection, or the whole MLP output (bias
included). The hooks sit at `blocks.{l}.attn.hook_z`, `blocks.{l}.mlp.hook_post` and `blocks.{l}.hook_mlp_out`
(`recallfix.patches.hooks`), so gradients flow through the real block, final norm and unembedding.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from recallfix.patches.components import ComponentMap
from recallfix.patches.hooks import HookFn, add_hooks


class GainHooks:
    """Learnable gains on components of one layer, applied by hooks (a context manager)."""

    def __init__(self, cmap: ComponentMap, names: Sequence[str], device: torch.device | str = "cpu") -> None:
        if not names:
            raise ValueError("no components to give a gain")
        self.cmap, self.names = cmap, list(names)
        components = [cmap.validate(n) for n in self.names]
        layers = {c.layer for c in components}
        if len(layers) != 1:
            raise ValueError(f"gains must all be on one layer, got layers {sorted(layers)}")
        self.layer = layers.pop()
        self.heads = [i for i, c in enumerate(components) if c.kind == "head"]
        self.neurons = [i for i, c in enumerate(components) if c.kind == "neuron"]
        self.whole_mlp = [i for i, c in enumerate(components) if c.kind == "mlp"]
        if self.whole_mlp and self.neurons:
            raise ValueError(f"L{self.layer}MLP and its neurons cannot both get a gain")
        self._head_index = torch.tensor([components[i].index for i in self.heads], dtype=torch.long, device=device)
        self._neuron_index = torch.tensor([components[i].index for i in self.neurons], dtype=torch.long, device=device)
        self.delta = nn.Parameter(torch.zeros(len(components), device=device))
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._active = True

    @property
    def gains(self) -> torch.Tensor:
        return 1 + self.delta

    def as_dict(self) -> dict[str, float]:
        return {n: float(g) for n, g in zip(self.names, self.gains.detach().cpu(), strict=True)}

    def set(self, gains: dict[str, float]) -> None:
        with torch.no_grad():
            for i, name in enumerate(self.names):
                self.delta[i] = gains[name] - 1.0

    @contextmanager
    def bypassed(self) -> Iterator[None]:
        """The base model while the hooks stay registered (gains treated as 1)."""
        self._active = False
        try:
            yield
        finally:
            self._active = True

    def _scale_heads(self, z: torch.Tensor) -> torch.Tensor | None:
        if not self._active:
            return None
        shape = self.cmap.shape
        per_head = torch.ones(shape.num_heads, device=z.device, dtype=self.delta.dtype)
        per_head = per_head.index_put((self._head_index,), self.gains[self.heads])
        scale = per_head.repeat_interleave(shape.head_dim).to(z.dtype)
        return z * scale

    def _scale_neurons(self, acts: torch.Tensor) -> torch.Tensor | None:
        if not self._active:
            return None
        per_neuron = torch.ones(acts.shape[-1], device=acts.device, dtype=self.delta.dtype)
        per_neuron = per_neuron.index_put((self._neuron_index,), self.gains[self.neurons])
        return acts * per_neuron.to(acts.dtype)

    def _scale_mlp(self, output: torch.Tensor) -> torch.Tensor | None:
        if not self._active:
            return None
        return output * self.gains[self.whole_mlp[0]].to(output.dtype)

    def __enter__(self) -> GainHooks:
        points: dict[str, HookFn] = {}
        if self.heads:
            points[f"blocks.{self.layer}.attn.hook_z"] = self._scale_heads
        if self.neurons:
            points[f"blocks.{self.layer}.mlp.hook_post"] = self._scale_neurons
        if self.whole_mlp:
            points[f"blocks.{self.layer}.hook_mlp_out"] = self._scale_mlp
        self._handles = add_hooks(self.cmap, points)
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
