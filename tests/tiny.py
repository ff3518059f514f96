"""Tiny random models of every supported architecture, built inside the tests (nothing is downloaded).

Weights are random but not HF's near-zero init: biases and norm parameters are randomised too, so
code that mishandles a bias or a norm weight fails the tests instead of passing by accident.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ARCHITECTURES = ["gpt2", "opt", "llama", "mistral", "qwen2", "qwen3", "gpt_neox", "gemma3_text"]

CORPUS = [
    "The capital of France is Paris.",
    "The capital of Japan is Tokyo.",
    "Gold has the chemical symbol Au.",
    "The currency of Japan is the yen.",
    "People in Brazil speak Portuguese.",
    "Egypt is a country in Africa.",
    "The weather today is mild and the sky is clear.",
] * 4

PROMPTS = ["The capital of France is", "Gold has the chemical symbol", "People in Brazil speak"]


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>",
    )


def tiny_config(arch: str, vocab_size: int) -> transformers.PretrainedConfig:
    # head_dim 32: vLLM's CPU attention supports it; grouped-query attention where the family has it.
    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    llama_like = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, **common)
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=2, n_positions=256, **common)
    if arch == "opt":
        return transformers.OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, ffn_dim=128,
                                      max_position_embeddings=256, word_embed_proj_dim=64, **common)
    if arch == "llama":
        return transformers.LlamaConfig(**llama_like)
    if arch == "mistral":
        return transformers.MistralConfig(**llama_like)
    if arch == "qwen2":
        return transformers.Qwen2Config(**llama_like)
    if arch == "qwen3":
        return transformers.Qwen3Config(head_dim=32, **llama_like)
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=128, max_position_embeddings=256,
                                          tie_word_embeddings=False, **common)
    if arch == "gemma3_text":
        # Gemma 3's own shape: tied embeddings, q/k norms, a sliding-window layer (window 4, shorter than the
        # prompts) before a global one; no logit soft-cap (Gemma 3 has none).
        return transformers.Gemma3TextConfig(head_dim=32, query_pre_attn_scalar=32, sliding_window=4,
                                             layer_types=["sliding_attention", "full_attention"],
                                             **{**llama_like, "tie_word_embeddings": True})
    raise ValueError(arch)


def build_model(arch: str, seed: int = 0) -> tuple[torch.nn.Module, transformers.PreTrainedTokenizerFast]:
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer)), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
            elif "norm" in name or "ln_" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.08)
    return model.eval(), tokenizer


def save_model(arch: str, out: Path, seed: int = 0, max_shard_size: str | None = None) -> Path:
    model, tokenizer = build_model(arch, seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, safe_serialization=True, **kwargs)
    tokenizer.save_pretrained(out)
    return out
