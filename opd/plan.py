"""`opd plan`: predict what a distillation run costs before running it.

The survey's compute model (its section 7.3; the PDF text lost the formula bodies, restated
here as this module reads them). For T training tokens,

    (34)  C_off = T · (F_fwd^S + F_bwd^S)                    (+ ρ · F_fwd^T for logit KD)
    (35)  C_on  = T · (G^S + ρ · F_fwd^T + F_fwd^S + F_bwd^S)
    (36)  max_α U(C)   subject to   (1 − α) · C_off + α · C_on ≤ C

F_fwd, F_bwd: forward and backward FLOPs per token (≈ 2N and 4N for N multiply-add
parameters); G^S: the student's autoregressive generation per token, which is memory-bound
(each decode step reads every weight and the KV cache for one token per row), so it costs
far more time than its 2N FLOPs suggest; ρ ∈ [0, 1]: how often the teacher scores (1 =
every token); α: the fraction of the budget processed on-policy. Assumptions: dense
decoder-only transformers, FLOPs 2N per token forward (Kaplan et al. 2020) plus attention's
4·L·d·T² term, backward = 2 × forward, no activation recomputation, float32 (opd's CPU
default) unless `model.dtype` says otherwise.

How `predict_step` turns the four terms of eq. 35 into seconds on one device: each is a FLOP
count over a calibrated matmul rate (`opd.plan_device` measures the rates on opd's own
kernels at reference shapes), plus the work a FLOP count misses, each term calibrated on
its own: latencies (fixed + per layer), per-entry elementwise costs over the vocabulary,
per-row sampling and a per-parameter update cost. R(d): the decoder's FLOP/s at width d
(forward, or forward + backward; log-linear between widths 128 and 512, clamped); H(d): the
FLOP/s of the vocabulary head's matmuls at width d (log-linear through widths 64, 256,
1024, clamped); W_dec: the weight bytes per second a decode step of a few rows streams
(calibrated: a few-row matmul reads its weights far below copy bandwidth); b: bytes per
parameter. Per optimizer step of B rows, P prompt and C completion tokens (N = B·C loss
rows, S decode steps = the longest completion):

    generation   prefill: F_fwd(B, P) / R_fwd(d) + forward latency(L)
                 + S × [ max(2·N_body·B / R_fwd(d), (N_body·b + KV bytes) / W_dec) the body
                         + max(2·B·V·d / H(d), V·d·b / W_dec)                    the lm_head
                         + B·V·s_e + B·s_r          softmax + one multinomial draw per row
                         + decode latency(L) ]
    teacher      F_fwd^T(B, P + C) / R_fwd(d_t) + forward latency(L_t)   (its lm_head runs
                 inside the loss, on completion rows only)
    student      3·F_fwd^S(B, P + C) / R_train(d_s) + N_params·u + train latency(L_s);
                 u: seconds per parameter of the update (embedding gradient, clipping,
                 AdamW), measured on a model whose parameters are mostly vocabulary rows
    loss         opd's one-pass chunked divergence (`opd.losses.one_pass`):
                 N·V · [2·(3·d_s / H(d_s) + d_t / H(d_t)) + e(chunk)] + chunks · latency
                 (FLOPs: the two heads' projections 2·N·V·(d_s + d_t), the student's
                 gradients dZ·W and dZᵀ·h 2 × 2·N·V·d_s; e(chunk): the softmax/KL/gradient
                 elementwise work per (row × entry), calibrated on a chunk that fits the
                 caches (256 × 128) and one that does not (256 × 49,152), log-linear in the
                 chunk's entries between); without a full-vocabulary divergence
                 (black-box: the written token's log-probability) the student's three
                 matmuls and half the elementwise work

Deviations from the survey's counting: generation is priced per decode step (a memory
bound and per-row sampling, not 2N per token), the loss's vocabulary work is a term of its
own (the survey folds it into F), and the update's per-parameter cost is added to F_bwd.
Attention is counted as dense matmuls; the served teacher's time is predicted as if it ran
on this device. Checked against component times measured inside real steps in
`benchmarks/results_plan.md` (one thread, CPU seconds): every component within ±30 % on the
speed benchmark's settings and the demo; the demo's come out 0.8–0.9 (the reference
shapes, width ≤ 512 and 2 layers, run a little more efficiently than its 15 and 30 layers).

Peak memory (`peak_memory_bytes`): held throughout, the models' weights, the student's AdamW
moments (2 × float32 per parameter) and 24 MiB of the runtime's own first-step allocations
(measured: what the speed benchmark's vocab-105 step grows by beyond the modelled terms);
on top, the largest of three phases: the loss phase (the activations autograd keeps for the
student's backward, ≈ (10·d + 4·d_ff)·4 bytes per token per layer; the teacher's
completion rows, N × d_t; the one-pass loss's buffers: its gradient of the head and the
head's .grad, 2 × V × d_s float32, the rows' N × d_s, and 7 chunk-sized float32 tensors,
logits, log-probabilities and their gradients, measured at 6.5 for reverse KL), the update
phase (gradients + AdamW's foreach temporaries, 2 × 4 bytes per parameter) and generation's
KV cache. Checked against the peak RSS growth after loading in `benchmarks/bench_plan.py
--memory`.

The staged budget split is the survey's "distillation tax" rule (section 8): 60–70 % of a
budget off-policy (here 65 %: supervised KD on dataset text, no generation), 20–30 %
on-policy (25 %: this recipe's step) and 10 % reward refinement (generation + the student's
forward/backward, no teacher); each stage's steps = its share of the seconds / its step time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

STAGES = (("off-policy warm-up", 0.65), ("on-policy distillation", 0.25),
          ("reward refinement", 0.10))  # fmt: skip
HEAD_WIDTHS = (64, 256, 1024)  # widths at which the head matmuls' FLOP/s are calibrated
SMALL_CHUNK, LARGE_CHUNK = 256 * 128, 256 * 49152  # loss chunks (entries) of e_small, e_large
LOSS_CHUNK_TENSORS = 7  # chunk-sized float32 tensors alive at the loss's peak (measured: 6.5)
RUNTIME_BYTES = 24 * 2**20  # a step's allocations no term models (measured on torch CPU)


@dataclass
class Shape:
    """A dense decoder: width, depth, MLP width, output rows, attention heads, tied head."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int = 1
    kv_heads: int = 1
    tied: bool = False

    @property
    def kv_dim(self) -> int:
        return self.hidden * self.kv_heads // max(self.heads, 1)

    @property
    def body_params(self) -> int:
        """Multiply-add parameters of the decoder layers (embeddings and head excluded)."""
        d = self.hidden
        attn = 2 * d * d + 2 * d * self.kv_dim
        return self.layers * (attn + 3 * d * self.intermediate)

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        """All parameters (the input embedding once more unless tied)."""
        return self.body_params + self.head_params * (1 if self.tied else 2)


