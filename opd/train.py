"""The training loop: one plain function, read top to bottom.

For each optimizer step and each of `grad_accum` micro-batches:

    examples ─► method.prefixes.rollout ─► student decoder (grad) ─► completion rows (N, D_s)
                                         └► method.teacher.score (no grad) ─► TeacherScores
    values_N = method.signal(student rows, teacher scores)      per-token, never reduced
    w_N      = Π method.weights(...) · sampler token weights
    loss     = reduce(w_N · values_N)   (token mean over the micro-batch) / grad_accum

then clip, AdamW step, warm-up + cosine schedule. Only completion rows reach an lm_head.
The teacher scores the rollout before the student's forward (its activations are freed
before autograd keeps the student's). When the signal is a full-vocabulary divergence and the
method has no token weights, every token's coefficient in the reduction is known before the
values, so `one_pass_loss` computes Σ c_n · D_n with its gradient taken in the forward pass
(no logits recomputed in the backward); it equals the general path in value and gradient.
Logged per step: loss, KL(q_student ‖ p_teacher) on the rollout, completion length, tokens/s,
grad norm, lr. The loop never branches on the method's name.

Resume: a checkpoint restores the student, optimizer, scheduler, RNG states and the data
stream position, so a resumed run reproduces the uninterrupted one step for step.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from opd.build import Models, PromptSets, build_data, build_models
from opd.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from opd.config import RunConfig, resolve_output_dir, save_config
from opd.errors import ConfigError
from opd.evaluate import generic_verify, heldout_kl
from opd.logs import MetricsLog, Progress
from opd.losses import chunked_token_logprobs, sequence_mean, token_mean
from opd.method import Method
from opd.models import decoder_and_head
from opd.recipes import get_recipe
from opd.sampling import GenerationParams, RolloutContext, make_backend
from opd.signals import Divergence, SignalContext
from opd.stream import PromptStream
from opd.types import StudentRows, completion_rows

REVERSE_KL = Divergence("reverse_kl")


@dataclass
class RunResult:
    run_dir: Path
    losses: list  # per optimizer step
    metrics: list  # the rows written to metrics.jsonl this session
    models: Models
    data: PromptSets
    method: Method


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warm-up to 1, then cosine decay to `min_ratio` at `total` steps."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def build_method(cfg: RunConfig) -> Method:
    return get_recipe(cfg.method.recipe).build(**cfg.method.args)


def _stateful_components(method: Method) -> dict:
    """Parts of a method that keep state across steps (replay buffers, curricula)."""
    parts = {"prompts": method.prompts, "prefixes": method.prefixes, "signal": method.signal}
    parts.update({f"weight{i}": w for i, w in enumerate(method.weights)})
    return {k: v for k, v in parts.items() if hasattr(v, "state_dict")}


def component_states(method: Method) -> dict:
    """JSON-serialisable states of the stateful parts, saved in each checkpoint."""
    return {k: v.state_dict() for k, v in _stateful_components(method).items()}


def load_component_states(method: Method, states: dict) -> None:
    for k, v in _stateful_components(method).items():
        if k in states:
            v.load_state_dict(states[k])


def check_data_fits(method: Method, data: PromptSets, models: Models) -> None:
    if method.prefixes.needs_completions:
        missing = [ex.source for ex in data.train if ex.completion_ids is None]
        if missing:
            raise ConfigError(
                f"recipe {method.name!r} trains on dataset completions ({method.prefixes.describe()}), "
                f"but {len(missing)} rows have none (first: {missing[0]}); add a 'completion' "
                "field or pick an on-policy recipe"
            )
    if not data.train:
        raise ConfigError("data.train: no training prompts")


def student_rows(decoder, head_VD, rollout, device) -> StudentRows:
    hidden_BLD = decoder(rollout.input_ids_BL.to(device), rollout.attention_mask_BL.to(device))
    mask_BT = rollout.completion_mask_BT.to(device).bool()
    return StudentRows(
        hidden_ND=completion_rows(hidden_BLD, rollout),
        head_VD=head_VD,
        target_ids_N=rollout.completion_ids_BT.to(device)[mask_BT],
        row_index_N=mask_BT.nonzero()[:, 0],
    )


@torch.no_grad()
def rollout_kl(method, srows, tscores, values_N, sctx):
    """KL(q_student ‖ p_teacher) per token of this rollout, for the logs.

    Exact (full vocabulary) when the teacher returned full logits, reusing the signal's
    values when the signal already is that divergence at temperature 1 (`reverse_kl`, or
    generalized JSD with β = 1), which saves a second pass over the vocabulary; otherwise the
    one-sample estimate log q(y_t) − log p(y_t), unbiased per token when y_t was sampled from
    the student; None when the teacher returned neither.
    """
    is_rkl = getattr(method.signal, "is_reverse_kl", None)
    if is_rkl is not None and is_rkl(sctx.progress):
        return values_N.detach()
    if tscores.has_full_logits:
        detached = StudentRows(
            srows.hidden_ND.detach(), srows.head_VD.detach(), srows.target_ids_N, srows.row_index_N
        )
        return REVERSE_KL(detached, tscores, sctx)
    if tscores.token_logprobs_N is None:
        return None
    logq_N = chunked_token_logprobs(
        srows.hidden_ND.detach().float(),
        srows.head_VD.detach().float(),
        srows.target_ids_N,
        chunk_size=sctx.chunk_size,
    )
    return logq_N - tscores.token_logprobs_N.float()


def micro_step(method, models, rollout, sctx, device):
    """Loss of one micro-batch and its logged numbers (loss not yet divided by grad_accum)."""
    # The teacher first: its forward's activations are freed before the student's, which
    # autograd keeps for the backward, are allocated (a lower peak than the other order).
    tscores = method.teacher.score(models.teacher, rollout, models.vocab_size)
    s_dec, s_head, _ = decoder_and_head(models.student, verify=False)
    srows = student_rows(s_dec, s_head[: models.vocab_size], rollout, device)
    sctx = dataclasses.replace(sctx, rollout=rollout)
    mask_BT = rollout.completion_mask_BT.to(device).bool()
    reduce = token_mean if method.reduction == "token_mean" else sequence_mean
    fused = one_pass_loss(method, srows, tscores, sctx, rollout, mask_BT, reduce)
    if fused is not None:
        loss, values_N = fused
    else:
        values_N = method.signal(srows, tscores, sctx)
        w_N = torch.ones_like(values_N)
        for weight in method.weights:
            w_N = w_N * weight(values_N, srows, tscores, rollout, sctx)
        if rollout.token_weight_BT is not None:
            w_N = w_N * rollout.token_weight_BT.to(device)[mask_BT]
        weighted_BT = torch.zeros(mask_BT.shape, dtype=values_N.dtype, device=device)
        weighted_BT[mask_BT] = (w_N * values_N).to(weighted_BT.dtype)
        loss = reduce(weighted_BT, mask_BT.to(values_N.dtype))
    kl_N = rollout_kl(method, srows, tscores, values_N, sctx)
    return loss, kl_N, rollout


def one_pass_loss(method, srows, tscores, sctx, rollout, mask_BT, reduce):
    """The loss in one pass over the heads, when every token's coefficient is known first.

    Applies when the signal offers `weighted_loss` (full-vocabulary divergences) and the
    method has no token weights (they may depend on the values). The reduction is linear in
    the weighted values, so each token's coefficient c_n = ∂ reduce / ∂ value_n (times the
    sampler's importance weight) is read off with autograd on a zero probe; the loss is then
    Σ c_n · D_n with its gradient taken in the forward pass (`chunked_weighted_divergence`),
    equal in value and gradient to the two-pass path below it. Returns None otherwise.
    """
    weighted_loss = getattr(method.signal, "weighted_loss", None)
    if weighted_loss is None or method.weights:
        return None
    dtype = torch.promote_types(srows.hidden_ND.dtype, torch.float32)
    probe_BT = torch.zeros(mask_BT.shape, dtype=dtype, device=mask_BT.device, requires_grad=True)
    with torch.enable_grad():
        (coef_BT,) = torch.autograd.grad(reduce(probe_BT, mask_BT.to(dtype)), probe_BT)
    coef_N = coef_BT[mask_BT]
    if rollout.token_weight_BT is not None:
        coef_N = coef_N * rollout.token_weight_BT.to(coef_N.device)[mask_BT].to(dtype)
    return weighted_loss(srows, tscores, sctx, coef_N)


def distill(
    cfg: RunConfig,
    *,
    models: Models | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    evaluate: bool = True,
    log=print,
) -> RunResult:
    """Run (or resume) a distillation described by `cfg`; returns the run's results.

    Args:
      cfg: the run configuration.
      models: pre-built models (tests pass tiny ones); default: built from `cfg.model`.
      resume: continue from the last checkpoint in `cfg.output_dir`.
      stop_after: stop (with a checkpoint) after this global step, as if interrupted.
      evaluate: measure held-out KL at the start and end (and every `train.eval_every`).
      log: where one-line status messages go.
    """
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    run_dir = resolve_output_dir(cfg)
    cfg.output_dir = str(run_dir)
    ckpt_root = run_dir / "checkpoints"
    if not resume and (run_dir / "metrics.jsonl").exists():
        raise ConfigError(
            f"output_dir '{run_dir}' already holds a run; pass --resume to continue it "
            "or choose another output_dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")

    torch.manual_seed(tc.seed)
    method = build_method(cfg)
    models = models or build_models(cfg)
    data = build_data(cfg, models.tokenizer)
    check_data_fits(method, data, models)
    device = next(models.student.parameters()).device
    log(f"run folder: {run_dir}")
    log(f"method {method.name}:\n  " + method.describe().replace("\n", "\n  "))
    log(
        f"{len(data.train)} training prompts, {len(data.eval)} held-out; "
        f"{data.truncated} prompts truncated, {data.skipped} bad rows skipped"
    )
    for example in data.skipped_examples or []:
        log(f"  skipped: {example}")

    params = [p for p in models.student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(tc.warmup_steps, tc.steps, tc.min_lr_ratio)
    )
    for part in (method.prompts, method.prefixes, method.signal, *method.weights):
        if hasattr(part, "prepare"):  # e.g. G-OPD snapshots the initial student as π_ref
            part.prepare(models)
    stream = PromptStream(data.train, tc.batch_size, seed=tc.seed)
    start_step, losses = 0, []
    if resume:
        ckpt = latest_checkpoint(ckpt_root)
        if ckpt is None:
            raise ConfigError(f"--resume: no checkpoint in '{ckpt_root}'")
        state = load_checkpoint(ckpt, models.student, optimizer, scheduler)
        stream.load_state_dict(state["data"])
        load_component_states(method, state.get("components", {}))
        start_step, losses = state["step"], state["losses"]
        log(f"resumed from {ckpt} at step {start_step}")
    metrics_log = MetricsLog(run_dir / "metrics.jsonl", resume_step=start_step if resume else None)

    gen = GenerationParams(
        max_new_tokens=cfg.sampling.max_new_tokens,
        temperature=cfg.sampling.temperature,
        top_p=cfg.sampling.top_p,
        top_k=cfg.sampling.top_k,
    )
    ctx = RolloutContext(
        student=models.student,
        teacher=models.teacher,
        backend=make_backend(cfg.sampling.backend),
        params=gen,
        pad_id=models.pad_id,
        stop_ids=models.stop_ids,
        total_steps=tc.steps,
        tokenizer=models.tokenizer,
    )

    def run_eval(step: int) -> dict | None:
        if not (evaluate and data.eval):
            return None
        res = heldout_kl(
            models.student,
            models.teacher,
            data.eval,
            pad_id=models.pad_id,
            stop_ids=models.stop_ids,
            vocab_size=models.vocab_size,
            max_new_tokens=gen.max_new_tokens,
            chunk_size=tc.chunk_size,
            tokenizer=models.tokenizer,
            verify=verify,
        )
        row = {
            "event": "eval",
            "step": step,
            "heldout_kl": res["kl"],
            "heldout_accuracy": res["accuracy"],
            "heldout_length": res["mean_length"],
        }
        metrics_log.write(row)
        return row

    verify = data.task.verify if data.task is not None else generic_verify
    ctx.verify = verify
    rows_logged = []
    if start_step == 0:
        first = run_eval(0)
        if first:
            log(f"held-out KL(q_student ‖ p_teacher) before: {first['heldout_kl']:.4f}")
    last_step = tc.steps if stop_after is None else min(tc.steps, stop_after)
    bar = Progress(tc.steps, initial=start_step, enabled=tc.progress)
    models.student.train()
    for step in range(start_step, last_step):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        ctx.step = step
        sctx = SignalContext(
            step,
            tc.steps,
            tc.chunk_size,
            tc.loss_path == "materialized",
            tokenizer=models.tokenizer,
            verify=verify,
            models=models,
        )
        total_loss, kl_sum, n_tok, lengths, info = 0.0, 0.0, 0, [], {}
        for _ in range(tc.grad_accum):
            examples = method.prompts.select(stream, ctx) if method.prompts else next(stream)
            rollout = method.prefixes.rollout(examples, ctx)
            loss, kl_N, rollout = micro_step(method, models, rollout, sctx, device)
            (loss / tc.grad_accum).backward()
            total_loss += float(loss.detach()) / tc.grad_accum
            if kl_N is not None:
                kl_sum += float(kl_N.sum())
            n_tok += rollout.num_tokens
            lengths += rollout.completion_lengths().tolist()
            for k, v in rollout.info.items():
                info[k] = info.get(k, 0.0) + v / tc.grad_accum
        if tc.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm))
        else:
            grad_norm = float(
                torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
            )
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        dt = time.perf_counter() - t0
        losses.append(total_loss)
        row = {
            "step": step + 1,
            "loss": total_loss,
            "teacher_kl": kl_sum / max(n_tok, 1),
            "completion_length": sum(lengths) / max(len(lengths), 1),
            "tokens": n_tok,
            "tokens_per_s": n_tok / dt,
            "grad_norm": grad_norm,
            "lr": lr,
            "seconds": dt,
            **info,
        }
        metrics_log.write(row)
        rows_logged.append(row)
        bar.update(total_loss, n_tok / dt, row["teacher_kl"])
        done = step + 1
        if tc.eval_every and done % tc.eval_every == 0 and done < tc.steps:
            run_eval(done)
        if (tc.checkpoint_every and done % tc.checkpoint_every == 0) or done == last_step:
            save_checkpoint(
                ckpt_root,
                done,
                models.student,
                optimizer,
                scheduler,
                {
                    "data": stream.state_dict(),
                    "losses": losses,
                    "components": component_states(method),
                },
                keep=tc.keep_checkpoints,
            )
    bar.close()
    if last_step == tc.steps:
        final = run_eval(tc.steps)
        if final:
            log(f"held-out KL(q_student ‖ p_teacher) after: {final['heldout_kl']:.4f}")
        save_student(models, run_dir / "student")
        log(f"student saved to {run_dir / 'student'}")
    metrics_log.close()
    return RunResult(run_dir, losses, rows_logged, models, data, method)


def save_student(models: Models, path: Path) -> None:
    """`save_pretrained` (safetensors) + tokenizer, loadable with AutoModelForCausalLM."""
    tmp = path.with_name(f".tmp-{path.name}")
    import shutil

    if tmp.exists():
        shutil.rmtree(tmp)
    models.student.save_pretrained(tmp)  # safetensors by default
    models.tokenizer.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
