"""recallfix.patches: the component map, the Patch format, and exact ways to apply a patch."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("recallfix")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

from .apply import AppliedPatch, apply_patch, make_patch  # noqa: E402
from .components import Component, ComponentMap, UnknownComponentError, UnsupportedModelError  # noqa: E402
from .decompose import Decomposition, decompose, direct_logit_attribution, neuron_attribution  # noqa: E402
from .patch import FingerprintMismatchError, Patch, PatchError  # noqa: E402

__all__ = [
    "AppliedPatch", "Component", "ComponentMap", "Decomposition", "FingerprintMismatchError", "Patch",
    "PatchError", "UnknownComponentError", "UnsupportedModelError", "__version__", "apply_patch",
    "decompose", "direct_logit_attribution", "make_patch", "neuron_attribution",
]
