"""Prefix sources and the Hugging Face generation backend on tiny models."""

from __future__ import annotations

import pytest
import torch

from opd.context import StepContext
from opd.data import Example
from opd.errors import ConfigError, DataError
from opd.sampling import (
    GenerationParams,
    HFBackend,
    dataset,
    make_rollout,
    mix,
    student,
    teacher,
)
from opd.sampling.backends.hf import cut_at_stop, left_pad

GREEDY = GenerationParams(max_new_tokens=7, temperature=0.0)


def examples(tok, n=6, with_completion=True):
    out = []
    for i in range(n):
        p = tok(f"{i}+{i}=", add_special_tokens=False).input_ids[: 2 + i % 3]  # ragged prompts
        c = tuple(tok(str(2 * i), add_special_tokens=False).input_ids) + (tok.eos_token_id,)
        out.append(
            Example(
                prompt_ids=tuple(p),
                completion_ids=c if with_completion else None,
                answer=str(2 * i),
                source=f"mem:{i}",
                prompt_text=f"{i}+{i}=",
            )
        )
    return out


def ctx_for(tiny_models, params=GREEDY, stop_ids=None):
    t, s, tok = tiny_models
    return StepContext(
        student=s,
        teacher=t,
        backend=HFBackend(),
        params=params,
        pad_id=tok.pad_token_id,
        stop_ids=tuple(stop_ids or (tok.eos_token_id,)),
    )


def test_make_rollout_layout():
    ro = make_rollout([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0, writer="x")
    assert ro.prompt_len == 3
    assert ro.input_ids_BL.tolist() == [[5, 6, 7, 1, 2, 0], [0, 0, 8, 3, 4, 9]]
    assert ro.attention_mask_BL.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert ro.completion_mask_BT.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert ro.completion_ids_BT.tolist() == [[1, 2, 0], [3, 4, 9]]
    assert ro.num_tokens == 5


def test_left_pad_and_cut():
    ids, mask = left_pad([[1, 2], [3]], pad_id=9)
    assert ids.tolist() == [[1, 2], [9, 3]] and mask.tolist() == [[1, 1], [0, 1]]
    assert cut_at_stop([4, 5, 2, 7, 2], stop_ids=[2]) == [4, 5, 2]
    assert cut_at_stop([4, 5], stop_ids=[2]) == [4, 5]


def test_dataset_source_uses_reference_completions(tiny_models):
    exs = examples(tiny_models[2])
    ro = dataset().rollout(exs, ctx_for(tiny_models))
    assert ro.writer == "dataset"
    for i, ex in enumerate(exs):
        n = len(ex.completion_ids)
        assert ro.completion_ids_BT[i, :n].tolist() == list(ex.completion_ids)
        assert ro.completion_mask_BT[i].sum() == n
    short = ctx_for(tiny_models, GenerationParams(max_new_tokens=1, temperature=0.0))
    assert dataset().rollout(exs, short).completion_mask_BT.sum(1).tolist() == [1] * len(exs)


def test_dataset_source_without_completion_names_the_row(tiny_models):
    with pytest.raises(DataError, match="mem:0.*completion"):
        dataset().rollout(examples(tiny_models[2], with_completion=False), ctx_for(tiny_models))


@pytest.mark.parametrize("source,which", [(teacher, 0), (student, 1)])
def test_model_sources_write_with_the_right_model(tiny_models, source, which):
    exs = examples(tiny_models[2])
    ctx = ctx_for(tiny_models)
    ro = source().rollout(exs, ctx)
    model = tiny_models[which]
    for i, ex in enumerate(exs):  # batched left-padded greedy == one prompt at a time
        ids = torch.tensor([ex.prompt_ids])
        ref = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=7,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=ctx.stop_ids,
        )[0, ids.shape[1] :].tolist()
        ref = cut_at_stop(ref, ctx.stop_ids)
        n = int(ro.completion_mask_BT[i].sum())
        assert ro.completion_ids_BT[i, :n].tolist() == ref


def test_generation_stops_at_stop_token(tiny_models):
    t, s, tok = tiny_models
    prompts = [ex.prompt_ids for ex in examples(tok)]
    free = ctx_for(tiny_models, stop_ids=(tok.pad_token_id,)).generate(s, prompts)
    assert all(len(c) == 7 for c in free)  # no stop: exactly max_new_tokens
    stop = free[0][2]
    comps = ctx_for(tiny_models, stop_ids=(stop,)).generate(s, prompts)
    assert comps[0] == free[0][:3]
    for c, f in zip(comps, free):
        assert c == f[: len(c)]
        assert stop not in c[:-1] and (c[-1] == stop or len(c) == 7)


def test_sampling_is_reproducible_from_rng_state(tiny_models):
    exs = examples(tiny_models[2])
    params = GenerationParams(max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9)
    ctx = ctx_for(tiny_models, params)
    torch.manual_seed(3)
    a = student().rollout(exs, ctx).input_ids_BL
    torch.manual_seed(3)
    b = student().rollout(exs, ctx).input_ids_BL
    torch.manual_seed(4)
    c = student().rollout(exs, ctx).input_ids_BL
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_mix_lambda_extremes_and_share(tiny_models):
    exs = examples(tiny_models[2])
    ctx = ctx_for(tiny_models)
    torch.manual_seed(0)
    assert all(mix(student=1.0).rollout(exs, ctx).writer == "student" for _ in range(5))
    assert all(mix(student=0.0).rollout(exs, ctx).writer == "dataset" for _ in range(5))
    assert all(
        mix(student=0.0, other="teacher").rollout(exs, ctx).writer == "teacher" for _ in range(3)
    )
    writers = [mix(student=0.5).rollout(exs, ctx).writer for _ in range(24)]
    assert 4 <= writers.count("student") <= 20 and set(writers) == {"student", "dataset"}


def test_mix_validates():
    with pytest.raises(ConfigError, match="lambda"):
        mix(student=1.5)
    with pytest.raises(ConfigError, match="other"):
        mix(other="web")
    assert mix(student=1.0).needs_completions is False
    assert mix(student=0.5).needs_completions is True
    assert mix(student=0.5, other="teacher").needs_teacher_model is True
