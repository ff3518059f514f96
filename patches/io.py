"""File I/O shared by every part: atomic writes, model directories, safetensors checkpoints, dtype names."""

from __future__ import annotations

import errno
import json
import os
import re
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


# Errors that say the target cannot take the write (full disk, quota, file too large, read-only), whatever the
# file it happened on: they are reported against the output path. safetensors reports them in its own error type.
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})
_OS_ERROR_IN_TEXT = re.compile(r"os error (\d+)")


class WriteError(OSError):
    """An output that could not be written (full disk, read-only or unwritable place); nothing of it is left."""


def _write_error(err: BaseException, target: Path, *, any_os_error: bool = False) -> WriteError | None:
    """The one-line error naming `target` for a failed write, or None where `err` is not about the write."""
    code = err.errno if isinstance(err, OSError) else None
    if code is None and (found := _OS_ERROR_IN_TEXT.search(str(err))):
        code = int(found.group(1))
    if code is None or not (code in _NO_ROOM or (any_os_error and isinstance(err, OSError))):
        return None
    where = f" ({err.filename})" if isinstance(err, OSError) and err.filename and Path(err.filename) != target else ""
    return WriteError(code, f"cannot write {target}: {os.strerror(code)}{where}")


def _scratch_prefix(target: Path) -> str:
    """Temp names beside `target` carry the writer's pid: a later write removes those of dead writers."""
    return f".{target.name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_scratch(target: Path) -> list[Path]:
    """Remove the temp files and directories that writers of `target` killed midway (SIGKILL, power loss) left
    beside it: those whose pid is no longer running. Returns what was removed."""
    removed = []
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\..*\.tmp$")
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return removed
    for path in siblings:
        found = pattern.match(path.name)
        if found and not _alive(int(found.group(1))):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def atomic_write_text(path: Path, text: str) -> Path:
    """Write a file so readers see the old content or the new, never half of it. A write that fails (full disk,
    read-only place) raises `WriteError` naming `path` and leaves the old content."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_scratch(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_scratch_prefix(path), suffix=".tmp")
    except OSError as err:
        raise _write_error(err, path, any_os_error=True) from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        failure = _write_error(err, path)
        if failure is not None:
            raise failure from None
        raise
    return path


_RENAME_EXCHANGE = 2  # renameat2(2) flag: swap two paths atomically


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux renameat2); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    at_cwd = -100
    return libc.renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def commit_directory(scratch: Path, out: Path) -> None:
    """Make the finished `scratch` directory `out`, replacing any previous `out` in one step where the system can.
    The one moment of `atomic_directory` at which `out` changes (the fault tests hold a writer here)."""
    if out.exists() and _exchange(scratch, out):
        shutil.rmtree(scratch)  # the previous `out`, swapped out
    elif out.exists():  # no atomic swap here: a short moment without `out`
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=_scratch_prefix(out), suffix=".old.tmp"))
        os.replace(out, old)
        os.replace(scratch, out)
        shutil.rmtree(old)
    else:
        os.replace(scratch, out)


@contextmanager
def atomic_directory(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a scratch directory that becomes `out` only if the block finishes without error.

    `out` is, at every moment, absent or complete: the previous one until the new one replaces it in one
    step (a killed writer leaves no half directory). The scratch directory of a writer killed midway stays
    beside `out` until the next write of `out` removes it. A write that fails for lack of room or a read-only
    place raises `WriteError` naming `out`, and leaves nothing of the new directory."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --force to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_scratch(out)
        scratch = Path(tempfile.mkdtemp(dir=out.parent, prefix=_scratch_prefix(out), suffix=".tmp"))
    except OSError as err:
        raise _write_error(err, out, any_os_error=True) from None
    scratch.chmod(0o755)  # mkdtemp makes it private; the result should be readable like any other directory
    try:
        yield scratch
        commit_directory(scratch, out)
    except BaseException as err:
        shutil.rmtree(scratch, ignore_errors=True)
        failure = _write_error(err, out)
        if failure is not None:
            raise failure from None
        raise


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
