"""One optimizer step of the training loop.

    for each of the step's `grad_accum` micro-batches:          (all rolled out first)
        examples ─► method.prefixes.rollout ─► completions
    C = counted tokens (token mean) or sequences (sequence mean) over ALL micro-batches
    for each micro-batch:
        method.teacher.score (no grad) ─► TeacherScores             (finite check)
        student decoder (grad) ─► completion rows (N, D_s)
        values_N = method.signal(student rows, teacher scores)      per-token, never reduced
        w_N      = Π method.weights(...) · sampler token weights
        loss_m   = reduce(w_N · values_N, count=C)                  (finite check) ; backward
    loss = Σ_m loss_m  (the reduction of one batch holding every micro-batch); clip; the
    gradient norm must be finite before AdamW steps; warm-up + cosine schedule.

Every part is called with the run's one `opd.context.StepContext` (`run.ctx`): its `step` is
set here before the rollouts, its `rollout` (and an empty `metrics`) before each micro-batch
is scored. The step row holds the loop's numbers plus, averaged over the micro-batches, the
prefix sources' `rollout.info` and the numbers the signal and weights reported with
`ctx.log` (`opd.parts.LogsMetrics`).

Normalisation under gradient accumulation is the global token mean over the optimizer step
(or, for sequence-mean methods, the mean over all the step's sequences), so `grad_accum=2`
with batch B equals `grad_accum=1` with batch 2B in loss and gradient.

When the signal is a full-vocabulary divergence and the method has no token weights, each
token's coefficient is known before the values in closed form (`opd.losses.reduce
.coefficients`: m/C for the token mean, 1/(L_b·S) per sequence for the sequence mean), so
`one_pass_loss` computes Σ c_n · D_n with its gradient taken in the forward pass (no logits
recomputed in the backward); it equals the general path in value and gradient.

Data-parallel (`opd.distributed`): each process rolls out its rows of the global
micro-batch, C is summed over processes (one all_reduce), each process's backward is scaled
by the process count (DDP averages), and the row's numbers are combined over processes.
Under `train.fsdp` (opd.fsdp) `micro_step` runs inside the sharded root module's forward
(`dist.loss_step`) and the gradient norm is that of the full (gathered) gradient.

Non-finite numbers stop the run (`NonFiniteError`, an `OpdError`: the CLI exits 2) at the
step where they appear, before the optimizer touches the student: the teacher's scores, each
micro-batch's loss and the gradient norm are checked; sampling that fails on NaN/inf
probabilities is reported the same way.
"""

from __future__ import annotations

import math
import re
import time

import torch

from opd.distributed import SINGLE, combine, shard_rows
from opd.errors import OpdError
from opd.fsdp import full
from opd.losses import chunked_token_logprobs
from opd.losses.reduce import coefficients, reduce, step_count
from opd.models import decoder_and_head
from opd.parts import OnePassSignal, ReverseKLSignal
from opd.pipeline import step_batch
from opd.precision import autocast, autocast_rows, like_rows, mode
from opd.sampling.rows import row_seeds
from opd.signals import Divergence
from opd.types import StudentRows, completion_rows

REVERSE_KL = Divergence("reverse_kl")


class NonFiniteError(OpdError):
    """A loss, teacher output or gradient became NaN or infinite; the run stops there."""


def _finite(t) -> bool:
    return t is None or bool(torch.isfinite(t).all())


def teacher_scores_finite(tscores) -> bool:
    """Finite check on what the teacher already returned (hidden rows, log-probs)."""
    parts = [tscores.hidden_ND, tscores.topk_logprobs_NK, tscores.token_logprobs_N]
    parts += [m.hidden_ND for m in tscores.members]
    return all(_finite(p) for p in parts)


