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
4·L·d·T² term, backward = 2 × forward, the loss's vocabulary work separate, no activation
recomputation, float32 (opd's CPU default) unless `model.dtype` says otherwise.

What `predict_step` adds to turn counts into seconds on one device: `--calibrate` measures
opd's own kernels at reference shapes (`opd.plan_device`) and the prediction scales them by
FLOP and element counts. Effective FLOP/s of a decoder forward, and of forward + backward,
at widths 128 and 512 (log-linear between), latencies (fixed + per layer) of a decode step,
a forward and a training step, and per-entry costs of vocabulary-wide work. The four
components match what `benchmarks/bench_plan.py` times inside a real step:

    generation   prefill (forward FLOPs / F_fwd(d)) + one decode step per token of the
                 longest completion: max(2·N·B / F_fwd(d), weights + KV cache bytes / W)
                 (memory-bound: every weight is read for one token per row)
                 + B·V·(e + e_d·d) (the lm_head, softmax and multinomial per vocabulary
                 entry) + decode latency(L)
    teacher      one forward of the teacher's decoder on B·(P + C) tokens / F_fwd(d_t)
                 (its lm_head is applied inside the loss, on completion rows only) + latency
    student      3 × forward FLOPs / F_train(d_s) (forward + backward of the decoder), the
                 AdamW update (a measured cost per parameter) + train latency(L)
    loss         opd's one-pass chunked divergence on B·C rows: B·C·V·(l + l_d·(3·d_s + d_t))
                 (both heads' projections, the student head's gradient and the elementwise
                 passes, per vocabulary entry) + a latency per chunk of `train.chunk_size` rows

Peak memory: both models' weights, the student's gradients and AdamW moments, the KV cache
of generation, the student's activations kept for the backward (≈ (10·d + 4·d_ff)·4 bytes
per token per layer) and `train.chunk_size` rows of logits (×4 tensors).

The staged budget split is the survey's "distillation tax" rule (section 8): 60–70 % of a
budget off-policy (here 65 %: supervised KD on dataset text, no generation), 20–30 %
on-policy (25 %: this recipe's step) and 10 % reward refinement (generation + the student's
forward/backward, no teacher); each stage's steps = its share of the seconds / its step time.

Deviations: attention is counted as dense matmuls; activation memory is an estimate, not
allocator-exact; the served teacher's time is predicted as if it ran on this device.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

STAGES = (("off-policy warm-up", 0.65), ("on-policy distillation", 0.25),
          ("reward refinement", 0.10))  # fmt: skip


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


@dataclass
class Device:
    """What the planner needs of a device (`opd plan --calibrate` measures it on opd's own
    kernels at reference shapes; `predict_step` scales them by FLOP and element counts)."""

    fwd_flops: float  # FLOP/s of a no-grad Llama decoder forward at width 512
    train_flops: float = 0.0  # FLOP/s of forward + backward at width 512 (0: fwd_flops)
    fwd_flops_narrow: float = 0.0  # the same two at width 128 (0: as at 512)
    train_flops_narrow: float = 0.0
    bandwidth: float = 1e10  # bytes/s of a large copy (read + write counted)
    adam_s: float = 0.0  # seconds per parameter of an AdamW step
    entry_s: float = 0.0  # decode: seconds per (row × vocabulary entry) at width 0 ...
    entry_width_s: float = 0.0  # ... plus this × width (the head's matmul, softmax, sampling)
    loss_entry_s: float = 0.0  # loss: seconds per (row × vocabulary entry) ...
    loss_width_s: float = 0.0  # ... plus this × (3·d_s + d_t)
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
        """Effective FLOP/s at `width`: log-linear between widths 128 and 512, clamped."""
        wide = (self.train_flops or self.fwd_flops) if train else self.fwd_flops
        narrow = (self.train_flops_narrow if train else self.fwd_flops_narrow) or wide
        x = min(max(math.log2(max(width, 1)), 7.0), 9.0)
        return math.exp(math.log(narrow) + (x - 7.0) / 2.0 * (math.log(wide) - math.log(narrow)))


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


