"""Run diagnostics at every held-out evaluation: where the student differs from the teacher.

Computed on the evaluation's held-out prompts, from the student's greedy completions (the ones
`opd.evaluate.heldout_kl` already wrote, reused) and the teacher's greedy completions of the
same prompts (computed once per prompt and cached: the teacher is frozen). With q the
student's next-token distribution and p the teacher's, at every completion token t:

    KL(q_student ‖ p_teacher)_t = Σ_v q(v) (log q(v) − log p(v))        "rkl"
    KL(p_teacher ‖ q_student)_t = Σ_v p(v) (log p(v) − log q(v))        "fkl"

Logged keys (all `diag_*`, token means over all completion tokens of all prompts):

    diag_rkl_own, diag_fkl_own          on the student's OWN greedy prefixes
    diag_rkl_teacher, diag_fkl_teacher  on TEACHER-written prefixes of the same prompts
    diag_exposure_gap_rkl / _fkl        own − teacher-written: > 0 means the student is
                                        further from the teacher in the states it reaches
                                        itself than in the teacher's (exposure bias)
    diag_topk_overlap                   |top-k(q) ∩ top-k(p)| / k on own prefixes (k = 10)
    diag_entropy                        H(q) = −Σ q log q in nats, own prefixes
    diag_length, diag_stop_rate         mean completion length (tokens); share of
                                        completions that ended with a stop token or before
                                        max_new_tokens
    diag_ece                            expected calibration error of the student on the
                                        teacher-written text, 10 equal-width bins of its
                                        top-1 probability: Σ_b (n_b / n) |acc_b − conf_b|,
                                        acc = "the student's argmax is the teacher's token"
    diag_calibration                    {"confidence", "accuracy", "count"} per bin (lists)
    diag_kl_by_position                 {"start": [...], "rkl": [...]}: diag_rkl_own per
                                        bucket of completion positions (8 buckets over
                                        max_new_tokens; null where a bucket has no token)
    diag_samples                        the first 3 prompts with both greedy completions
    diag_seconds                        the extra wall seconds these diagnostics took
    diag_note                           why some keys are null (only when some are)

Teachers without full logits (served, cached, top-k or black-box) cannot give p, so every
teacher-dependent key is null and only the student's own numbers (entropy, length, stop
rate) are logged; a teacher that cannot write text here (served, an ensemble, another
tokenizer) nulls the teacher-prefix keys. Diagnostics never stop a run: an unexpected error
nulls the keys and is logged as `diag_note`.

Deviation: greedy completions (the evaluation's), not samples, so the numbers are
deterministic; the exposure gap therefore compares greedy student states with greedy teacher
states.
"""

from __future__ import annotations

import math
import time
import weakref

import torch

from opd.models import decoder_and_head
from opd.sampling import make_rollout
from opd.teachers import FullLogits
from opd.teachers.base import as_teacher, teacher_model
from opd.types import completion_rows

TOP_K = 10
ECE_BINS = 10
POSITION_BUCKETS = 8
SAMPLE_COUNT = 3
KEYS = (
    "diag_rkl_own",
    "diag_fkl_own",
    "diag_rkl_teacher",
    "diag_fkl_teacher",
    "diag_exposure_gap_rkl",
    "diag_exposure_gap_fkl",
    "diag_topk_overlap",
    "diag_entropy",
    "diag_length",
    "diag_stop_rate",
    "diag_ece",
    "diag_calibration",
    "diag_kl_by_position",
    "diag_samples",
)


def run_diagnostics(run, completions) -> dict:
    """The `diag_*` keys for the eval row of `run` (an `opd.run_setup.Run`), given the
    student's greedy completions of `run.data.eval`; never raises."""
    m = run.models
    return eval_diagnostics(
        m.student,
        m.teacher,
        run.data.eval,
        completions,
        tokenizer=m.tokenizer,
        pad_id=m.pad_id,
        stop_ids=m.stop_ids,
        vocab_size=m.vocab_size,
        max_new_tokens=run.cfg.sampling.max_new_tokens,
        chunk_size=run.cfg.train.chunk_size,
        backend=run.cfg.sampling.backend,
    )


