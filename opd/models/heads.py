"""The decoder/head split the chunked losses rely on, and vocabulary checks for a pair.

Training, teacher scoring and evaluation never ask a model for its logits: they run its
decoder (final norm included) and project the counted rows themselves, ``hidden_ND @
W_VD.T``, a chunk of rows at a time. That equals ``model(...).logits`` only when the logits
are a plain linear map of the last hidden state with no bias, so models are refused when:

- their config announces logit post-processing (Gemma 2/3 ``final_logit_softcapping``,
  Cohere ``logit_scale``, Granite ``logits_scaling``), or a forward pass shows some;
- their output layer (lm_head) has a bias (Phi-1/2, GPT-J, CodeGen, ...): the projection
  above would silently drop it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedModel

from opd.errors import ModelError

# Config attributes that change logits after the lm_head (Gemma 2/3 softcapping, Cohere
# logit_scale, Granite logits_scaling). The chunked loss projects hidden states itself.
_LOGIT_PROCESSING_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
_UNSUPPORTED = "but opd projects hidden states with the lm_head weight alone and would"


def _named(model: nn.Module, name: str | None) -> str:
    cls = type(model).__name__
    return f"model '{name}' ({cls})" if name else cls


def check_head(model: nn.Module, name: str | None = None) -> nn.Linear:
    """The model's lm_head, if opd can reproduce its logits from it; else ModelError.

    Args:
      model: a causal LM.
      name: how the error names the model (its path or hub id); default its class.
    """
    who = _named(model, name)
    cfg = getattr(model, "config", None)
    for attr in _LOGIT_PROCESSING_ATTRS:
        value = getattr(cfg, attr, None)
        if value is not None and value != 1.0:
            raise ModelError(
                f"{who} applies {attr}={value} to its logits, {_UNSUPPORTED} leave that out; "
                f"such models are not supported"
            )
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if not isinstance(head, nn.Linear):
        raise ModelError(f"{who} has no linear output layer (lm_head)")
    if head.bias is not None:
        raise ModelError(
            f"{who} has a bias on its output layer (lm_head), {_UNSUPPORTED} drop the bias in "
            f"training, teacher scoring and evaluation; models with a biased lm_head are not "
            f"supported"
        )
    return head


def decoder_and_head(
    model: PreTrainedModel, verify: bool = True
) -> tuple[Callable[..., torch.Tensor], torch.Tensor, None]:
    """Split a causal LM into its decoder (final norm included) and its output projection.

    ``decoder_fn(ids, mask) @ head_weight.T`` equals ``model(ids, mask).logits``; the
    chunked loss uses the parts to project only completion rows, a chunk at a time.

    Args:
      model: a causal LM whose logits are a plain linear map (no bias) of the last hidden state.
      verify: check that identity on an 8-token input (one small forward pass, in eval
        mode), catching logit processing this module does not know by name.

    Returns:
      ``(decoder_fn, head_weight_VD, None)``: ``decoder_fn(input_ids_BT, attention_mask_BT,
      **kwargs) -> hidden_BTD``. The third item, the head's bias, is always None (a head with
      a bias is refused); it is kept so call sites unpacking three values keep working.

    Raises:
      ModelError: the model scales or caps its logits, its lm_head has a bias, or it has no
        separate decoder and linear lm_head.
    """
    head = check_head(model)
    decoder = model.get_decoder()
    if decoder is model:
        raise ModelError(f"{type(model).__name__} has no separate decoder and linear lm_head")

    def decoder_fn(input_ids, attention_mask=None, **kwargs):
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        return out.last_hidden_state  # (B, T, D), after the final norm

    if verify:
        _verify_split(model, decoder_fn, head)
    return decoder_fn, head.weight, None


def _verify_split(model, decoder_fn, head: nn.Linear) -> None:
    """Compare the split with the model's own logits on a short input."""
    # Several ids: a single one could be a padding row that is all zeros in a fresh model.
    ids = torch.arange(min(8, head.weight.shape[0]), device=head.weight.device)[None]  # (1, T)
    was_training = model.training
    model.eval()  # dropout would make the two passes differ
    try:
        with torch.no_grad():
            expected = model(input_ids=ids).logits.float()
            got = head(decoder_fn(ids)).float()
    finally:
        model.train(was_training)
    tol = 1e-3 * expected.abs().max().item() + 1e-6  # relative: tiny random models have tiny logits
    if (expected - got).abs().max().item() > tol:
        raise ModelError(
            f"{type(model).__name__} post-processes its logits (they differ from "
            f"lm_head(hidden states)), {_UNSUPPORTED} leave that out; such models are not "
            f"supported"
        )


def _head_rows(model: PreTrainedModel) -> int:
    head = model.get_output_embeddings()
    if head is None:
        raise ModelError(f"{type(model).__name__} has no output embedding (lm_head)")
    return head.weight.shape[0]


def shared_vocab_size(student, student_tok, teacher, teacher_tok) -> int:
    """The vocabulary size a student/teacher pair can be compared on.

    Both tokenizers must map every token to the same id. The models' output embeddings may
    still differ in rows (vocabularies padded to a multiple of 64, say): rows past the
    tokenizer are never real tokens, so both heads are sliced to the smaller size.

    Args:
      student, teacher: causal LMs.
      student_tok, teacher_tok: their tokenizers.

    Returns:
      V = min(V_student, V_teacher), at least ``len(student_tok)``.

    Raises:
      ModelError: the tokenizers disagree (cross-tokenizer distillation is not supported
        yet), or a head has fewer rows than the tokenizer has tokens.
    """
    v_s, v_t = _head_rows(student), _head_rows(teacher)
    sizes = (
        f"student tokenizer {len(student_tok)} tokens, embedding {v_s} rows; "
        f"teacher tokenizer {len(teacher_tok)} tokens, embedding {v_t} rows"
    )
    vocab_s, vocab_t = student_tok.get_vocab(), teacher_tok.get_vocab()
    if vocab_s != vocab_t:
        moved = sorted(t for t in vocab_s.keys() & vocab_t.keys() if vocab_s[t] != vocab_t[t])
        differ = moved + sorted(vocab_s.keys() ^ vocab_t.keys())  # moved ids: clearer examples
        examples = ", ".join(
            f"{t!r} student {vocab_s.get(t)} teacher {vocab_t.get(t)}" for t in differ[:3]
        )
        raise ModelError(
            f"student and teacher tokenizers map tokens to ids differently ({sizes}; "
            f"{len(differ)} tokens differ, e.g. {examples}); they need a cross-tokenizer "
            f"recipe (xtok_sampled_rkl, xtok_gold; docs/cross-tokenizer.md)"
        )
    shared = min(v_s, v_t)
    if shared < len(student_tok):
        raise ModelError(f"an output embedding is smaller than the tokenizer ({sizes})")
    return shared
