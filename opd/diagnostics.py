"""Run diagnostics at every held-out evaluation: where the student differs from the teacher.

Computed on the evaluation's held-out prompts, from the student's greedy completions and the
forward passes `opd.evaluate.heldout_kl` already made on them (reused through its `on_batch`
hook: the own-prefix numbers cost no extra forward), and the teacher's greedy completions of
the same prompts with the teacher's scores on them (computed once and cached: the teacher is
frozen), so an evaluation adds one student forward on the teacher-written text and the
vocabulary-wide statistics. With q the
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


class EvalDiagnostics:
    """Collects the diagnostics of one evaluation: `own_batch` is `heldout_kl`'s `on_batch`
    hook (the student's rows and the teacher's scores on the student's own prefixes),
    `finish(completions)` adds the teacher-prefix pass and returns the `diag_*` keys."""

    def __init__(self, student, teacher, examples, *, tokenizer, pad_id, stop_ids, vocab_size,
                 max_new_tokens, chunk_size=512, batch_size=16, top_k=TOP_K, backend="auto"):  # fmt: skip
        self.student, self.teacher, self.examples = student, teacher, list(examples)
        self.tokenizer, self.pad_id, self.stop_ids = tokenizer, pad_id, stop_ids
        self.vocab_size, self.max_new_tokens = vocab_size, max_new_tokens
        self.chunk_size, self.batch_size, self.backend = chunk_size, batch_size, backend
        self.own = _Stats(max_new_tokens, top_k)
        self.seconds, self.notes = 0.0, []

    @classmethod
    def for_run(cls, run) -> EvalDiagnostics:
        m = run.models
        return cls(m.student, m.teacher, run.data.eval, tokenizer=m.tokenizer, pad_id=m.pad_id,
                   stop_ids=m.stop_ids, vocab_size=m.vocab_size,
                   max_new_tokens=run.cfg.sampling.max_new_tokens,
                   chunk_size=run.cfg.train.chunk_size, backend=run.cfg.sampling.backend)  # fmt: skip

    @torch.no_grad()
    def own_batch(self, rows, tscores, rollout) -> None:
        """Statistics of one batch of the student's own prefixes (never raises)."""
        t0 = time.perf_counter()
        try:
            ts = tscores if tscores is not None and tscores.has_full_logits else None
            self.own.add(rows.hidden_ND, rows.head_VD, ts, rollout, self.chunk_size)
        except Exception as err:  # noqa: BLE001 - diagnostics must never stop a run
            self.notes.append(f"own-prefix statistics failed: {type(err).__name__}: {err}"[:240])
        self.seconds += time.perf_counter() - t0

    @torch.no_grad()
    def finish(self, completions) -> dict:
        t0 = time.perf_counter()
        out: dict = {k: None for k in KEYS}
        out.update(completion_stats(completions, self.stop_ids, self.max_new_tokens))
        notes = self.notes
        try:
            out.update(self._prefix_keys(completions, notes))
        except Exception as err:  # noqa: BLE001 - diagnostics must never stop a run
            notes.append(f"diagnostics failed: {type(err).__name__}: {str(err)[:200]}")
        if notes:
            out["diag_note"] = "; ".join(notes)
        out["diag_seconds"] = self.seconds + time.perf_counter() - t0
        return out

    def _prefix_keys(self, completions, notes) -> dict:
        scorer, writer = _scorer(self.teacher), _writer(self.teacher, self.student)
        if scorer is None:
            notes.append("teacher gives no full logits: teacher-dependent keys are null")
        if writer is None:
            notes.append("teacher cannot write text here: teacher-prefix keys are null")
        if self.own.count == 0:  # heldout_kl scored nothing (a text-only teacher): student only
            self._student_pass(completions, scorer, self.own)
        own, out = self.own.result(), {"diag_entropy": self.own.mean("entropy")}
        if scorer is not None:
            out.update(diag_rkl_own=own["rkl"], diag_fkl_own=own["fkl"],
                       diag_topk_overlap=own["overlap"], diag_kl_by_position=own["by_position"])  # fmt: skip
        t_comps = _teacher_completions(writer, self.examples, self.pad_id, self.stop_ids,
                                       self.max_new_tokens, self.backend)  # fmt: skip
        if scorer is not None and t_comps is not None:
            ref = _Stats(self.max_new_tokens, self.own.top_k, calibrate=True)
            self._student_pass(t_comps, _cached(scorer, writer, self.student), ref)
            ref = ref.result()
            out.update(diag_rkl_teacher=ref["rkl"], diag_fkl_teacher=ref["fkl"],
                       diag_exposure_gap_rkl=_diff(own["rkl"], ref["rkl"]),
                       diag_exposure_gap_fkl=_diff(own["fkl"], ref["fkl"]),
                       diag_ece=ref["ece"], diag_calibration=ref["calibration"])  # fmt: skip
        out["diag_samples"] = _samples(self.tokenizer, self.examples, completions, t_comps)
        return out

    @torch.no_grad()
    def _student_pass(self, comps, scorer, stats) -> None:
        """The student's forward (and the teacher's scores) on prefixes `comps`."""
        s_dec, s_head, _ = decoder_and_head(self.student, verify=False)
        was_training = self.student.training
        self.student.eval()
        try:
            for b0 in range(0, len(self.examples), self.batch_size):
                exs = self.examples[b0 : b0 + self.batch_size]
                ro = make_rollout([e.prompt_ids for e in exs], comps[b0 : b0 + self.batch_size],
                                  self.pad_id, "diag")  # fmt: skip
                if ro.num_tokens == 0:
                    continue
                dev = s_head.device
                h_ND = completion_rows(
                    s_dec(ro.input_ids_BL.to(dev), ro.attention_mask_BL.to(dev)), ro
                )
                ts = scorer(ro, self.vocab_size) if scorer is not None else None
                stats.add(h_ND, s_head[: self.vocab_size], ts, ro, self.chunk_size)
        finally:
            self.student.train(was_training)


def eval_diagnostics(student, teacher, examples, completions, **kw) -> dict:
    """All `diag_*` keys without `heldout_kl`'s passes (tests, other callers): the own-prefix
    forward passes are made here. `kw`: as `EvalDiagnostics`."""
    diag = EvalDiagnostics(student, teacher, examples, **kw)
    t0 = time.perf_counter()
    diag._student_pass(completions, _scorer(teacher), diag.own)
    diag.seconds += time.perf_counter() - t0
    return diag.finish(completions)


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
    """A function (rollout, vocab_size) -> TeacherScores, or None without full logits."""
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


# teacher module -> {key: completion ids or TeacherScores} (the teacher is frozen)
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _frozen(writer, student) -> bool:
    return writer is not student and not any(p.requires_grad for p in writer.parameters())


def _cached(scorer, writer, student):
    """`scorer` whose results on the (fixed) teacher-written rollouts are kept per teacher."""
    if not _frozen(writer, student):
        return scorer
    cache = _CACHE.setdefault(writer, {})

    def scored(rollout, vocab_size):
        key = (
            "scores",
            rollout.input_ids_BL.numpy().tobytes(),
            rollout.input_ids_BL.shape,
            vocab_size,
        )
        if key not in cache:
            cache[key] = scorer(rollout, vocab_size)
        return cache[key]

    return scored


def _teacher_completions(writer, examples, pad_id, stop_ids, max_new_tokens, backend):
    from opd.evaluate import greedy_completions

    if writer is None:
        return None
    cache = _CACHE.setdefault(writer, {}) if _frozen(writer, None) else {}
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


class _Stats:
    """Token sums over batches of prefixes: KL both ways, entropy, top-k overlap, KL by
    position, and (with `calibrate`) the student's top-1 confidence vs the written token."""

    def __init__(self, max_new_tokens: int, top_k: int, calibrate: bool = False):
        self.top_k, self.calibrate = top_k, calibrate
        self.width = max(1, math.ceil(max_new_tokens / POSITION_BUCKETS))
        self.buckets = math.ceil(max_new_tokens / self.width)
        self.sums = {"rkl": 0.0, "fkl": 0.0, "entropy": 0.0, "overlap": 0.0}
        self.pos_sum = torch.zeros(self.buckets, dtype=torch.float64)
        self.pos_n = torch.zeros(self.buckets, dtype=torch.float64)
        self.confs, self.hits, self.count, self.scored = [], [], 0, 0

    def add(self, h_ND, head_VD, ts, rollout, chunk_size: int) -> None:
        mask_BT = rollout.completion_mask_BT.bool()
        pos_N = torch.nonzero(mask_BT)[:, 1]
        tokens_N = rollout.input_ids_BL[:, rollout.prompt_len :][mask_BT]
        V = head_VD.shape[0]
        for c0 in range(0, h_ND.shape[0], chunk_size):
            c1 = min(c0 + chunk_size, h_ND.shape[0])
            logq_nV = torch.log_softmax(h_ND[c0:c1].float() @ head_VD.float().T, -1).cpu()
            q_nV = logq_nV.exp()
            self.sums["entropy"] += float(-(q_nV * logq_nV).sum())
            if self.calibrate:
                conf_n, pred_n = q_nV.max(dim=-1)
                self.confs.append(conf_n)
                self.hits.append((pred_n == tokens_N[c0:c1]).double())
            if ts is None:
                continue
            logp_nV = _teacher_logprobs(ts, c0, c1)[:, :V]
            rkl_n = (q_nV * (logq_nV - logp_nV)).sum(-1)
            self.sums["rkl"] += float(rkl_n.sum())
            self.sums["fkl"] += float((logp_nV.exp() * (logp_nV - logq_nV)).sum())
            k = min(self.top_k, V)
            ids_s, ids_t = logq_nV.topk(k, -1).indices, logp_nV.topk(k, -1).indices
            self.sums["overlap"] += (
                float((ids_s[:, :, None] == ids_t[:, None, :]).any(-1).sum()) / k
            )
            b_n = (pos_N[c0:c1] // self.width).clamp(max=self.buckets - 1)
            self.pos_sum.index_add_(0, b_n, rkl_n.double())
            self.pos_n.index_add_(0, b_n, torch.ones_like(rkl_n, dtype=torch.float64))
            self.scored += c1 - c0
        self.count += h_ND.shape[0]

    def mean(self, key: str):
        n = self.count if key == "entropy" else self.scored
        return self.sums[key] / n if n else None

    def result(self) -> dict:
        out = {k: self.mean(k) for k in self.sums}
        out["by_position"] = {
            "start": [i * self.width for i in range(self.buckets)],
            "rkl": [float(s / c) if c else None for s, c in zip(self.pos_sum, self.pos_n)],
        } if self.scored else None  # fmt: skip
        out["ece"], out["calibration"] = (
            expected_calibration_error(torch.cat(self.confs), torch.cat(self.hits))
            if self.calibrate and self.confs else (None, None)
        )  # fmt: skip
        return out


def _samples(tokenizer, examples, completions, t_comps) -> list[dict]:
    rows = []
    for i, ex in enumerate(list(examples)[:SAMPLE_COUNT]):
        teacher = (
            None if t_comps is None else tokenizer.decode(t_comps[i], skip_special_tokens=True)
        )
        student = tokenizer.decode(completions[i], skip_special_tokens=True)
        rows.append({"prompt": ex.prompt_text, "student": student, "teacher": teacher,
                     "answer": ex.answer})  # fmt: skip
    return rows
