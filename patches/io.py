"""File I/O shared by every part: atomic writes, model directories, safetensors checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


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
    """A local checkpoint directory for a path or a Hugging Face hub name (from the local cache or hub)."""
    path = Path(model)
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{path} is a file; expected a model directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(model), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as err:  # the hub client raises many types; the user needs the name and the reason
        raise FileNotFoundError(
            f"model {model!r} is neither a local directory nor reachable on the hub: {err}"
        ) from None


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
