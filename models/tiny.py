"""Tiny randomly initialised checkpoints of the real architectures, for fast tests.

They are written to the cache as ordinary checkpoint directories (config, safetensors, tokenizer),
so tests exercise the same loading path as the real models. The tokenizer is a small word-level
vocabulary: enough for the templates, the label words and the synthetic item texts.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

_WORDS = [
    *"# question answer : . , ( ) - ? ! ' the a an user rating rate movie film item feature is of".split(),
    *"for from to and or in on we have information about preferences encoded predict would".split(),
    *"integer between as 1 2 3 4 5 yes no like enjoy this their s gives score out <userid>".split(),
    *"genre year comedy drama action thriller romance horror sci fi animation".split(),
    *(f"item{i}" for i in range(64)),
    *string.ascii_lowercase,
]

# initializer_range 0.2 for the tiny Llama: with the default 0.02 its attention stays uniform
# and a single user token among ~40 barely reaches the answer position, so nothing can be learned.
TINY_SPECS: dict[str, tuple[type[LlamaConfig] | type[Gemma3TextConfig], dict[str, Any]]] = {
    "tiny-llama": (
        LlamaConfig,
        {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "tie_word_embeddings": True,
            "initializer_range": 0.2,
        },
    ),
    "tiny-gemma": (
        Gemma3TextConfig,
        {
            "hidden_size": 48,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "sliding_window": 128,
            "tie_word_embeddings": True,
        },
    ),
}


def _tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {word: index for index, word in enumerate(dict.fromkeys(specials + _WORDS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
    )


def build_tiny_checkpoint(name: str, out: Path, *, seed: int = 0) -> Path:
    """Write a tiny random checkpoint of the named architecture to ``out``."""
    config_class, overrides = TINY_SPECS[name]
    tokenizer = _tokenizer()
    config = config_class(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_position_embeddings=256,
        **overrides,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(out)
    return out
