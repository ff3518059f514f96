"""Where each head and neuron lives, per architecture.

This is the one place that knows architectures. Everything else speaks one vocabulary
(TransformerLens style):

    L{l}H{h}   head h of layer l: its slice of the attention output projection
    L{l}N{n}   neuron n of layer l's MLP: its slice of the MLP output projection
    L{l}MLP    layer l's whole MLP output (weight and bias)

A head's output is `W_O[:, h*d:(h+1)*d] @ z_h` (z_h: the head's attention-weighted values), so
scaling those columns scales exactly that head's write to the residual stream. GPT-2 stores its
projections as Conv1D with the weight transposed, so there the head is a block of rows.

Gemma 3 puts an RMSNorm after the attention output projection and after the MLP output projection,
before the residual add ("sandwich" norms, `ArchSpec.post_attn_norm` / `post_mlp_norm`): a head's or a
neuron's write reaches the stream only through that norm, which the decomposition freezes at its
forward-pass scale. Scaling the projection's weights is still the exact edit of a gain; the norm then
renormalises the projection's output, so a gain on a whole MLP (or one gain on every head of a layer)
there changes almost nothing (only through the norm's epsilon).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model's architecture is not in the component map."""


class UnknownComponentError(ValueError):
    """A component name that is malformed or does not exist in the model."""


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one architecture family, relative to the CausalLM object."""

    layers: str  # the ModuleList of decoder blocks
    attn_out: str  # attention output projection, relative to a block
    mlp_out: str  # MLP output (down) projection, relative to a block
    final_norm: str
    layout: Literal["linear", "conv1d"]  # linear: weight [out, in]; conv1d: weight [in, out]
    norm: Literal["layernorm", "rmsnorm"]
    lora_in_vllm: bool  # whether vLLM serves LoRA adapters on this architecture
    # Where the MLP output projection has no bias, a merged checkpoint carries one only through a config
    # switch that both transformers and vLLM honour; it gives every listed projection (relative to a
    # block) a bias. None: no such switch, so a bias edit cannot be merged there.
    mlp_bias_switch: str | None = None
    mlp_bias_modules: tuple[str, ...] = ()
    # Norms between a projection and the residual add, relative to a block (Gemma 3's sandwich norms); None: the
    # projection's output is added to the stream as it is.
    post_attn_norm: str | None = None
    post_mlp_norm: str | None = None
    # Every norm multiplies by (norm_weight_offset + weight): Gemma's RMSNorm stores its weight minus 1.
    norm_weight_offset: float = 0.0
    # The config attribute of a final logit soft-cap (logits = cap * tanh(logits / cap)), where the family has one.
    logit_softcap: str | None = None


_LLAMA_LIKE = ArchSpec("model.layers", "self_attn.o_proj", "mlp.down_proj", "model.norm", "linear", "rmsnorm", True)
# Llama's `mlp_bias` adds biases to gate, up and down projections (LlamaMLP; vLLM's llama.py reads it too).
# Mistral, Qwen2 and Qwen3 have no such switch in transformers.
_LLAMA = replace(_LLAMA_LIKE, mlp_bias_switch="mlp_bias",
                 mlp_bias_modules=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))

# fmt: off
ARCHITECTURES: dict[str, ArchSpec] = {
    #                    layers                  attn_out              mlp_out
    #                    final_norm                          layout    norm         LoRA in vLLM
    "gpt2":     ArchSpec("transformer.h",        "attn.c_proj",        "mlp.c_proj",
                         "transformer.ln_f",                 "conv1d", "layernorm", False),
    "opt":      ArchSpec("model.decoder.layers", "self_attn.out_proj", "fc2",
                         "model.decoder.final_layer_norm",   "linear", "layernorm", True),
    "llama":    _LLAMA,
    "mistral":  _LLAMA_LIKE,
    "qwen2":    _LLAMA_LIKE,
    "qwen3":    _LLAMA_LIKE,
    # vLLM runs GPT-NeoX through its generic Transformers backend; LoRA there is unverified.
    "gpt_neox": ArchSpec("gpt_neox.layers",      "attention.dense",    "mlp.dense_4h_to_h",
                         "gpt_neox.final_layer_norm",        "linear", "layernorm", False),
    # Gemma3ForCausalLM (vLLM's gemma3.py: SupportsLoRA). No mlp_bias switch, and a bias would sit before
    # post_feedforward_layernorm anyway (`bias_edit_refusal`).
    "gemma3_text": ArchSpec("model.layers",      "self_attn.o_proj",   "mlp.down_proj",
                            "model.norm",                    "linear", "rmsnorm",   True,
                            post_attn_norm="post_attention_layernorm", post_mlp_norm="post_feedforward_layernorm",
                            norm_weight_offset=1.0, logit_softcap="final_logit_softcapping"),
}
# fmt: on

COMPONENT_RE = re.compile(r"^L(\d+)(?:H(\d+)|N(\d+)|(MLP))$")


@dataclass(frozen=True, order=True)
class Component:
    """A parsed component name. kind: 'head' | 'neuron' | 'mlp'."""

    layer: int
    kind: str
    index: int = -1

    @classmethod
    def parse(cls, name: str) -> Component:
        match = COMPONENT_RE.match(name)
        if not match:
            raise UnknownComponentError(
                f"component {name!r} is not of the form L{{layer}}H{{head}}, L{{layer}}N{{neuron}} or L{{layer}}MLP"
            )
        layer, head, neuron, _ = match.groups()
        if head is not None:
            return cls(int(layer), "head", int(head))
        if neuron is not None:
            return cls(int(layer), "neuron", int(neuron))
        return cls(int(layer), "mlp")

    @classmethod
    def try_parse(cls, name: str) -> Component | None:
        """The component, or None for a name outside the vocabulary (e.g. a decomposition's "embed")."""
        try:
            return cls.parse(name)
        except UnknownComponentError:
            return None

    def __str__(self) -> str:
        if self.kind == "head":
            return f"L{self.layer}H{self.index}"
        if self.kind == "neuron":
            return f"L{self.layer}N{self.index}"
        return f"L{self.layer}MLP"


def _config_int(config: object, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise UnsupportedModelError(f"config has none of {names}")


@dataclass(frozen=True)
class ModelShape:
    """The numbers that identify a model's layout (and go into a patch's fingerprint)."""

    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def from_config(cls, config: object) -> ModelShape:
        architecture = spec_for(config)[0]
        hidden = _config_int(config, "hidden_size", "n_embd")
        heads = _config_int(config, "num_attention_heads", "n_head")
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        if architecture == "gpt2":
            intermediate = getattr(config, "n_inner", None) or 4 * hidden
        elif architecture == "opt":
            intermediate = _config_int(config, "ffn_dim")
        else:
            intermediate = _config_int(config, "intermediate_size")
        return cls(
            architecture=architecture,
            hidden_size=hidden,
            num_layers=_config_int(config, "num_hidden_layers", "n_layer"),
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            intermediate_size=int(intermediate),
            vocab_size=_config_int(config, "vocab_size"),
        )


def spec_for(config: object) -> tuple[str, ArchSpec]:
    """The architecture name and spec of a transformers config, or a clear error."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    if model_type == "opt":
        # Post-LN OPT (opt-350m) and its projected embeddings have no additive residual decomposition.
        if not getattr(config, "do_layer_norm_before", True):
            raise UnsupportedModelError("OPT with do_layer_norm_before=False (post-LN, e.g. opt-350m) is not supported")
        if getattr(config, "word_embed_proj_dim", config.hidden_size) != config.hidden_size:
            raise UnsupportedModelError("OPT with word_embed_proj_dim != hidden_size is not supported")
    return model_type, ARCHITECTURES[model_type]


class ComponentMap:
    """Finds heads, neurons, norms and the unembedding of a Hugging Face causal LM.

    Built from a loaded model, or from its config alone (`from_config`) where only names, shapes
    and slices are needed, e.g. to edit a checkpoint on disk without loading it.
    """

    def __init__(self, model: nn.Module) -> None:
        self._model: nn.Module | None = model
        self.config = model.config
        self.architecture, self.spec = spec_for(model.config)
        self.shape = ModelShape.from_config(model.config)

    @classmethod
    def from_config(cls, config: object) -> ComponentMap:
        self = cls.__new__(cls)
        self._model = None
        self.config = config
        self.architecture, self.spec = spec_for(config)
        self.shape = ModelShape.from_config(config)
        return self

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            raise RuntimeError("this ComponentMap was built from a config; it has no modules")
        return self._model

    # -- modules -------------------------------------------------------------------------------------
    def block(self, layer: int) -> nn.Module:
        return self.model.get_submodule(self.spec.layers)[layer]

    def attn_out(self, layer: int) -> nn.Module:
        return self.block(layer).get_submodule(self.spec.attn_out)

    def mlp_out(self, layer: int) -> nn.Module:
        return self.block(layer).get_submodule(self.spec.mlp_out)

    def projection(self, component: Component) -> nn.Module:
        """The module a component writes through: attention output for heads, MLP output otherwise."""
        return self.attn_out(component.layer) if component.kind == "head" else self.mlp_out(component.layer)

    def post_attn_norm(self, layer: int) -> nn.Module | None:
        """The norm between the attention output projection and the residual add, or None (most families)."""
        return None if self.spec.post_attn_norm is None else self.block(layer).get_submodule(self.spec.post_attn_norm)

    def post_mlp_norm(self, layer: int) -> nn.Module | None:
        """The norm between the MLP output projection and the residual add, or None (most families)."""
        return None if self.spec.post_mlp_norm is None else self.block(layer).get_submodule(self.spec.post_mlp_norm)

    def post_norm(self, component: Component) -> nn.Module | None:
        """The norm a component's projection writes through before the residual add, or None."""
        return self.post_attn_norm(component.layer) if component.kind == "head" else self.post_mlp_norm(component.layer)

    def final_norm(self) -> nn.Module:
        return self.model.get_submodule(self.spec.final_norm)

    def norm_gain(self, norm: nn.Module) -> torch.Tensor:
        """What a norm multiplies the normalised vector by, elementwise (float32): its weight, plus 1 on Gemma."""
        gain = norm.weight.float()
        return gain + self.spec.norm_weight_offset if self.spec.norm_weight_offset else gain

    def logit_softcap(self) -> float | None:
        """The final logit soft-cap of this model (logits = cap * tanh(logits / cap)), or None."""
        value = getattr(self.config, self.spec.logit_softcap, None) if self.spec.logit_softcap else None
        return float(value) if value else None

    def readout_refusal(self) -> str | None:
        """Why the logits are not a sum of per-component terms (so no exact decomposition, logit lens or
        attribution), or None. Patches are weight edits and are unaffected."""
        cap = self.logit_softcap()
        if cap is not None:
            return (f"{self.architecture} with final logit soft-capping ({self.spec.logit_softcap}={cap:g}): the "
                    "logits are cap * tanh(W_U x / cap), not linear in the components, so the decomposition, the "
                    "logit lens and the attribution are not exact")
        return None

    def unembed(self) -> nn.Module:
        return self.model.get_output_embeddings()

    # -- names ---------------------------------------------------------------------------------------
    def module_name(self, component: Component) -> str:
        """Full parameter-path prefix of the projection a component lives in."""
        local = self.spec.attn_out if component.kind == "head" else self.spec.mlp_out
        return f"{self.spec.layers}.{component.layer}.{local}"

    def heads(self, layer: int) -> list[str]:
        return [str(Component(layer, "head", h)) for h in range(self.shape.num_heads)]

    def validate(self, name: str) -> Component:
        """Parse a component name and check it exists in this model."""
        component = Component.parse(name)
        shape = self.shape
        if not 0 <= component.layer < shape.num_layers:
            raise UnknownComponentError(
                f"{name}: layer {component.layer} does not exist (model has {shape.num_layers})"
            )
        if component.kind == "head" and not 0 <= component.index < shape.num_heads:
            raise UnknownComponentError(f"{name}: head {component.index} does not exist (model has {shape.num_heads})")
        if component.kind == "neuron" and not 0 <= component.index < shape.intermediate_size:
            raise UnknownComponentError(
                f"{name}: neuron {component.index} does not exist (MLP width {shape.intermediate_size})"
            )
        return component

    # -- slices --------------------------------------------------------------------------------------
    def input_slice(self, component: Component) -> slice:
        """The range of the projection's *input* features that belong to the component."""
        if component.kind == "head":
            d = self.shape.head_dim
            return slice(component.index * d, (component.index + 1) * d)
        if component.kind == "neuron":
            return slice(component.index, component.index + 1)
        return slice(None)

    def weight_index(self, component: Component) -> tuple[slice, slice]:
        """Index into the projection's weight that selects the component's input features."""
        cols = self.input_slice(component)
        return (cols, slice(None)) if self.spec.layout == "conv1d" else (slice(None), cols)

    def bias_edit_refusal(self) -> str | None:
        """Why no way of applying a patch (in memory, merged, LoRA) can add a vector to an MLP's write, or None.

        A bias edit adds its vector to the MLP output projection's output; where a norm follows that projection
        before the residual add, the vector is renormalised with the rest instead of being added to the stream."""
        if self.spec.post_mlp_norm is not None:
            return (f"{self.architecture} normalises the MLP's output ({self.spec.post_mlp_norm}) before adding it to "
                    "the residual stream, so a bias on the MLP output projection is not a vector added to the stream "
                    "and no weight edit carries it exactly")
        return None

    def mlp_bias_refusal(self) -> str | None:
        """Why a merged checkpoint cannot carry a bias on an MLP output projection that has none, or None."""
        if self.spec.mlp_bias_switch is None:
            return (f"{self.architecture}'s MLP output projection has no bias, and {self.architecture} has no "
                    "config switch to add one (transformers and vLLM would ignore it)")
        return None

    def switched_mlp_biases(self) -> dict[str, int]:
        """Parameter name -> length of every bias that turning on `spec.mlp_bias_switch` adds."""
        shape, spec = self.shape, self.spec
        length = {local: shape.intermediate_size for local in spec.mlp_bias_modules} | {spec.mlp_out: shape.hidden_size}
        return {f"{spec.layers}.{layer}.{local}.bias": length[local]
                for layer in range(shape.num_layers) for local in spec.mlp_bias_modules}

    def owns_bias(self, component: Component) -> bool:
        """A projection's bias belongs to a component only when the component is the whole MLP."""
        return component.kind == "mlp"

    def output_weight(self, module: nn.Module) -> torch.Tensor:
        """The projection's weight as [out, in], whatever the storage layout."""
        return module.weight.T if self.spec.layout == "conv1d" else module.weight
