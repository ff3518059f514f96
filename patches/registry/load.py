"""Loading a Hugging Face causal LM from wherever a `--model` points (`models.resolve_model`), safetensors only."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .models import resolve_model


def load_model(
    model: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu", trust_remote_code: bool = False
) -> torch.nn.Module:
    """Load a Hugging Face causal LM from safetensors only, in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if not sys.stderr.isatty():  # transformers' "Loading weights" bar would fill a log file with \r frames
        hf_logging.disable_progress_bar()
    lm = AutoModelForCausalLM.from_pretrained(
        resolve_model(model), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    return lm.to(device).eval()


def load_causal_lm(
    model: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu", trust_remote_code: bool = False
) -> tuple[torch.nn.Module, object]:
    """Load a Hugging Face causal LM and its tokenizer (see `load_model`)."""
    from transformers import AutoTokenizer

    lm = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    return lm, AutoTokenizer.from_pretrained(resolve_model(model), trust_remote_code=trust_remote_code)