def _loglinear(x: float, xs, ys) -> float:
    """Piecewise log-log interpolation of ys over xs (increasing), clamped at both ends."""
    if x <= xs[0]:
        return ys[0]
    for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]):
        if x <= x1:
            f = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return math.exp(math.log(y0) + f * (math.log(y1) - math.log(y0)))
    return ys[-1]


@dataclass
class Device:
    """What the planner needs of a device (`opd plan --calibrate` measures it on opd's own
    kernels at reference shapes; `predict_step` scales them by FLOP and element counts)."""

    fwd_flops: float  # FLOP/s of a no-grad Llama decoder forward at width 512
    train_flops: float = 0.0  # FLOP/s of forward + backward at width 512 (0: fwd_flops)
    fwd_flops_narrow: float = 0.0  # the same two at width 128 (0: as at 512)
    train_flops_narrow: float = 0.0
    bandwidth: float = 1e10  # bytes/s of a large copy (read + write counted)
    decode_bandwidth: float = 0.0  # weight bytes/s a few-row decode step reads (0: bandwidth)
    head_flops: list = field(default_factory=list)  # FLOP/s of head matmuls at HEAD_WIDTHS
    update_s: float = 0.0  # seconds per parameter: embedding grad, clipping, AdamW
    sample_entry_s: float = 0.0  # decode: softmax + multinomial per (row × vocabulary entry)
    sample_row_s: float = 0.0  # decode: per row and step (its own generator's draw)
    loss_entry_s: float = 0.0  # loss elementwise per (row × entry), chunk of LARGE_CHUNK
    loss_entry_small_s: float = 0.0  # the same on a chunk of SMALL_CHUNK
    loss_chunk_s: float = 0.0  # latency of one chunk of the one-pass loss (fwd + bwd)
    decode_fixed_s: float = 0.0  # latency of one decode step: fixed + per layer
    decode_layer_s: float = 0.0
    forward_fixed_s: float = 0.0  # latency of one no-grad forward: fixed + per layer
    forward_layer_s: float = 0.0
    train_fixed_s: float = 0.0  # latency of forward + backward + AdamW: fixed + per layer
    train_layer_s: float = 0.0
    threads: int = 0
    name: str = "given"

    def rate(self, width: int, train: bool = False) -> float:
        """R(d): effective FLOP/s at `width`, log-linear between widths 128 and 512."""
        wide = (self.train_flops or self.fwd_flops) if train else self.fwd_flops
        narrow = (self.train_flops_narrow if train else self.fwd_flops_narrow) or wide
        return _loglinear(max(width, 1), (128, 512), (narrow, wide))

    def head_rate(self, width: int) -> float:
        """H(d): FLOP/s of the vocabulary head's matmuls at `width` (R_fwd if uncalibrated)."""
        if len(self.head_flops) != len(HEAD_WIDTHS):
            return self.rate(width)
        return _loglinear(max(width, 1), HEAD_WIDTHS, self.head_flops)

    def loss_entry(self, chunk_entries: float) -> float:
        """e(chunk): elementwise loss seconds per (row × entry) for a chunk of that size,
        linear in log(entries) between SMALL_CHUNK and LARGE_CHUNK, clamped."""
        small = self.loss_entry_small_s
        x = min(max(math.log(max(chunk_entries, 1)), math.log(SMALL_CHUNK)), math.log(LARGE_CHUNK))
        f = (x - math.log(SMALL_CHUNK)) / (math.log(LARGE_CHUNK) - math.log(SMALL_CHUNK))
        return self.loss_entry_s if f >= 1.0 else small + f * (self.loss_entry_s - small)


