"""recallfix.patches: the component map, the Patch format, and exact ways to apply a patch.

    components.py   where each head and neuron lives, per architecture (the only architecture code)
    patch.py        the Patch document (JSON) and its errors
    rule.py         which weight slices a gain scales, and their fingerprint
    checkpoint.py   the check every consumer runs (schema, fingerprint, finiteness); lazy checkpoint reads
    apply.py        making a patch, applying one in memory
    export.py       merged checkpoint and PEFT LoRA exports
    decompose.py    exact per-component decomposition of the last position's logits
    hooks.py        named hook points (TransformerLens names) on a Hugging Face model
    io.py           atomic writes, model directories, safetensors, dtypes
    models.py       where a `--model` comes from (directory, .gguf, named model, hub); gguf.py converts GGUF
    cli.py          the `recallfix` console script and its `patch` subcommands (model_cli.py: `model`)
    version.py      the installed version
"""

from .apply import AppliedPatch, apply_patch, make_patch
from .checkpoint import Checkpoint, check_patch_against
from .components import Component, ComponentMap, UnknownComponentError, UnsupportedModelError
from .decompose import Decomposition, decompose, direct_logit_attribution, neuron_attribution
from .patch import FingerprintMismatchError, Patch, PatchError
from .version import __version__

__all__ = [
    "AppliedPatch", "Checkpoint", "Component", "ComponentMap", "Decomposition", "FingerprintMismatchError",
    "Patch", "PatchError", "UnknownComponentError", "UnsupportedModelError", "__version__", "apply_patch",
    "check_patch_against", "decompose", "direct_logit_attribution", "make_patch", "neuron_attribution",
]
