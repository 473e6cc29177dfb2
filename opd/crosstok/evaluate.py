"""Held-out measurement for a teacher with another tokenizer: teacher NLL per byte.

Full-vocabulary KL(q_student ‖ p_teacher) needs one vocabulary, so a cross-tokenizer run
measures instead, on greedy student completions of the held-out prompts,

    teacher_nll_per_byte = −Σ_u log p_teacher(u | prompt_T, u_<) / Σ_u |bytes(u)|

over the teacher's tokenisation u of each completion (end-of-turn included in the sum, it
has no bytes). It is the teacher's code length of the student's text: lower means the
student writes what the teacher would. Logged as `heldout_teacher_nll_per_byte` in the eval
rows of metrics.jsonl (`heldout_kl` is then null).
"""

from __future__ import annotations

import torch

from opd.crosstok.access import CrossTokenizerLogprobs
from opd.crosstok.bytes import TokenBytes
from opd.evaluate import _score, generic_verify, greedy_completions
from opd.sampling.sources import make_rollout
from opd.teachers.sampled import SampledLogprobs


@torch.no_grad()
def teacher_nll_per_byte(
    models,
    examples,
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    chunk_size: int = 512,
    completions=None,
) -> dict:
    """Teacher NLL per byte of greedy student completions (see the module docstring).

    Args:
      models: `opd.build.Models` (teacher_tokenizer None = the student's tokenizer).
      examples: held-out `opd.data.Example`s.
      completions: the student's completions (token lists); default: greedy ones.

    Returns:
      {"nll_per_byte": float, "bytes": int, "mean_length": float, "completions": list}
    """
    comps = completions
    if comps is None:
        comps = greedy_completions(
            models.student, examples, models.pad_id, models.stop_ids, max_new_tokens, batch_size
        )
    access = CrossTokenizerLogprobs(chunk_size)
    access.prepare(models)
    t_tok = models.teacher_tokenizer or models.tokenizer
    t_bytes = TokenBytes(t_tok)
    nll, n_bytes = 0.0, 0
    for start in range(0, len(examples), batch_size):
        exs = examples[start : start + batch_size]
        ro = make_rollout(
            [e.prompt_ids for e in exs],
            comps[start : start + batch_size],
            models.pad_id,
            "student",
            raw_prompts=[e.raw_prompt for e in exs],
        )
        if models.teacher_tokenizer is not None:
            ro, _ = access.teacher_rollout(ro)
        if ro.num_tokens == 0:
            continue
        vocab = access._state.get("teacher_vocab", models.vocab_size)
        logp_M = SampledLogprobs(chunk_size).score(models.teacher, ro, vocab).token_logprobs_N
        nll -= float(logp_M.double().sum())
        mask_BT = ro.completion_mask_BT.bool()
        n_bytes += sum(len(t_bytes.of(t) or b"") for t in ro.completion_ids_BT[mask_BT].tolist())
    lengths = [len(c) for c in comps]
    return {
        "nll_per_byte": nll / max(n_bytes, 1),
        "bytes": n_bytes,
        "mean_length": sum(lengths) / max(len(lengths), 1),
        "completions": comps,
    }


def eval_row(run, step: int) -> dict:
    """The eval row of a cross-tokenizer run (`opd.train.run_eval` writes it)."""
    m = run.models
    res = teacher_nll_per_byte(
        m,
        run.data.eval,
        max_new_tokens=run.cfg.sampling.max_new_tokens,
        chunk_size=run.cfg.train.chunk_size,
    )
    scored = _score(m.tokenizer, run.data.eval, res["completions"], run.verify or generic_verify)
    return {
        "event": "eval",
        "step": step,
        "heldout_kl": None,
        "heldout_teacher_nll_per_byte": res["nll_per_byte"],
        "heldout_accuracy": scored["accuracy"],
        "heldout_length": res["mean_length"],
    }


def print_eval(models, data, cfg) -> int:
    """`opd eval` for a pair of different tokenizers: print the teacher NLL per byte."""
    res = teacher_nll_per_byte(models, data.eval, max_new_tokens=cfg.sampling.max_new_tokens)
    print(f"teacher NLL per byte of the student's greedy outputs: {res['nll_per_byte']:.4f}")
    return 0