@dataclass
class Workload:
    """One optimizer step: B prompts of P tokens, C completion tokens each."""

    batch: int
    prompt_tokens: float
    completion_tokens: float
    student_writes: float = 1.0  # share of completions the student generates
    teacher_writes: float = 0.0  # share the teacher generates (seqKD, mixtures)
    teacher_scores: bool = True  # a forward of the teacher on every token (ρ = 1)
    full_vocab_loss: bool = True  # a divergence over the whole vocabulary
    chunk_size: int = 256
    bytes_per_param: int = 4
    decode_steps: float = 0.0  # decode steps per batch (the longest completion; 0: C)


def _attention_flops(s: Shape, batch: float, tokens: float) -> float:
    return 4 * s.layers * s.hidden * batch * tokens * tokens


def forward_flops(s: Shape, batch: float, tokens: float) -> float:
    """2·N_body per token plus attention's 4·L·d·T² (the lm_head is not included)."""
    return 2 * s.body_params * batch * tokens + _attention_flops(s, batch, tokens)


def loss_flops(student: Shape, teacher: Shape, rows: float, full_vocab: bool = True) -> dict:
    """The one-pass loss's head matmul FLOPs by width: {d_s: 2·N·V·3·d_s, d_t: 2·N·V·d_t}
    (student projection, dZ·W, dZᵀ·h; the teacher's projection). Without a full-vocabulary
    divergence only the student's three."""
    out = {student.hidden: 2.0 * rows * student.vocab * 3 * student.hidden}
    if full_vocab:
        out[teacher.hidden] = out.get(teacher.hidden, 0.0) + (
            2.0 * rows * student.vocab * teacher.hidden
        )
    return out


def loss_seconds(student: Shape, teacher: Shape, w: Workload, dev: Device) -> float:
    rows = w.batch * w.completion_tokens
    matmul = sum(f / dev.head_rate(d) for d, f in
                 loss_flops(student, teacher, rows, w.full_vocab_loss).items())  # fmt: skip
    chunk = min(w.chunk_size, max(rows, 1)) * student.vocab
    elementwise = rows * student.vocab * dev.loss_entry(chunk)
    if not w.full_vocab_loss:  # one model's log-softmax instead of two and their divergence
        elementwise /= 2
    return matmul + elementwise + math.ceil(rows / max(w.chunk_size, 1)) * dev.loss_chunk_s


def decode_step_seconds(s: Shape, w: Workload, dev: Device) -> float:
    """One decode step of model `s` for all B rows: body, lm_head, sampling, latency."""
    B, d, b = w.batch, s.hidden, w.bytes_per_param
    kv_bytes = 2 * s.layers * s.kv_dim * B * (w.prompt_tokens + w.completion_tokens / 2) * b
    read = dev.decode_bandwidth or dev.bandwidth
    body = max(2 * s.body_params * B / dev.rate(d), (s.body_params * b + kv_bytes) / read)
    head = max(2 * B * s.vocab * d / dev.head_rate(d), s.vocab * d * b / read)
    sample = B * s.vocab * dev.sample_entry_s + B * dev.sample_row_s
    return body + head + sample + dev.decode_fixed_s + dev.decode_layer_s * s.layers


def generation_seconds(s: Shape, w: Workload, dev: Device) -> float:
    """Prefill + the decode steps of model `s` for all B rows (sampling over V each step)."""
    prefill = forward_flops(s, w.batch, w.prompt_tokens) / dev.rate(s.hidden)
    prefill += dev.forward_fixed_s + dev.forward_layer_s * s.layers
    return prefill + (w.decode_steps or w.completion_tokens) * decode_step_seconds(s, w, dev)


