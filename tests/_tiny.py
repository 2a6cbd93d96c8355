"""Tiny random-init models for tests: a 2-layer Llama with a byte-level tokenizer, built in code."""

from __future__ import annotations

import os
from pathlib import Path


def tiny_llama(
    seed: int = 0, layers: int = 2, hidden: int = 64, intermediate: int = 172, tie: bool = False
):
    """A random-init Llama (byte-level vocabulary) for tests: instant, no files needed.

    ``intermediate`` defaults to a width that is not a multiple of 8, to exercise bit padding.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=260,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
    )
    return LlamaForCausalLM(cfg).eval()


def byte_tokenizer():
    """A byte-level fast tokenizer matching :func:`tiny_llama`'s vocabulary, built in code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<s>": 256, "</s>": 257, "<pad>": 258, "<unk>": 259})
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def save_tiny(path: str | os.PathLike, seed: int = 0, **kw) -> Path:
    """Write a tiny Llama plus its tokenizer as a Hugging Face folder (for CLI tests)."""
    path = Path(path)
    tiny_llama(seed, **kw).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path
