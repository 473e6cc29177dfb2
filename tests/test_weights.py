"""Token weights: each one's defining behaviour on small tensors, chunked statistics against
their plain twins, and a pass through `micro_step` on tiny models."""

from __future__ import annotations

import math

import pytest
import torch

from opd.context import StepContext
from opd.errors import ConfigError
from opd.method import Method
from opd.sampling import make_rollout, student
from opd.signals import Divergence, Linear
from opd.teachers import FullLogits
from opd.types import StudentRows, TeacherScores
from opd.weights import (
    AdaKD,
    EntropyBand,
    SelecTKD,
    SelecTKDVerify,
    SpecialTokenMask,
    hellinger_distance,
    teacher_entropy,
)


def rows(n=7, d=5, v=11, seed=0, targets=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = StudentRows(
        hidden_ND=torch.randn(n, d, generator=g, dtype=dtype),
        head_VD=torch.randn(v, d, generator=g, dtype=dtype),
        target_ids_N=torch.as_tensor(targets)
        if targets is not None
        else torch.randint(0, v, (n,), generator=g),
        row_index_N=torch.zeros(n, dtype=torch.long),
    )
    t = TeacherScores(
        hidden_ND=2 * torch.randn(n, d, generator=g, dtype=dtype),
        head_VD=torch.randn(v, d, generator=g, dtype=dtype),
    )
    return s, t


def call(weight, values, s=None, t=None, **ctx):
    if s is None:
        s, t = rows(n=len(values))
    return weight(torch.as_tensor(values, dtype=torch.float64), s, t, None, StepContext(**ctx))


# --------------------------------------------------------------------------- SpecialTokenMask


def test_special_token_mask_default_keeps_stop_tokens(tok):
    special = {
        t: tok.convert_tokens_to_ids(t)
        for t in ("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
    }
    a = tok.convert_tokens_to_ids("a")
    targets = [
        a,
        special["<s>"],
        special["</s>"],
        special["<|im_start|>"],
        special["<|im_end|>"],
        a,
    ]
    s, t = rows(n=6, targets=targets)
    w = call(SpecialTokenMask(), [1.0] * 6, s, t, tokenizer=tok)
    assert w.tolist() == [1, 0, 1, 0, 1, 1]  # eos and end-of-turn stay in the loss
    w_all = call(SpecialTokenMask(keep_stop=False), [1.0] * 6, s, t, tokenizer=tok)
    assert w_all.tolist() == [1, 0, 0, 0, 0, 1]
    w_ids = call(SpecialTokenMask(ids=[a]), [1.0] * 6, s, t)  # explicit ids need no tokenizer
    assert w_ids.tolist() == [0, 1, 1, 1, 1, 0]
    assert w.dtype == torch.float64 and not w.requires_grad


def test_special_token_mask_without_tokenizer_or_ids_is_an_error():
    with pytest.raises(ConfigError, match="tokenizer"):
        call(SpecialTokenMask(), [1.0, 2.0])


# --------------------------------------------------------------------------- AdaKD


def test_adakd_signal_weights_are_proportional_with_mean_one():
    w = call(AdaKD(metric="signal"), [0.0, 1.0, 2.0, 3.0])
    torch.testing.assert_close(w, torch.tensor([0.0, 2 / 3, 4 / 3, 2.0], dtype=torch.float64))
    assert w.mean().item() == pytest.approx(1.0)


def test_adakd_focus_keeps_the_hardest_tokens():
    w = call(AdaKD(metric="signal", focus=0.5), [3.0, 0.5, 1.0, 2.0])
    torch.testing.assert_close(w, torch.tensor([1.2, 0.0, 0.0, 0.8], dtype=torch.float64))
    flat = call(AdaKD(metric="signal", focus=0.5, proportional=False), [3.0, 0.5, 1.0, 2.0])
    assert flat.tolist() == [1, 0, 0, 1]
    # a scheduled focus: all tokens at progress 0, the top quarter at progress 1
    sched = AdaKD(metric="signal", focus=Linear(1.0, 0.25), proportional=False)
    assert call(sched, [3.0, 0.5, 1.0, 2.0], step=0, total_steps=4).sum() == 4
    assert call(sched, [3.0, 0.5, 1.0, 2.0], step=4, total_steps=4).tolist() == [1, 0, 0, 0]


def test_adakd_equal_distributions_give_uniform_weights_and_hellinger_needs_logits():
    s, t = rows(n=5)
    same = TeacherScores(hidden_ND=s.hidden_ND, head_VD=s.head_VD)
    w = call(AdaKD(), [1.0] * 5, s, same)
    assert w.tolist() == [1.0] * 5
    assert AdaKD().requires == frozenset({"full_logits"})
    assert AdaKD(metric="signal").requires == frozenset()
    with pytest.raises(ConfigError, match="focus"):
        AdaKD(focus=0.0)


def test_hellinger_matches_plain_reference_and_orders_difficulty():
    s, t = rows(n=9)
    h = hellinger_distance(s, t, chunk_size=4)
    p = torch.softmax(t.hidden_ND @ t.head_VD.T, -1)
    q = torch.softmax(s.hidden_ND @ s.head_VD.T, -1)
    ref = ((p.sqrt() - q.sqrt()).pow(2).sum(-1) / 2).sqrt()
    torch.testing.assert_close(h, ref)
    assert ((h >= 0) & (h <= 1)).all()
    w = call(AdaKD(), [1.0] * 9, s, t, chunk_size=4)
    assert torch.equal(w.argsort(), h.argsort())  # harder tokens weigh more


# --------------------------------------------------------------------------- SelecTKD


def test_selectkd_keeps_fraction_rho_by_learning_value():
    values = [0.1, 5.0, 0.3, 2.0, 0.2, 4.0]
    assert call(SelecTKD(rho=0.5), values).tolist() == [0, 1, 0, 1, 0, 1]
    assert call(SelecTKD(rho=0.01), values).tolist() == [0, 1, 0, 0, 0, 0]  # at least one
    assert call(SelecTKD(rho=1.0), values).sum() == 6
    with pytest.raises(ConfigError, match="rho"):
        SelecTKD(rho=1.5)


def test_selectkd_verify_accepts_tokens_in_teacher_topk():
    v = 6
    # teacher logits = hidden @ I: row 0 ranks 5 > 4 > 3 ..., row 1 ranks 0 > 1 > 2 ...
    teacher = TeacherScores(
        hidden_ND=torch.tensor([[0.0, 1, 2, 3, 4, 5], [5.0, 4, 3, 2, 1, 0]]), head_VD=torch.eye(v)
    )
    s = StudentRows(
        hidden_ND=torch.tensor(
            [[9.0, 0, 0, 0, 0, 0], [9.0, 0, 0, 0, 0, 0]]
        ),  # argmax 0 in both rows
        head_VD=torch.eye(v),
        target_ids_N=torch.tensor([4, 3]),  # row 0: rank 2 of 6; row 1: rank 4 of 6
        row_index_N=torch.tensor([0, 0]),
    )
    ctx = StepContext(chunk_size=1)
    values = torch.ones(2)
    assert SelecTKDVerify(k=2)(values, s, teacher, None, ctx).tolist() == [1, 0]
    assert SelecTKDVerify(k=4)(values, s, teacher, None, ctx).tolist() == [1, 1]
    assert SelecTKDVerify(k=2, reject_weight=0.25)(values, s, teacher, None, ctx).tolist() == [
        1,
        0.25,
    ]
    # greedy proposals: argmax 0 is the teacher's last in row 0, its first in row 1
    assert SelecTKDVerify(k=2, proposal="greedy")(values, s, teacher, None, ctx).tolist() == [0, 1]


# --------------------------------------------------------------------------- EntropyBand


def test_teacher_entropy_matches_plain_reference_and_limits():
    s, t = rows(n=10)
    h = teacher_entropy(t, temperature=1.5, chunk_size=3)
    log_p = torch.log_softmax(t.hidden_ND @ t.head_VD.T / 1.5, -1)
    torch.testing.assert_close(h, -(log_p.exp() * log_p).sum(-1))
    v = 8
    uniform = TeacherScores(hidden_ND=torch.zeros(1, 2), head_VD=torch.randn(v, 2))
    peaked = TeacherScores(hidden_ND=torch.tensor([[1e4]]), head_VD=torch.eye(v, 1))
    assert teacher_entropy(uniform).item() == pytest.approx(math.log(v), abs=1e-6)
    assert teacher_entropy(peaked).item() == pytest.approx(0.0, abs=1e-6)


def test_entropy_band_keeps_tokens_inside_the_band():
    s, t = rows(n=12)
    h = teacher_entropy(t)
    lo, hi = h.sort().values[3].item(), h.sort().values[8].item()
    w = call(EntropyBand(lo, hi), [1.0] * 12, s, t)
    assert w.tolist() == ((h >= lo) & (h <= hi)).double().tolist()
    assert w.sum() == 6
    with pytest.raises(ConfigError, match="low <= high"):
        EntropyBand(2.0, 1.0)


def test_method_rejects_weight_the_teacher_cannot_serve():
    class SampledOnly:
        provides = frozenset({"token_logprobs"})

        def describe(self):
            return "sampled log-probs"

    class SampledSignal:
        requires = frozenset({"token_logprobs"})

        def __call__(self, student, teacher, ctx):
            raise AssertionError("not called")

        def describe(self):
            return "sampled"

    with pytest.raises(ConfigError, match="token weight teacher-entropy band"):
        Method(
            prefixes=student(),
            teacher=SampledOnly(),
            signal=SampledSignal(),
            weights=(EntropyBand(0, 1),),
        )
    Method(
        prefixes=student(), teacher=SampledOnly(), signal=SampledSignal(), weights=(SelecTKD(0.5),)
    )


# --------------------------------------------------------------------------- tiny models


def test_weights_on_tiny_models_match_model_logits_and_backprop(tiny_models):
    from opd.build import finish_models
    from opd.train import micro_step

    teacher, student_model, tok = tiny_models
    models = finish_models(teacher, student_model, tok)
    ids = [tok.convert_tokens_to_ids(c) for c in "12+3="]
    eos = tok.eos_token_id
    rollout = make_rollout([ids, ids[:3]], [[5, 6, 7, eos], [8, 9]], models.pad_id, "student")
    scores = FullLogits().score(models.teacher, rollout, models.vocab_size)
    with torch.no_grad():
        logits_BLV = models.teacher(
            rollout.input_ids_BL, attention_mask=rollout.attention_mask_BL
        ).logits
    P, T = rollout.prompt_len, rollout.completion_mask_BT.shape[1]
    logits_NV = logits_BLV[:, P - 1 : P - 1 + T][rollout.completion_mask_BT.bool()][
        :, : models.vocab_size
    ]
    log_p = torch.log_softmax(logits_NV.float(), -1)
    torch.testing.assert_close(
        teacher_entropy(scores, chunk_size=2), -(log_p.exp() * log_p).sum(-1), atol=1e-5, rtol=1e-5
    )

    h = teacher_entropy(scores)
    method = Method(
        prefixes=student(),
        signal=Divergence("reverse_kl"),
        weights=(
            SpecialTokenMask(keep_stop=False),
            AdaKD(),
            EntropyBand(0.0, float(h.max())),
            SelecTKD(rho=0.75),
        ),
    )
    loss, _, _ = micro_step(
        method, models, rollout, StepContext(chunk_size=2, tokenizer=tok), "cpu"
    )
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    grads = [p.grad for p in models.student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