def predict_step(student: Shape, teacher: Shape, w: Workload, dev: Device) -> dict:
    """Seconds per optimizer step, split into the four components (module docstring)."""
    T = w.prompt_tokens + w.completion_tokens
    gen = w.student_writes * generation_seconds(student, w, dev)
    gen += w.teacher_writes * generation_seconds(teacher, w, dev)
    t_fwd = 0.0
    if w.teacher_scores:
        t_fwd = forward_flops(teacher, w.batch, T) / dev.rate(teacher.hidden)
        t_fwd += dev.forward_fixed_s + dev.forward_layer_s * teacher.layers
    s_fb = 3 * forward_flops(student, w.batch, T) / dev.rate(student.hidden, train=True)
    s_fb += student.total_params * dev.update_s
    s_fb += dev.train_fixed_s + dev.train_layer_s * student.layers
    loss = loss_seconds(student, teacher, w, dev)
    parts = {"generation": gen, "teacher": t_fwd, "student": s_fb, "loss": loss}
    return {**parts, "total": sum(parts.values())}


def peak_memory_bytes(student: Shape, teacher: Shape, w: Workload) -> dict:
    """Estimated peak bytes by part (module docstring): weights, AdamW moments and the
    runtime's own allocations held throughout, plus the largest of the loss phase
    (activations, loss buffers), the update phase and generation's KV cache."""
    b, B, T = w.bytes_per_param, w.batch, w.prompt_tokens + w.completion_tokens
    rows, P_s = B * w.completion_tokens, student.total_params
    uses_teacher = w.teacher_scores or w.teacher_writes
    loss_phase = {
        "activations": student.layers * B * T * (10 * student.hidden + 4 * student.intermediate)
        * 4,
        "teacher rows": rows * teacher.hidden * 4 if w.teacher_scores else 0.0,
        "loss buffers": (2 * student.vocab + rows) * student.hidden * 4
        + LOSS_CHUNK_TENSORS * min(w.chunk_size, rows) * student.vocab * 4,
    }  # fmt: skip
    update_phase = {"gradients": P_s * 4, "AdamW temporaries": P_s * 4}
    kv = 2 * student.layers * student.kv_dim * B * T * b
    held = {
        "teacher weights": teacher.total_params * b if uses_teacher else 0.0,
        "student weights": P_s * b,
        "AdamW moments": P_s * 8,
        "runtime": RUNTIME_BYTES,
    }
    peak = sum(held.values()) + max(sum(loss_phase.values()), sum(update_phase.values()), kv)
    weights = held["teacher weights"] + held["student weights"]
    parts = {**held, **loss_phase, **update_phase, "KV cache": kv}
    return {**parts, "total": peak, "after loading": peak - weights}


def staged_split(budget_s: float, on_policy: dict, off_policy: dict, reward: dict) -> list:
    """[(stage, share, seconds, steps)] of the survey's 65 / 25 / 10 % rule."""
    costs = (off_policy["total"], on_policy["total"], reward["total"])
    return [
        (name, share, share * budget_s, int(share * budget_s // max(cost, 1e-12)))
        for (name, share), cost in zip(STAGES, costs)
    ]


def variants(student: Shape, teacher: Shape, w: Workload, dev: Device) -> dict:
    """The step of each stage: this workload (on-policy), supervised KD, reward refinement."""
    off = Workload(**{**asdict(w), "student_writes": 0.0, "teacher_writes": 0.0})
    rl = Workload(**{**asdict(w), "student_writes": 1.0, "teacher_writes": 0.0,
                     "teacher_scores": False, "full_vocab_loss": False})  # fmt: skip
    return {
        "on_policy": predict_step(student, teacher, w, dev),
        "off_policy": predict_step(student, teacher, off, dev),
        "reward": predict_step(student, teacher, rl, dev),
    }


def step_flops(student: Shape, teacher: Shape, w: Workload) -> dict:
    """Eq. 35's terms for one step, in FLOPs (generation 2N per token, as the survey counts),
    and the loss's head matmuls (`loss_flops`)."""
    tokens = w.batch * (w.prompt_tokens + w.completion_tokens)
    rows = w.batch * w.completion_tokens
    return {
        "generation": 2 * (w.student_writes * student.body_params
                           + w.teacher_writes * teacher.body_params) * tokens,
        "teacher": 2 * teacher.body_params * tokens if w.teacher_scores else 0.0,
        "student": 6 * student.body_params * tokens,
        "loss": sum(loss_flops(student, teacher, rows, w.full_vocab_loss).values()),
    }  # fmt: skip
