"""Named hook points on a Hugging Face causal LM, with TransformerLens' names, found through `ComponentMap`.

    blocks.{l}.hook_resid_pre   input of block l: the residual stream entering it         [batch, pos, d_model]
    blocks.{l}.attn.hook_z      input of block l's attention output projection: the heads' z side by side
                                (head h is features h*d_head .. (h+1)*d_head-1)           [batch, pos, heads*d_head]
    blocks.{l}.hook_attn_out    output of that projection: the heads' outputs summed, bias included  [batch, pos, d]
    blocks.{l}.mlp.hook_post    input of block l's MLP output projection: the neuron activations  [batch, pos, d_mlp]
    blocks.{l}.hook_mlp_out     output of that projection: the MLP's output, bias included  [batch, pos, d_model]
    ln_final.hook_in            input of the final norm: the stream after the last block   [batch, pos, d_model]

hook_attn_out and hook_mlp_out are what the block adds to the stream, except where a norm follows the projection
(Gemma 3's post-attention and post-feedforward norms): there they are that norm's input, so that a hook on them
acts where a patch edits the weights. (TransformerLens puts its hook_attn_out and hook_mlp_out after those norms.)

Activations come as the module sees them (OPT's MLP flattens batch and position). A hook function
gets the activation and returns a replacement, or None to leave it unchanged (TransformerLens'
convention). `hooks` holds hook functions for a `with` block, `capture` keeps activations, and
`run_until` runs a model only as far as the activations it asks for.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .components import ComponentMap

HookFn = Callable[[torch.Tensor], torch.Tensor | None]

FINAL_NORM_IN = "ln_final.hook_in"
_BLOCK_POINT = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|attn\.hook_z|hook_attn_out|mlp\.hook_post|hook_mlp_out)$")


def hook_point(cmap: ComponentMap, name: str) -> tuple[nn.Module, bool]:
    """The module a hook point sits on, and whether it reads the module's output (else its first input)."""
    if name == FINAL_NORM_IN:
        return cmap.final_norm(), False
    match = _BLOCK_POINT.match(name)
    if match is None:
        raise ValueError(f"unknown hook point {name!r}: expected blocks.{{l}}.hook_resid_pre, blocks.{{l}}.attn.hook_z,"
                         f" blocks.{{l}}.hook_attn_out, blocks.{{l}}.mlp.hook_post, blocks.{{l}}.hook_mlp_out or "
                         f"{FINAL_NORM_IN}")
    layer, point = int(match[1]), match[2]
    if point == "hook_resid_pre":
        return cmap.block(layer), False
    if point in ("attn.hook_z", "hook_attn_out"):
        return cmap.attn_out(layer), point == "hook_attn_out"
    return cmap.mlp_out(layer), point == "hook_mlp_out"


def _on_input(fn: HookFn) -> Callable[[nn.Module, tuple, dict], tuple[tuple, dict] | None]:
    # Decoder blocks take the stream positionally or as `hidden_states`, depending on the transformers version.
    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        new = fn(args[0] if args else kwargs["hidden_states"])
        if new is None:
            return None
        return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

    return hook


def add_hooks(cmap: ComponentMap, fns: Mapping[str, HookFn]) -> list[RemovableHandle]:
    """Register each hook function at its named point; remove them with the returned handles."""
    handles = []
    for name, fn in fns.items():
        module, output = hook_point(cmap, name)
        if output:
            handles.append(module.register_forward_hook(lambda _m, _args, out, fn=fn: fn(out)))
        else:
            handles.append(module.register_forward_pre_hook(_on_input(fn), with_kwargs=True))
    return handles


@contextmanager
def hooks(cmap: ComponentMap, fns: Mapping[str, HookFn]) -> Iterator[None]:
    """The hook functions are active inside the `with` block only."""
    handles = add_hooks(cmap, fns)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture(cmap: ComponentMap, names: Sequence[str],
            keep: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> Iterator[dict[str, torch.Tensor]]:
    """A dict that the forward passes inside the `with` block fill with keep(activation) by hook name."""
    cache: dict[str, torch.Tensor] = {}

    def store(name: str) -> HookFn:
        def fn(activation: torch.Tensor) -> None:
            cache[name] = keep(activation)

        return fn

    with hooks(cmap, {name: store(name) for name in names}):
        yield cache


class _Stop(Exception):
    pass


def run_until(model: nn.Module, cmap: ComponentMap, names: Sequence[str], **inputs: Any) -> dict[str, torch.Tensor]:
    """Run `model(**inputs)` only until every named hook point has seen its activation, and return those.

    The rest of the forward pass (later blocks, the unembedding) is skipped.
    """
    cache: dict[str, torch.Tensor] = {}

    def store(name: str) -> HookFn:
        def fn(activation: torch.Tensor) -> None:
            cache[name] = activation
            if len(cache) == len(names):
                raise _Stop

        return fn

    try:
        with hooks(cmap, {name: store(name) for name in names}):
            model(**inputs)
    except _Stop:
        pass
    return cache