def likely_causes(models, lr: float | None = None) -> str:
    dtype = next(models.student.parameters()).dtype
    causes = ["a non-finite teacher output or weights (NaN/inf)"]
    if dtype == torch.float16:
        causes.insert(0, "overflow in float16 (use model.dtype=bfloat16 or float32)")
    lr_text = f" (train.lr={lr:g})" if lr is not None else ""
    causes.append(f"a learning rate too high{lr_text}")
    return "likely cause: " + ", or ".join(causes)


def student_rows(decoder, head_VD, rollout, device, precision="fp32") -> StudentRows:
    with autocast(precision, device):  # bf16: the decoder under autocast (opd.precision)
        hidden_BLD = decoder(rollout.input_ids_BL.to(device), rollout.attention_mask_BL.to(device))
        hidden_ND = autocast_rows(completion_rows(hidden_BLD, rollout))
    mask_BT = rollout.completion_mask_BT.to(device).bool()
    return StudentRows(
        hidden_ND=hidden_ND,
        head_VD=like_rows(head_VD, hidden_ND),  # bf16 rows: a bf16 view of the master head
        target_ids_N=rollout.completion_ids_BT.to(device)[mask_BT],
        row_index_N=mask_BT.nonzero()[:, 0],
    )


@torch.no_grad()
def rollout_kl(method, srows, tscores, values_N, ctx):
    """KL(q_student ‖ p_teacher) per token of this rollout, for the logs.

    Exact (full vocabulary) when the teacher returned full logits, reusing the signal's
    values when the signal already is that divergence at temperature 1 (`reverse_kl`, or
    generalized JSD with β = 1), which saves a second pass over the vocabulary; otherwise the
    one-sample estimate log q(y_t) − log p(y_t), unbiased per token when y_t was sampled from
    the student; None when the teacher returned neither.
    """
    signal = method.signal
    if isinstance(signal, ReverseKLSignal) and signal.is_reverse_kl(ctx.progress):
        return values_N.detach()
    if tscores.has_full_logits:
        detached = StudentRows(
            srows.hidden_ND.detach(), srows.head_VD.detach(), srows.target_ids_N, srows.row_index_N
        )
        return REVERSE_KL(detached, tscores, ctx)
    if tscores.token_logprobs_N is None:
        return None
    logq_N = chunked_token_logprobs(
        srows.hidden_ND.detach().float(),
        srows.head_VD.detach().float(),
        srows.target_ids_N,
        chunk_size=ctx.chunk_size,
    )
    return logq_N - tscores.token_logprobs_N.float()


def micro_step(
    method, models, rollout, ctx, device, count=None, precision="fp32", decoder=None, tscores=None
):
    """Loss of one micro-batch, normalised by `count` (None: this micro-batch's own count).

    `decoder`: the student's decoder forward to run instead of its own (the DDP-wrapped one
    of `opd.distributed`, whose forward registers the gradient all-reduce).
    `tscores`: the teacher's scores of `rollout` when already computed (the asynchronous
    pipeline, `opd.pipeline`); None scores it here.

    `precision="bf16"` / `"bf16-logits"` (`opd.precision.mode`): the teacher and the
    student's decoder run under bfloat16 autocast; the loss is formed outside it, reducing in
    float32, on float32 logits (bf16 logits with "bf16-logits"; `opd.precision`).

    Sets `ctx.rollout` to this micro-batch and clears `ctx.metrics`, so that afterwards
    `ctx.metrics` holds exactly the numbers the signal and weights reported for it.
    Returns (loss, kl_N, rollout); raises NonFiniteError if the teacher's scores are not
    finite (step named from `ctx.step`).
    """
    # The teacher first: its forward's activations are freed before the student's, which
    # autograd keeps for the backward, are allocated (a lower peak than the other order).
    if tscores is None:
        with autocast(precision, device):
            tscores = method.teacher.score(models.teacher, rollout, models.vocab_size)
    if not teacher_scores_finite(tscores):
        raise NonFiniteError(
            f"step {ctx.step + 1}: the teacher's output is not finite (NaN/inf in its scores); "
            "likely cause: NaN/inf teacher weights, or overflow in float16 (use model.dtype="
            "bfloat16 or float32); the student was not updated at this step"
        )
    s_dec, s_head, _ = decoder_and_head(models.student, verify=False)
    s_dec = decoder or s_dec
    srows = student_rows(s_dec, s_head[: models.vocab_size], rollout, device, precision)
    ctx.rollout, ctx.metrics = rollout, {}
    mask_BT = rollout.completion_mask_BT.to(device).bool()
    fused = one_pass_loss(method, srows, tscores, ctx, rollout, mask_BT, count)
    if fused is not None:
        loss, values_N = fused
    else:
        values_N = method.signal(srows, tscores, ctx)
        w_N = torch.ones_like(values_N)
        for weight in method.weights:
            w_N = w_N * weight(values_N, srows, tscores, rollout, ctx)
        if rollout.token_weight_BT is not None:
            w_N = w_N * rollout.token_weight_BT.to(device)[mask_BT]
        weighted_BT = torch.zeros(mask_BT.shape, dtype=values_N.dtype, device=device)
        weighted_BT[mask_BT] = (w_N * values_N).to(weighted_BT.dtype)
        loss = reduce(method.reduction, weighted_BT, mask_BT.to(values_N.dtype), count)
    kl_N = rollout_kl(method, srows, tscores, values_N, ctx)
    return loss, kl_N, rollout


