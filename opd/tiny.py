"""Tiny models and character-level tokenizers, built in code.

Used by the tests (models of a few hundred thousand parameters that run in milliseconds),
by the benchmarks, and by the synthetic tasks that train a teacher from scratch. Nothing
here downloads anything. `tiny_gguf` writes a tiny Llama as a GGUF file, laid out as
llama.cpp's converter does, to test GGUF loading without a real model.

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


def save_llama_gguf(model: LlamaForCausalLM, path, tokens: list[str]) -> None:
    """Write a float32 llama GGUF the way llama.cpp lays it out (byte-level BPE tokenizer)."""
    cfg = model.config
    import gguf  # only here: the rest of this module needs no GGUF support

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))  # 3 = control (special)
    w.add_token_merges(["a b"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    rename = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }  # fmt: skip
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    for name, t in model.state_dict().items():
        t = t.detach().float()
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            gname = "output.weight"
        else:
            _, _, layer, *rest = name.split(".")
            kind = rename[".".join(rest[:-1])]
            gname = f"blk.{layer}.{kind}.weight"
            if kind in heads:  # llama.cpp interleaves the two rotary halves of each head
                n = heads[kind]
                t = t.reshape(n, 2, t.shape[0] // n // 2, -1).transpose(1, 2).reshape(t.shape)
        w.add_tensor(gname, t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_gguf(path, tie_embeddings: bool = False, seed: int = 0):
    """Write a tiny float32 Llama GGUF with a byte-level BPE tokenizer to ``path``.

    The vocabulary is ``<pad> <s> </s>``, the 256 byte symbols and one merge, ``"ab"`` (260
    tokens). Returns ``(model, tokens)``: the Llama the file holds and its token list.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()
    tokens = [PAD, BOS, EOS] + [byte_chars[b] for b in range(256)] + ["ab"]
    model = tiny_llama(len(tokens), tie_embeddings=tie_embeddings, seed=seed)
    save_llama_gguf(model, path, tokens)
    return model, tokens
