"""Token-level samplers (token_mix, speculative, adaswitch), prefix(L) and replay on tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch

from opd.context import StepContext
from opd.data import Example
from opd.errors import ConfigError
from opd.sampling import (
    GenerationParams,
    HFBackend,
    adaswitch,
    dataset,
    prefix,
    replay,
    speculative,
    student,
    teacher,
    token_mix,
)
from opd.sampling.adaswitch import switch_decode
from opd.sampling.interleaved import warp
from opd.sampling.token_level import speculative_decode

GREEDY = GenerationParams(max_new_tokens=6, temperature=0.0)
# Every warper on; explicit top_k because HF `generate` turns top_k=None into its default 50.
SAMPLED = GenerationParams(max_new_tokens=6, temperature=0.8, top_k=40, top_p=0.95)


def examples(tok, n=5):
    out = []
    for i in range(n):
        p = tok(f"{i}+{i}=", add_special_tokens=False).input_ids[: 2 + i % 3]  # ragged prompts
        c = tuple(tok(str(2 * i), add_special_tokens=False).input_ids) + (tok.eos_token_id,)
        out.append(Example(tuple(p), c, str(2 * i), f"mem:{i}", f"{i}+{i}="))
    return out


def ctx_for(tiny_models, params=SAMPLED, student_model=None, stop_ids=None):
    t, s, tok = tiny_models
    return StepContext(
        student=s if student_model is None else student_model,
        teacher=t,
        backend=HFBackend(),
        params=params,
        pad_id=tok.pad_token_id,
        stop_ids=tuple(stop_ids or (tok.eos_token_id,)),
    )


def seeded(source, exs, ctx, seed=0):
    torch.manual_seed(seed)
    return source.rollout(exs, ctx)


@torch.no_grad()
def next_token_logits(model, ro):
    """(B, T, V) logits predicting each completion token, from one full forward pass."""
    was = model.training
    model.eval()
    logits = model(input_ids=ro.input_ids_BL, attention_mask=ro.attention_mask_BL).logits
    model.train(was)
    P, T = ro.prompt_len, ro.completion_mask_BT.shape[1]
    return logits[:, P - 1 : P - 1 + T].float()


def rows(ro):
    return [
        ro.completion_ids_BT[i, : int(n)].tolist() for i, n in enumerate(ro.completion_lengths())
    ]


# --- token_mix (MiniLLM) ---------------------------------------------------------------------


@pytest.mark.parametrize("params", [SAMPLED, GREEDY], ids=["sampled", "greedy"])
def test_token_mix_ends_are_exactly_the_student_and_teacher_samplers(tiny_models, params):
    exs, ctx = examples(tiny_models[2]), ctx_for(tiny_models, params)
    for seed in (0, 1):
        pure_s, mix_0 = seeded(student(), exs, ctx, seed), seeded(token_mix(0.0), exs, ctx, seed)
        assert torch.equal(pure_s.input_ids_BL, mix_0.input_ids_BL)
        assert torch.all(mix_0.token_weight_BT == 1.0)  # q / (0·p + q)
        pure_t, mix_1 = seeded(teacher(), exs, ctx, seed), seeded(token_mix(1.0), exs, ctx, seed)
        assert torch.equal(pure_t.input_ids_BL, mix_1.input_ids_BL)


def test_token_mix_weights_are_importance_ratios(tiny_models):
    t, s, tok = tiny_models
    params = GenerationParams(max_new_tokens=6, temperature=0.8)
    exs, ctx = examples(tok), ctx_for(tiny_models, params)
    ro = seeded(token_mix(0.3, clip=None), exs, ctx)
    assert ro.writer == "student" and ro.token_weight_BT.shape == ro.completion_mask_BT.shape
    q_BTV = warp(next_token_logits(s, ro), params).softmax(-1)
    p_BTV = warp(next_token_logits(t, ro), params).softmax(-1)
    y_BT1 = ro.completion_ids_BT[..., None]
    q, p = q_BTV.gather(-1, y_BT1)[..., 0], p_BTV.gather(-1, y_BT1)[..., 0]
    mask = ro.completion_mask_BT.bool()
    expected = q / (0.3 * p + 0.7 * q)
    torch.testing.assert_close(ro.token_weight_BT[mask], expected[mask], atol=1e-4, rtol=1e-4)
    assert torch.all(ro.token_weight_BT[~mask] == 1.0)
    clipped = seeded(token_mix(0.3, clip=0.05), exs, ctx)
    assert torch.equal(clipped.input_ids_BL, ro.input_ids_BL)  # clipping changes weights only
    torch.testing.assert_close(
        clipped.token_weight_BT[mask], expected[mask].clamp(0.95, 1.05), atol=1e-4, rtol=0
    )


# --- speculative (SKD) -----------------------------------------------------------------------


def test_speculative_keeps_exactly_the_proposals_in_the_teacher_top_k(tiny_models):
    t, s, tok = tiny_models
    exs, ctx = examples(tok), ctx_for(tiny_models, GenerationParams(6, 1.0))
    torch.manual_seed(0)
    dec = speculative_decode(ctx, [ex.prompt_ids for ex in exs], k=20)
    ro = seeded(speculative(20), exs, ctx)
    assert rows(ro) == dec.completions and ro.writer == "speculative"
    top_BTK = next_token_logits(t, ro).topk(20, dim=-1).indices
    kept_n = 0
    for i, (comp, kept, prop) in enumerate(
        zip(dec.completions, dec.records["by_student"], dec.records["proposal"])
    ):
        for j, (y, k, y_prop) in enumerate(zip(comp, kept, prop)):
            assert bool(k) == (int(y_prop) in top_BTK[i, j].tolist())
            if k:
                assert y == int(y_prop)
            kept_n += int(k)
    n = sum(map(len, dec.completions))
    assert 0 < kept_n < n  # about 20/105 of the near-uniform student's proposals survive
    assert ro.info["student_share"] == pytest.approx(kept_n / n)


def test_speculative_k1_keeps_only_teacher_argmax(tiny_models):
    t, s, tok = tiny_models
    # The teacher proposing to itself at a low temperature: most proposals are its argmax.
    exs, ctx = examples(tok), ctx_for(tiny_models, GenerationParams(6, 0.03), student_model=t)
    torch.manual_seed(0)
    dec = speculative_decode(ctx, [ex.prompt_ids for ex in exs], k=1)
    ro = seeded(speculative(1), exs, ctx)
    argmax_BT = next_token_logits(t, ro).argmax(-1)
    kept_n = rejected_n = 0
    for i, (comp, kept, prop) in enumerate(
        zip(dec.completions, dec.records["by_student"], dec.records["proposal"])
    ):
        for j, (y, k) in enumerate(zip(comp, kept)):
            if k:
                assert y == int(argmax_BT[i, j])
                kept_n += 1
            else:
                assert int(prop[j]) != int(argmax_BT[i, j])
                rejected_n += 1
    assert kept_n > 0 and rejected_n > 0


def test_speculative_with_k_at_least_vocab_is_the_student(tiny_models):
    exs, ctx = examples(tiny_models[2]), ctx_for(tiny_models)
    ro = seeded(speculative(10_000), exs, ctx)
    assert torch.equal(ro.input_ids_BL, seeded(student(), exs, ctx).input_ids_BL)
    assert ro.info["student_share"] == 1.0


# --- adaswitch -------------------------------------------------------------------------------


def test_adaswitch_infinite_tau_is_student_and_minus_inf_is_teacher(tiny_models):
    exs = examples(tiny_models[2])
    ctx = ctx_for(tiny_models)
    ro = seeded(adaswitch(math.inf), exs, ctx)
    assert torch.equal(ro.input_ids_BL, seeded(student(), exs, ctx).input_ids_BL)
    assert ro.info["student_share"] == 1.0 and ro.info["switched_rows"] == 0.0
    greedy = ctx_for(tiny_models, GREEDY)
    ro = seeded(adaswitch(-math.inf), exs, greedy)
    assert torch.equal(ro.input_ids_BL, seeded(teacher(), exs, greedy).input_ids_BL)
    assert ro.info["student_share"] == 0.0 and ro.info["switched_rows"] == 1.0


def test_adaswitch_switches_once_at_the_first_token_over_tau(tiny_models):
    """Greedy: tokens before s are the student's argmax with −log p_teacher ≤ τ; the student's
    proposal at s has −log p_teacher > τ and is replaced; from s on the teacher's argmax."""
    t, s, tok = tiny_models
    exs, ctx = examples(tok), ctx_for(tiny_models, GREEDY)
    prompts = [ex.prompt_ids for ex in exs]
    free = switch_decode(ctx, prompts, math.inf)  # the student's path and every d_t on it
    ds = sorted(d for r in free.records["divergence"] for d in r)
    tau = ds[len(ds) // 2]
    dec = switch_decode(ctx, prompts, tau)
    ro = seeded(adaswitch(tau), exs, ctx)
    assert rows(ro) == dec.completions
    logp_BTV = next_token_logits(t, ro).log_softmax(-1)
    argmax_s_BT, argmax_t_BT = next_token_logits(s, ro).argmax(-1), logp_BTV.argmax(-1)
    mid_switches = 0
    for i, (comp, by_s, prop) in enumerate(
        zip(dec.completions, dec.records["by_student"], dec.records["proposal"])
    ):
        s_i = next((j for j, b in enumerate(by_s) if not b), len(comp))
        assert all(by_s[:s_i]) and not any(by_s[s_i:])  # one switch
        expected_s = next((j for j, d in enumerate(free.records["divergence"][i]) if d > tau), None)
        assert s_i == (
            expected_s if expected_s is not None and expected_s < len(comp) else len(comp)
        )
        for j, y in enumerate(comp):
            if j < s_i:
                assert y == int(prop[j]) == int(argmax_s_BT[i, j])
                assert -float(logp_BTV[i, j, y]) <= tau + 1e-4
            else:
                assert y == int(argmax_t_BT[i, j])
        if s_i < len(comp):
            assert -float(logp_BTV[i, s_i, int(prop[s_i])]) > tau - 1e-4
        mid_switches += 0 < s_i < len(comp)
    assert mid_switches > 0


def test_adaswitch_adaptive_threshold_rule(tiny_models):
    exs, ctx = examples(tiny_models[2]), ctx_for(tiny_models)
    torch.manual_seed(0)
    dec = switch_decode(
        ctx, [ex.prompt_ids for ex in exs], math.inf, "forward_kl", scale=1.05, window=2
    )
    for by_s, d in zip(dec.records["by_student"], dec.records["divergence"]):
        s_i = next((j for j, b in enumerate(by_s) if not b), len(by_s))
        for j in range(1, min(s_i + 1, len(by_s))):
            threshold = 1.05 * sum(d[max(0, j - 2) : j]) / len(d[max(0, j - 2) : j])
            assert (d[j] > threshold) == (j == s_i)
    with pytest.raises(ConfigError, match="divergence"):
        adaswitch(divergence="kl")


# --- prefix(L) (Fast OPD) ------------------------------------------------------------------


def test_prefix_caps_generation_and_loss_at_L(tiny_models):
    t, s, tok = tiny_models
    exs, ctx = examples(tok), ctx_for(tiny_models, stop_ids=(tok.pad_token_id,))  # never stops
    full = seeded(student(), exs, ctx)
    short = seeded(prefix(3), exs, ctx)
    assert short.completion_mask_BT.shape[1] == 3 and short.completion_lengths().tolist() == [
        3
    ] * len(exs)
    assert [r[:3] for r in rows(full)] == rows(short)  # same RNG: the first 3 draws agree
    assert ctx.params.max_new_tokens == 6 and short.info["prefix_length"] == 3
    ref = prefix(2, inner=dataset()).rollout(exs, ctx)  # any source, cut to L
    assert rows(ref) == [list(ex.completion_ids[:2]) for ex in exs]
    grow = prefix(2, length_end=6)
    assert [grow.length_at(p) for p in (0.0, 0.5, 1.0)] == [2, 4, 6]
    with pytest.raises(ConfigError, match="length"):
        prefix(0)


# --- replay (DistiLLM) -----------------------------------------------------------------------


def test_replay_fills_buffer_then_replays_and_falls_back_to_dataset(tiny_models):
    exs, ctx = examples(tiny_models[2], n=4), ctx_for(tiny_models)
    ctx.step, ctx.total_steps = 1, 1  # progress 1: no fresh samples once the buffer is full
    src = replay(capacity=6, rho_start=1.0, rho_end=1.0)
    torch.manual_seed(0)
    first, second = src.rollout(exs, ctx), src.rollout(exs, ctx)
    assert first.info["replayed"] == second.info["replayed"] == 0.0  # filling the buffer
    assert len(src.buffer) == 6 and src.buffer[-1][1] == tuple(
        rows(second)[-1]
    )  # FIFO, newest last
    stored = {(p, c) for p, c, _ in src.buffer}
    third = src.rollout(exs, ctx)
    assert third.info["replayed"] == 1.0 and third.writer == "student"
    for i, comp in enumerate(rows(third)):
        p = tuple(
            third.input_ids_BL[i, : third.prompt_len][
                third.attention_mask_BL[i, : third.prompt_len].bool()
            ].tolist()
        )
        assert (p, tuple(comp)) in stored
    off = replay(rho_start=0.0, rho_end=0.0)
    assert off.needs_completions and off.rollout(exs, ctx).writer == "dataset"
    with pytest.raises(ConfigError, match="rho_end"):
        replay(rho_end=1.5)


def test_replay_state_round_trip_resumes_exactly(tiny_models):
    exs, ctx = examples(tiny_models[2], n=4), ctx_for(tiny_models)
    ctx.step, ctx.total_steps = 3, 4
    a = replay(capacity=5, rho_start=1.0, rho_end=1.0)
    torch.manual_seed(0)
    for _ in range(2):
        a.rollout(exs, ctx)
    state = json.loads(json.dumps(a.state_dict()))  # what a checkpoint stores
    b = replay(capacity=5, rho_start=1.0, rho_end=1.0)
    b.load_state_dict(state)
    assert list(b.buffer) == list(a.buffer)
    rng = torch.get_rng_state()
    after_a = [a.rollout(exs, ctx) for _ in range(3)]
    torch.set_rng_state(rng)
    after_b = [b.rollout(exs, ctx) for _ in range(3)]
    assert any(r.info["replayed"] for r in after_a)
    for ra, rb in zip(after_a, after_b):
        assert torch.equal(ra.input_ids_BL, rb.input_ids_BL) and ra.info == rb.info
    assert b.state_dict() == a.state_dict()