def eval_diagnostics(
    student,
    teacher,
    examples,
    completions,
    *,
    tokenizer,
    pad_id: int,
    stop_ids,
    vocab_size: int,
    max_new_tokens: int,
    chunk_size: int = 512,
    batch_size: int = 16,
    top_k: int = TOP_K,
    backend: str = "auto",
) -> dict:
    """All `diag_*` keys (see the module docstring); null where the teacher cannot give them."""
    t0 = time.perf_counter()
    out: dict = {k: None for k in KEYS}
    out.update(completion_stats(completions, stop_ids, max_new_tokens))
    notes = []
    try:
        scorer = _scorer(teacher)
        writer = _writer(teacher, student)
        if scorer is None:
            notes.append("teacher gives no full logits: teacher-dependent keys are null")
        if writer is None:
            notes.append("teacher cannot write text here: teacher-prefix keys are null")
        t_comps = _teacher_completions(writer, examples, pad_id, stop_ids, max_new_tokens, backend)
        args = (student, scorer, examples, pad_id, vocab_size, chunk_size, batch_size, top_k)
        own = _pass(*args, completions, max_new_tokens=max_new_tokens)
        out["diag_entropy"] = own["entropy"]
        if scorer is not None:
            out["diag_rkl_own"], out["diag_fkl_own"] = own["rkl"], own["fkl"]
            out["diag_topk_overlap"] = own["overlap"]
            out["diag_kl_by_position"] = own["by_position"]
        if scorer is not None and t_comps is not None:
            ref = _pass(*args, t_comps, max_new_tokens=max_new_tokens, calibrate=True)
            out["diag_rkl_teacher"], out["diag_fkl_teacher"] = ref["rkl"], ref["fkl"]
            out["diag_exposure_gap_rkl"] = _diff(own["rkl"], ref["rkl"])
            out["diag_exposure_gap_fkl"] = _diff(own["fkl"], ref["fkl"])
            out["diag_ece"], out["diag_calibration"] = ref["ece"], ref["calibration"]
        out["diag_samples"] = _samples(tokenizer, examples, completions, t_comps)
    except Exception as err:  # noqa: BLE001 - diagnostics must never stop a run
        notes.append(f"diagnostics failed: {type(err).__name__}: {str(err)[:200]}")
    if notes:
        out["diag_note"] = "; ".join(notes)
    out["diag_seconds"] = time.perf_counter() - t0
    return out


def completion_stats(completions, stop_ids, max_new_tokens: int) -> dict:
    """Mean completion length and the share of completions that stopped by themselves."""
    if not completions:
        return {"diag_length": None, "diag_stop_rate": None}
    stops = set(int(s) for s in stop_ids or ())
    stopped = [(len(c) > 0 and int(c[-1]) in stops) or len(c) < max_new_tokens for c in completions]
    return {
        "diag_length": sum(len(c) for c in completions) / len(completions),
        "diag_stop_rate": sum(stopped) / len(stopped),
    }


def expected_calibration_error(conf_N, correct_N, bins: int = ECE_BINS):
    """(ECE, per-bin table) of confidences in [0, 1] against 0/1 outcomes, equal-width bins
    (a confidence of exactly 1 goes into the last bin)."""
    conf_N, correct_N = conf_N.double(), correct_N.double()
    idx_N = (conf_N * bins).long().clamp(0, bins - 1)
    count = torch.bincount(idx_N, minlength=bins).double()
    conf_sum = torch.bincount(idx_N, weights=conf_N, minlength=bins)
    acc_sum = torch.bincount(idx_N, weights=correct_N, minlength=bins)
    n = max(float(count.sum()), 1.0)
    ece = float(((acc_sum - conf_sum).abs()).sum() / n)
    table = {
        "confidence": [float(c / k) if k else None for c, k in zip(conf_sum, count)],
        "accuracy": [float(a / k) if k else None for a, k in zip(acc_sum, count)],
        "count": [int(k) for k in count],
    }
    return ece, table


def _diff(a, b):
    return None if a is None or b is None else a - b


def _scorer(teacher):
    """A function rollout -> teacher log-probs rows (N, V), or None without full logits."""
    if teacher is None:
        return None
    t = as_teacher(teacher)
    if "full_logits" not in t.provides or teacher_model(teacher) is None:
        return None
    return lambda rollout, vocab_size: FullLogits().score(t, rollout, vocab_size)


def _writer(teacher, student):
    """The local teacher model that can write greedy text with the student's ids, or None."""
    model = teacher_model(teacher) if teacher is not None else None
    if model is None or not hasattr(model, "generate") or hasattr(model, "members"):
        return None
    return model


# teacher module -> {(prompt ids, max_new_tokens): completion ids} (the teacher is frozen)
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _teacher_completions(writer, examples, pad_id, stop_ids, max_new_tokens, backend):
    from opd.evaluate import greedy_completions

    if writer is None:
        return None
    cache = _CACHE.setdefault(writer, {})
    keys = [(tuple(ex.prompt_ids), max_new_tokens) for ex in examples]
    todo = [ex for ex, key in zip(examples, keys) if key not in cache]
    if todo:
        with torch.random.fork_rng(devices=[]):
            comps = greedy_completions(
                writer, todo, pad_id, stop_ids, max_new_tokens, backend=backend
            )
        for ex, comp in zip(todo, comps):
            cache[(tuple(ex.prompt_ids), max_new_tokens)] = list(comp)
    return [cache[key] for key in keys]


