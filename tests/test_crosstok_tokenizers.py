"""Tiny tokenizers of two families, trained in the test process (no downloads).

- `byte_level_tok(vocab)`: GPT-2-style byte-level BPE, ChatML chat template, '<|im_end|>'.
- `sentencepiece_tok(vocab)`: Llama-2-style BPE with '▁' (Metaspace) and '<0xNN>' byte
  fallback, an '[INST] ... [/INST]' chat template and no end-of-turn token (eos ends a turn).
"""

from __future__ import annotations

import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from opd.tiny import BOS, CHATML_TEMPLATE, EOS, IM_END, IM_START, PAD

CORPUS = [
    "the cat sat on the mat. the dog sat on the log.",
    "2+3=5 and 4+4=8; 10-7=3.",
    "héllo wörld, ça va? naïve café.",
    "你好，世界。日本語のテキスト。",
    "emoji 🙂 🚀 and symbols ∑ ∞ → ←.",
    "def f(x):\n    return x * 2\n",
] * 4

INST_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'system' %}{{ '<<SYS>>' + message['content'] + '<</SYS>>' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def byte_level_tok(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=[IM_START, IM_END],
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def sentencepiece_tok(vocab_size: int = 420) -> PreTrainedTokenizerFast:
    specials = [PAD, BOS, EOS]
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 256, special_tokens=specials, show_progress=False
    )
    trained.train_from_iterator(CORPUS, trainer)
    spec = json.loads(trained.to_str())["model"]
    vocab = {t: i for i, t in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=False))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    core.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS
    )
    tok.chat_template = INST_TEMPLATE
    return tok


def test_the_two_families_round_trip_text():
    text = "héllo 你好 🙂 the cat"
    for tok in (byte_level_tok(), sentencepiece_tok()):
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids).strip() == text
    sp = sentencepiece_tok()
    assert "<0xF0>" in sp.get_vocab() and len(sp) == 420
