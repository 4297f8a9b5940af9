"""Tiny, randomly initialised models and a tiny tokenizer for fast tests.

Nothing here touches the network: configs are built in code and the byte-level BPE tokenizer
is trained on a few sentences at import time. Every supported architecture has one entry in
:data:`TINY_CONFIGS`, so contract tests can run over the whole table in seconds.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PhiConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    RobertaConfig,
)

_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Paris is a city in France. Rome is a city in Italy.",
    "A quick brown fox jumps over the lazy dog 0123456789.",
    "Question: Is the sky blue? Answer: yes. Question: Is grass red? Answer: no.",
    "entailment non-entailment premise hypothesis identifies assumes believes",
    "LASER replaces a weight matrix by its low-rank approximation.",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)


@functools.cache
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes) with bos/eos/pad and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _common(**kw: object) -> dict[str, object]:
    return {"vocab_size": len(tiny_tokenizer()), "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2, **kw}


TINY_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": lambda: LlamaConfig(**_common(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)),
    "mistral": lambda: MistralConfig(**_common(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256)),
    "qwen2": lambda: Qwen2Config(**_common(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256)),
    "gpt2": lambda: GPT2Config(**_common(n_embd=32, n_layer=3, n_head=4, n_positions=256)),
    "gptj": lambda: GPTJConfig(**_common(n_embd=32, n_layer=3, n_head=4, rotary_dim=4, n_positions=256)),
    "gpt_neox": lambda: GPTNeoXConfig(**_common(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=256)),
    "opt": lambda: OPTConfig(**_common(
        hidden_size=32, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=256, word_embed_proj_dim=32)),
    "phi": lambda: PhiConfig(**_common(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=256)),
    "bert": lambda: BertConfig(**_common(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=256)),
    "roberta": lambda: RobertaConfig(**_common(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=260)),
}
CAUSAL_ARCHS = tuple(a for a in TINY_CONFIGS if a not in ("bert", "roberta"))


def make_tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Build a randomly initialised model of ``arch`` (deterministic for a given seed)."""
    config = TINY_CONFIGS[arch]()
    torch.manual_seed(seed)
    auto = AutoModelForMaskedLM if arch in ("bert", "roberta") else AutoModelForCausalLM
    model = auto.from_config(config, dtype=dtype)
    # Random init leaves near-uniform logits; a wider init makes greedy outputs sensitive to edits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                p.normal_(0.0, 0.2)
    return model.eval()


def save_tiny_model(arch: str, path: str, seed: int = 0) -> str:
    """Write a tiny model and the tiny tokenizer as a Hugging Face folder (for loader tests)."""
    make_tiny_model(arch, seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