def _teacher_logprobs(ts, start: int, stop: int) -> torch.Tensor:
    """log p_teacher (n, V) of rows start:stop of `ts` (a mixture for an ensemble)."""
    if ts.members:
        parts = [
            torch.log(torch.tensor(w, dtype=torch.float32)) + _teacher_logprobs(mem, start, stop)
            for mem, w in zip(ts.members, ts.member_weights)
        ]
        return torch.logsumexp(torch.stack(parts), dim=0)
    h = ts.hidden_ND[start:stop].float()
    return torch.log_softmax(h @ ts.head_VD.float().T.to(h.device), dim=-1).cpu()


@torch.no_grad()
def _pass(
    student,
    scorer,
    examples,
    pad_id,
    vocab_size,
    chunk_size,
    batch_size,
    top_k,
    comps,
    *,
    max_new_tokens: int,
    calibrate: bool = False,
) -> dict:
    """Token-level statistics of `student` (and the teacher) on the prefixes `comps`."""
    s_dec, s_head, _ = decoder_and_head(student, verify=False)
    width = max(1, math.ceil(max_new_tokens / POSITION_BUCKETS))
    buckets = math.ceil(max_new_tokens / width)
    sums = {"rkl": 0.0, "fkl": 0.0, "entropy": 0.0, "overlap": 0.0}
    pos_sum, pos_n = torch.zeros(buckets, dtype=torch.float64), torch.zeros(buckets)
    confs, hits, count = [], [], 0
    was_training = student.training
    student.eval()
    try:
        for b0 in range(0, len(examples), batch_size):
            exs = examples[b0 : b0 + batch_size]
            ro = make_rollout(
                [e.prompt_ids for e in exs], comps[b0 : b0 + batch_size], pad_id, "diag"
            )
            if ro.num_tokens == 0:
                continue
            dev = s_head.device
            h_ND = completion_rows(s_dec(ro.input_ids_BL.to(dev), ro.attention_mask_BL.to(dev)), ro)
            ts = scorer(ro, vocab_size) if scorer is not None else None
            mask_BT = ro.completion_mask_BT.bool()
            pos_N = torch.nonzero(mask_BT)[:, 1]
            tokens_N = ro.input_ids_BL[:, ro.prompt_len :][mask_BT]
            for c0 in range(0, h_ND.shape[0], chunk_size):
                c1 = min(c0 + chunk_size, h_ND.shape[0])
                logq_nV = torch.log_softmax(h_ND[c0:c1].float() @ s_head[:vocab_size].float().T, -1)
                logq_nV = logq_nV.cpu()
                q_nV = logq_nV.exp()
                sums["entropy"] += float(-(q_nV * logq_nV).sum())
                if calibrate:
                    conf_n, pred_n = q_nV.max(dim=-1)
                    confs.append(conf_n)
                    hits.append((pred_n == tokens_N[c0:c1]).double())
                if ts is not None:
                    logp_nV = _teacher_logprobs(ts, c0, c1)[:, :vocab_size]
                    rkl_n = (q_nV * (logq_nV - logp_nV)).sum(-1)
                    sums["rkl"] += float(rkl_n.sum())
                    sums["fkl"] += float((logp_nV.exp() * (logp_nV - logq_nV)).sum())
                    k = min(top_k, vocab_size)
                    ids_s, ids_t = logq_nV.topk(k, -1).indices, logp_nV.topk(k, -1).indices
                    same = (ids_s[:, :, None] == ids_t[:, None, :]).any(-1).sum(-1)
                    sums["overlap"] += float(same.sum()) / k
                    b_n = (pos_N[c0:c1] // width).clamp(max=buckets - 1)
                    pos_sum.index_add_(0, b_n, rkl_n.double())
                    pos_n.index_add_(0, b_n, torch.ones_like(rkl_n))
            count += h_ND.shape[0]
    finally:
        student.train(was_training)
    n = max(count, 1)
    out = {k: (v / n if count else None) for k, v in sums.items()}
    out["by_position"] = {
        "start": [i * width for i in range(buckets)],
        "rkl": [float(s / c) if c else None for s, c in zip(pos_sum, pos_n)],
    }
    if calibrate and confs:
        out["ece"], out["calibration"] = expected_calibration_error(
            torch.cat(confs), torch.cat(hits)
        )
    else:
        out["ece"], out["calibration"] = None, None
    return out


def _samples(tokenizer, examples, completions, t_comps) -> list[dict]:
    rows = []
    for i, ex in enumerate(list(examples)[:SAMPLE_COUNT]):
        rows.append(
            {
                "prompt": ex.prompt_text,
                "student": tokenizer.decode(completions[i], skip_special_tokens=True),
                "teacher": None
                if t_comps is None
                else tokenizer.decode(t_comps[i], skip_special_tokens=True),
                "answer": ex.answer,
            }
        )
    return rows
