"""File I/O shared by every part: atomic writes, model directories, safetensors checkpoints, dtype names."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# The dtypes a model can be loaded and served in, by name; `parse_dtype` also takes the short names.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_SHORT_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_dtype(name: str) -> torch.dtype:
    """The torch dtype called `name` (float32, bfloat16, float16 or fp32, bf16, fp16)."""
    dtype = DTYPES.get(DTYPE_SHORT_NAMES.get(name, name))
    if dtype is None:
        choices = ", ".join(f"{full} ({short})" for short, full in DTYPE_SHORT_NAMES.items())
        raise ValueError(f"unknown dtype {name!r}; choose from {choices}")
    return dtype


def json_schema_of(model: type[BaseModel], title: str, path: Path) -> dict[str, Any]:
    """The JSON Schema of a pydantic document, with the id (its file name) and title it is published under."""
    schema = model.model_json_schema()
    schema["$id"] = f"https://recallfix.dev/{path.name}"
    schema["title"] = title
    return schema


def write_json_schema_of(model: type[BaseModel], title: str, path: Path) -> Path:
    return atomic_write_text(path, json.dumps(json_schema_of(model, title, path), indent=2) + "\n")


def atomic_write_text(path: Path, text: str) -> Path:
    """Write a file so readers see the old content or the new, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextmanager
def atomic_directory(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a scratch directory that becomes `out` only if the block finishes without error."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    scratch.chmod(0o755)  # mkdtemp makes it private; the result should be readable like any other directory
    try:
        yield scratch
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(scratch, out)
            shutil.rmtree(old)
        else:
            os.replace(scratch, out)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def resolve_model_dir(model: str | Path) -> Path:
    """A local checkpoint directory for a directory, a .gguf file, a named model or a hub name
    (`recallfix.patches.models.resolve_model`)."""
    from .models import resolve_model

    return resolve_model(model)


def safetensors_index(model_dir: Path) -> dict[str, str]:
    """Tensor name -> shard file name for a safetensors checkpoint (sharded or single file)."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    single = model_dir / "model.safetensors"
    if single.exists():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {name: single.name for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    if any(model_dir.glob(f"*{suffix}") for suffix in PICKLE_SUFFIXES):
        raise ValueError(
            f"{model_dir} holds only pickle weights; recallfix reads safetensors only "
            "(convert with `model.save_pretrained(dir, safe_serialization=True)`)"
        )
    raise FileNotFoundError(f"{model_dir} has no model.safetensors or model.safetensors.index.json")


def checkpoint_key(param_name: str, index: dict[str, str]) -> str:
    """The checkpoint's name for a model parameter. Some checkpoints drop the base-model prefix
    (GPT-2's hub weights say `h.0.attn.c_proj.weight` for `transformer.h.0.attn.c_proj.weight`)."""
    if param_name in index:
        return param_name
    stripped = param_name.split(".", 1)[1]
    if stripped in index:
        return stripped
    raise KeyError(f"tensor {param_name} is not in the checkpoint")


def load_model(
    model: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu", trust_remote_code: bool = False
) -> torch.nn.Module:
    """Load a Hugging Face causal LM from safetensors only, in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if not sys.stderr.isatty():  # transformers' "Loading weights" bar would fill a log file with \r frames
        hf_logging.disable_progress_bar()
    lm = AutoModelForCausalLM.from_pretrained(
        resolve_model_dir(model), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    return lm.to(device).eval()


def load_causal_lm(
    model: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu", trust_remote_code: bool = False
) -> tuple[torch.nn.Module, object]:
    """Load a Hugging Face causal LM and its tokenizer (see `load_model`)."""
    from transformers import AutoTokenizer

    lm = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    return lm, AutoTokenizer.from_pretrained(resolve_model_dir(model), trust_remote_code=trust_remote_code)
