"""GGUF files in, float32 safetensors checkpoints out (transformers' GGUF loader and the `gguf` package).

transformers dequantizes a GGUF's weights on load, but the loaded model refuses `save_pretrained`
(it is marked as GGUF-quantized). The weights are therefore moved into a fresh model built from the
same config without that mark, and saved from there: nothing is recomputed, so the checkpoint's
logits equal those of transformers' own GGUF load bit for bit (tests/test_models.py checks it).
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..components import ARCHITECTURES, UnsupportedModelError

log = logging.getLogger("recallfix")

# llama.cpp names a few architectures differently from transformers' model_type; transformers'
# GGUF loader makes the same translation.
_MODEL_TYPES = {"gptneox": "gpt_neox", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gemma3": "gemma3_text"}


class GGUFError(ValueError):
    """A GGUF file that cannot be read: truncated, corrupt, or missing required metadata."""


@dataclass(frozen=True)
class GGUFInfo:
    """What the file's own metadata says, read before anything is converted."""

    path: Path
    architecture: str  # general.architecture (llama.cpp's name)
    model_type: str  # the transformers model_type it loads as
    name: str | None  # general.name
    licence: str | None  # general.license
    quantization: str  # general.file_type, e.g. Q4_1
    tensor_types: dict[str, int]  # ggml type -> number of tensors stored in it
    add_bos_token: bool | None = None  # tokenizer.ggml.add_bos_token: whether a text starts with the BOS token


def supported_architectures() -> list[str]:
    """Model types that both transformers' GGUF loader and the component map know."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    # The loader lists llama.cpp's names ("gemma3"), the component map transformers' ("gemma3_text").
    loadable = {_MODEL_TYPES.get(name, name) for name in GGUF_SUPPORTED_ARCHITECTURES}
    return sorted(set(ARCHITECTURES) & loadable)


def read_gguf(path: str | Path) -> GGUFInfo:
    """Read and check a GGUF file's header, metadata and tensor table (not its weights)."""
    from gguf import GGUFReader, LlamaFileType

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    try:
        reader = GGUFReader(path)
    except Exception as err:  # the reader fails with ValueError, IndexError, KeyError... on bad bytes
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise GGUFError(f"{path} is not a valid GGUF file (truncated or corrupt: {reason})") from None
    size = path.stat().st_size
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise GGUFError(f"{path} is truncated: its tensors end at byte {end}, the file has {size}")

    def field(key: str) -> object:
        value = reader.fields.get(key)
        return None if value is None else value.contents()

    architecture = field("general.architecture")
    if not isinstance(architecture, str):
        raise GGUFError(f"{path} has no general.architecture in its metadata")
    file_type = field("general.file_type")
    try:
        quantization = LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else "unknown"
    except ValueError:
        quantization = f"file type {file_type}"
    name, licence, add_bos = field("general.name"), field("general.license"), field("tokenizer.ggml.add_bos_token")
    return GGUFInfo(
        path=path,
        architecture=architecture,
        model_type=_MODEL_TYPES.get(architecture, architecture),
        name=name if isinstance(name, str) else None,
        licence=licence if isinstance(licence, str) else None,
        quantization=quantization,
        tensor_types=dict(Counter(t.tensor_type.name for t in reader.tensors)),
        add_bos_token=add_bos if isinstance(add_bos, bool) else None,
    )


def check_supported(info: GGUFInfo) -> None:
    supported = supported_architectures()
    if info.model_type not in supported:
        raise UnsupportedModelError(
            f"{info.path}: GGUF architecture {info.architecture!r} (model type {info.model_type!r}) is not "
            f"supported; supported: {', '.join(supported)}"
        )


@contextmanager
def transformers_progress(enabled: bool) -> Iterator[None]:
    """transformers' own bars (dequantizing, loading) only where someone watches a terminal."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was, bar = hf_logging.is_progress_bar_enabled(), gguf_utils.tqdm
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    # The dequantizing bar is a plain tqdm that ignores the switch above (transformers 5.19).
    gguf_utils.tqdm = functools.partial(bar, disable=not enabled)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


@contextmanager
def parsed_once() -> Iterator[None]:
    """transformers' GGUF load, without its repeated work: it parses the file anew for the config, the weights and
    the tokenizer, and builds gguf's tensor-name map anew for each of the model's submodules (397 times for
    SmolLM2-135M). Both are pure functions of their arguments (the reader maps the file read-only), so within
    this block each is made once: 25 s of a 30 s load, measured on SmolLM2-135M (cProfile)."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], object] = {}

    def one_reader(path: str | Path, mode: str = "r") -> object:
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = one_reader, functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def load_gguf(path: Path, *, progress: bool = False):  # noqa: ANN201 (-> (PreTrainedModel, tokenizer))
    """transformers' own float32 load of a GGUF file: the reference the conversion must equal."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with transformers_progress(progress), parsed_once():
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


def convert_gguf(info: GGUFInfo, out: Path, *, progress: bool = False) -> list[str]:
    """Write the model of a checked GGUF file (`read_gguf`, `check_supported`), dequantized to float32, as a
    safetensors checkpoint with its tokenizer into `out`. Returns what the checkpoint does otherwise than
    transformers' own load of the file (for the model card); the weights never differ."""
    import torch
    from transformers import AutoModelForCausalLM

    log.info("dequantizing %s (%s, %s) to float32", info.path.name, info.model_type, info.quantization)
    loaded, tokenizer = load_gguf(info.path, progress=progress)
    config = loaded.config
    # The GGUF mark is what makes save_pretrained refuse; the weights are already plain float32.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # The fresh model is built without storage and takes the loaded tensors themselves (assign): one float32 copy
    # in memory, not two (Qwen2.5-Coder-1.5B's 1.78B parameters are 7.1 GB), and no random init thrown away.
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    fresh.tie_weights()  # assign gives each name its own Parameter: shared ones (tied embeddings) are tied again
    fresh.generation_config = loaded.generation_config
    del loaded
    with transformers_progress(progress):
        fresh.save_pretrained(out, safe_serialization=True)
    changes = [bos_as_the_file_says(info, tokenizer)]
    tokenizer.save_pretrained(out)
    return [change for change in changes if change]


def bos_as_the_file_says(info: GGUFInfo, tokenizer) -> str | None:  # noqa: ANN001 (a transformers tokenizer)
    """Make the tokenizer start each text with the BOS token where the file says so. transformers' GGUF tokenizer
    ignores tokenizer.ggml.add_bos_token (5.19): Gemma 3's then adds none, and the model, which expects one, answers
    "The Eiffel Tower is located in the city of" with " the" (p 0.39) instead of " Paris" (0.76)."""
    bos = tokenizer.bos_token_id
    if not info.add_bos_token or bos is None or tokenizer("a").input_ids[:1] == [bos]:
        return None
    tokenizer.add_bos_token = True  # rebuilds the tokenizers post-processor, which tokenizer.json then keeps
    if tokenizer("a").input_ids[:1] != [bos]:
        raise GGUFError(f"{info.path}: says tokenizer.ggml.add_bos_token, and its tokenizer cannot be made to add "
                        f"{tokenizer.bos_token!r}")
    log.info("%s: the tokenizer adds %s, as the file's tokenizer.ggml.add_bos_token says", info.path.name,
             tokenizer.bos_token)
    return (f"The tokenizer starts every text with `{tokenizer.bos_token}`, as the GGUF's tokenizer.ggml.add_bos_token "
            f"says; transformers' own GGUF tokenizer ({_transformers_version()}) adds none.")


def _transformers_version() -> str:
    import transformers

    return f"transformers {transformers.__version__}"
