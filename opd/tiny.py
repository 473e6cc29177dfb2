"""Tiny models and character-level tokenizers, built in code.

Used by the tests (models of a few hundred thousand parameters that run in milliseconds),
by the benchmarks, and by the synthetic tasks that train a teacher from scratch. Nothing
here downloads anything.

The tokenizer is character level: one token per printable ASCII character plus the chat
special tokens, so any text in the synthetic tasks round-trips exactly. It carries a
ChatML chat template (the same shape as SmolLM2's), so chat rows work as with real models.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def char_tokenizer(chars: str | None = None) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer with ChatML special tokens.

    Args:
      chars: the characters of the vocabulary; default printable ASCII (100 characters).

    Returns:
      A `PreTrainedTokenizerFast` with `pad_token`, `bos_token`, `eos_token`, the chat
      template, and `len(tok) == 5 + len(chars)`. Special tokens take ids 0..4.
    """
    chars = string.printable if chars is None else chars
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        if ch not in vocab:
            vocab[ch] = len(vocab)
    # BPE with no merges is exactly "one token per known character".
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=[IM_START, IM_END],
    )
    tok.chat_template = CHATML_TEMPLATE
    tok.padding_side = "left"
    return tok


def tiny_llama(
    vocab_size: int,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
    max_positions: int = 512,
    seed: int = 0,
    tie_embeddings: bool = False,
    pad_token_id: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
) -> LlamaForCausalLM:
    """A randomly initialised Llama causal LM (float32, eval mode off).

    With the defaults and a 105-token vocabulary it has about 0.1 M parameters.
    """
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model


def tiny_pair(seed: int = 0, teacher_layers: int = 3, student_layers: int = 2):
    """A (teacher, student, tokenizer) triple sharing one character tokenizer."""
    tok = char_tokenizer()
    teacher = tiny_llama(len(tok), hidden=64, layers=teacher_layers, seed=seed + 1)
    student = tiny_llama(len(tok), hidden=48, layers=student_layers, heads=4, seed=seed + 2)
    return teacher, student, tok