def generation_seconds(s: Shape, w: Workload, dev: Device) -> float:
    """Prefill + the decode steps of model `s` for all B rows (sampling over V each step)."""
    B, P, C, d = w.batch, w.prompt_tokens, w.completion_tokens, s.hidden
    prefill = forward_flops(s, B, P) / dev.rate(d) + dev.forward_fixed_s
    prefill += dev.forward_layer_s * s.layers
    kv_bytes = 2 * s.layers * s.kv_dim * B * (P + C / 2) * w.bytes_per_param
    body = max(
        2 * s.body_params * B / dev.rate(d),
        (s.body_params * w.bytes_per_param + kv_bytes) / dev.bandwidth,
    )
    step = body + B * s.vocab * (dev.entry_s + dev.entry_width_s * d)
    step += dev.decode_fixed_s + dev.decode_layer_s * s.layers
    return prefill + (w.decode_steps or C) * step


def predict_step(student: Shape, teacher: Shape, w: Workload, dev: Device) -> dict:
    """Seconds per optimizer step, split into the four components (module docstring)."""
    rows, T = w.batch * w.completion_tokens, w.prompt_tokens + w.completion_tokens
    gen = w.student_writes * generation_seconds(student, w, dev)
    gen += w.teacher_writes * generation_seconds(teacher, w, dev)
    t_fwd = 0.0
    if w.teacher_scores:
        t_fwd = forward_flops(teacher, w.batch, T) / dev.rate(teacher.hidden)
        t_fwd += dev.forward_fixed_s + dev.forward_layer_s * teacher.layers
    s_fb = 3 * forward_flops(student, w.batch, T) / dev.rate(student.hidden, train=True)
    s_fb += student.total_params * dev.adam_s
    s_fb += dev.train_fixed_s + dev.train_layer_s * student.layers
    if w.full_vocab_loss and w.teacher_scores:
        per_entry = dev.loss_entry_s + dev.loss_width_s * (3 * student.hidden + teacher.hidden)
    else:  # the student's log-prob of the written token: its head and the gradient only
        per_entry = dev.loss_entry_s / 2 + dev.loss_width_s * 3 * student.hidden
    chunks = math.ceil(rows / max(w.chunk_size, 1))
    loss = rows * student.vocab * per_entry + chunks * dev.loss_chunk_s
    parts = {"generation": gen, "teacher": t_fwd, "student": s_fb, "loss": loss}
    return {**parts, "total": sum(parts.values())}


def peak_memory_bytes(student: Shape, teacher: Shape, w: Workload) -> dict:
    """Estimated peak bytes by part (module docstring)."""
    b = w.bytes_per_param
    B, T = w.batch, w.prompt_tokens + w.completion_tokens
    parts = {
        "teacher weights": teacher.total_params * b if w.teacher_scores or w.teacher_writes else 0,
        "student weights + grads + AdamW": student.total_params * (b + 4 + 8),
        "KV cache": 2 * student.layers * student.kv_dim * B * T * b,
        "activations": student.layers
        * B
        * T
        * (10 * student.hidden + 4 * student.intermediate)
        * 4,
        "logit chunks": 4 * min(w.chunk_size, B * w.completion_tokens) * student.vocab * 4,
    }
    return {**parts, "total": sum(parts.values())}


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
    """Eq. 35's terms for one step, in FLOPs (generation 2N per token, as the survey counts)."""
    tokens = w.batch * (w.prompt_tokens + w.completion_tokens)
    return {
        "generation": 2 * (w.student_writes * student.body_params
                           + w.teacher_writes * teacher.body_params) * tokens,
        "teacher": 2 * teacher.body_params * tokens if w.teacher_scores else 0.0,
        "student": 6 * student.body_params * tokens,
    }  # fmt: skip