def one_pass_loss(method, srows, tscores, ctx, rollout, mask_BT, count=None):
    """The loss in one pass over the heads, when every token's coefficient is known first.

    Applies when the signal offers `weighted_loss` (full-vocabulary divergences) and the
    method has no token weights (they may depend on the values). The coefficients are the
    reduction's closed form (`coefficients`: m/C or 1/(L_b·S)) times the sampler's
    importance weight; the loss is Σ c_n · D_n with its gradient taken in the forward pass
    (`chunked_weighted_divergence`), equal in value and gradient to the two-pass path.
    Returns None otherwise.
    """
    if not isinstance(method.signal, OnePassSignal) or method.weights:
        return None
    dtype = torch.promote_types(srows.hidden_ND.dtype, torch.float32)
    coef_N = coefficients(method.reduction, mask_BT, count, dtype=dtype)[mask_BT]
    if rollout.token_weight_BT is not None:
        coef_N = coef_N * rollout.token_weight_BT.to(coef_N.device)[mask_BT].to(dtype)
    return method.signal.weighted_loss(srows, tscores, ctx, coef_N)


def _rollout(method, stream, ctx, step, causes: str = "", dist=SINGLE, seed=0, micro=0):
    """One micro-batch's rollout: this process's rows of the global micro-batch, each
    sampled with its own seed (`opd.distributed.shard_rows`, `opd.sampling.rows`)."""
    examples = method.prompts.select(stream, ctx) if method.prompts else next(stream)
    examples, seeds = shard_rows(examples, dist, seed, step, micro)
    try:
        with row_seeds(seeds):
            return method.prefixes.rollout(examples, ctx)
    except RuntimeError as err:  # torch.multinomial on NaN/inf probabilities
        if re.search(r"\b(nan|inf)\b", str(err).lower()):
            raise NonFiniteError(
                f"step {step + 1}: sampling the rollout met non-finite probabilities "
                f"({' '.join(str(err).split())}); {causes or 'likely cause: NaN/inf weights'}"
            ) from None
        raise


def train_step(run, step: int) -> dict:
    """One optimizer step (module docstring); returns its metrics row."""
    tc, models, dist = run.cfg.train, run.models, run.dist
    t0 = time.perf_counter()
    run.optimizer.zero_grad(set_to_none=True)
    ctx = run.ctx
    ctx.step, ctx.rollout, ctx.metrics = step, None, {}
    causes = likely_causes(models, tc.lr)
    batch = step_batch(run, step, causes)  # opd.pipeline: synchronous or the async queue
    rollouts = batch.rollouts
    # the global count: over every micro-batch of every process (opd.distributed)
    (count,) = dist.sum(step_count(run.method.reduction, [r.completion_mask_BT for r in rollouts]))
    total_loss, kl_sum, n_tok, lengths, info = 0.0, 0.0, 0, [], {}
    for m, (rollout, tscores) in enumerate(zip(rollouts, batch.scores)):
        dist.sync_grads(last=m == len(rollouts) - 1)  # DDP: all-reduce on the last backward
        decoder = dist.decoder()  # DDP: the wrapped forward (None in one process)
        loss, kl_N, rollout = dist.loss_step(micro_step)(  # FSDP: inside the root's forward
            run.method, models, rollout, ctx, run.device, count, mode(tc), decoder, tscores
        )
        if not bool(torch.isfinite(loss.detach())):
            raise NonFiniteError(
                f"step {step + 1}: the loss is not finite ({float(loss.detach())}); "
                f"{causes}; the student was not updated at this step"
            )
        dist.backward(loss)
        total_loss += float(loss.detach())
        if kl_N is not None:
            kl_sum += float(kl_N.sum())
        n_tok += rollout.num_tokens
        lengths += rollout.completion_lengths().tolist()
        # the rollout's facts (source) and the numbers the signal and weights reported
        for k, v in {**rollout.info, **ctx.metrics}.items():
            info[k] = info.get(k, 0.0) + v / tc.grad_accum
    len_sum, len_n = float(sum(lengths)), len(lengths)
    if dist.world > 1:  # the step's numbers over all processes
        mine = {"loss": total_loss, "kl_sum": kl_sum, "tokens": n_tok, "info": info}
        all_ = combine(dist.gather(dict(mine, len_sum=len_sum, len_n=len_n)))
        total_loss, kl_sum, n_tok, info = all_["loss"], all_["kl_sum"], all_["tokens"], all_["info"]
        len_sum, len_n = all_["len_sum"], all_["len_n"]
    grads = [p.grad for p in run.params if p.grad is not None]
    if tc.max_grad_norm > 0:
        grad_norm = float(full(torch.nn.utils.clip_grad_norm_(run.params, tc.max_grad_norm)))
    else:  # FSDP: the norms of DTensor gradients, made full (`full`)
        grad_norm = (
            float(full(torch.stack([full(g.norm()) for g in grads]).norm())) if grads else 0.0
        )
    if not math.isfinite(grad_norm):
        raise NonFiniteError(
            f"step {step + 1}: the gradient norm is not finite ({grad_norm}); "
            f"{causes}; the student was not updated at this step"
        )
    pop_stats = getattr(models.teacher, "pop_stats", None)  # a served teacher's counters
    if pop_stats is not None:
        info.update(pop_stats())
    info.update(batch.info)  # policy_lag, the vLLM engine's weight lag, importance weights
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    after_optimizer_step(run.method)
    batch.finish()  # async: the next item is queued, the state is back at the step boundary
    dt = time.perf_counter() - t0
    return {
        "step": step + 1,
        "loss": total_loss,
        "teacher_kl": kl_sum / max(n_tok, 1),
        "completion_length": len_sum / max(len_n, 1),
        "tokens": n_tok,
        "tokens_per_s": n_tok / dt,
        "grad_norm": grad_norm,
        "lr": lr,
        "seconds": dt,
        **info,
    }


def after_optimizer_step(method) -> None:
    """Call `after_optimizer_step()` on every part of `method` that has it (e.g. the EMA
    self-teacher of `opd.selfdistill`, θ_T ← d·θ_T + (1 − d)·θ_S), after `optimizer.step()`."""
    parts = (method.prompts, method.prefixes, method.teacher, method.signal, *method.weights)
    for part in parts:
        hook = getattr(part, "after_optimizer_step", None)
        if callable(hook):
            hook()


def parameters_finite(model) -> str | None:
    """The name of the first parameter holding NaN/inf, or None when all are finite."""
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p.detach()).all()):
            return name
    return None
