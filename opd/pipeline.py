"""Where a step's rollouts and teacher scores come from: synchronous, or an asynchronous queue.

`step_batch(run, step, causes)` is the one seam `opd.step.train_step` calls for the step's
`grad_accum` rollouts (and, asynchronously, their teacher scores); `StepBatch.finish()` after
the optimizer step.

Synchronous (`train.async_rollouts=0`, the default): exactly the loop as it always was: the
rollouts of step s are written by the student θ_s, then each micro-batch is scored by the
teacher and trained on (`opd.step.micro_step`).

Asynchronous (`train.async_rollouts=k`, k ≥ 1): a background thread writes the rollouts AND
the teacher's scores of step s + k while the main thread trains step s:

    generator  a second copy of the student's weights, refreshed to θ_s at the start of step
               s (= after the optimizer step of s − 1)
    step s     pop item s; thread: item s + k = rollouts(generator) + teacher scores;
               main: train on item s; join the thread (`StepBatch.finish`)
    lag        item j is written by θ_{j−k}: policy_lag = k, logged per step; after a start
               at step r the first k items are written synchronously by θ_r, so the lags
               are 0, 1, ..., k − 1, then k (a resume restores the uninterrupted run's lags)

One item is produced per step, so in the steady state a step costs max(train, produce)
instead of train + produce; k > 1 only adds staleness and absorbs variation.

Order and randomness: items are produced in step order from the same data stream and the
same torch / python RNG streams as the synchronous loop (the producer owns the global RNG
while it runs; the main thread's training draws none when the student has no dropout, as
opd's models). With weights that do not change, the pipeline gives the synchronous losses
bit for bit (tests/test_async.py).

Checkpoints and resume (exact): after each step the thread is joined, the producer's data
position and RNG states are kept aside and the global ones set back to those just before
item s + 1 was produced, so the checkpoint's state.json / rng.safetensors are those of the
synchronous loop. What the queue adds is its weights: item j is written by
θ_{v(j)}, v(j) = max(j − k, r) with r the step the queue was last filled from the live
weights (the run's start). Each step keeps a CPU copy of θ_s's trainable tensors (taken by the
producer thread, the last k kept), and the checkpoint of D steps holds the distinct versions
v(D) .. v(D+k−1) (all < D, at most k) in queue.safetensors, with state.json's
"async" = {rollouts: k, start: r, versions}; `opd.pipeline_state` writes and reads them.
--resume refills the queue with exactly those versions, in the same order from the same
state, so the resumed run's losses and weights equal the uninterrupted run's bit for bit
(tests/test_async_resume.py). Another k on resume: module doc of `opd.pipeline_state`.

Importance correction (`train.async_correction=true`): per counted token

    w_t = min(π_θ(y_t) / π_β(y_t), c)        c = train.async_correction_clip

with π_β the generator's probability of the written token (recorded by the producer, one
no-grad forward of the generator copy) and π_θ the live student's before this step's update
(one no-grad forward on the main thread), both at the sampling temperature (top-p / top-k
truncation ignored). w is detached (truncated importance sampling, as IMPALA) and multiplies
the rollout's token weights (`Rollout.token_weight_BT`); logged: async_weight_mean/_max.

Refused (ConfigError): a teacher that reads the student (model.teacher=self, self-teachers,
any part with `after_optimizer_step`) and stateful prompt selectors or prefix sources
(replay buffers, curricula), whose state the producer and the trainer would share.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from opd.errors import ConfigError
from opd.losses import chunked_token_logprobs
from opd.models import decoder_and_head
from opd.pipeline_state import check_async
from opd.precision import autocast, mode


@dataclass
class StepBatch:
    """The rollouts of one step, their teacher scores (None: scored in `micro_step`) and the
    numbers to log (policy_lag, the vLLM engine's weight lag, importance weights)."""

    rollouts: list
    scores: list
    info: dict = field(default_factory=dict)
    pipeline: Pipeline | None = None

    def finish(self) -> None:
        """After the optimizer step: wait for the next item, restore the step-boundary state."""
        if self.pipeline is not None:
            self.pipeline.finish()


def sync_backend(backend, model, step: int, sampling, ahead: int = 0) -> dict:
    """Push the weights to an engine that holds its own copy (the vLLM backend); {} else.
    `ahead`: how far past the last finished step the caller may be (the async producer)."""
    sync = getattr(backend, "sync_weights", None)
    if sync is None:
        return {}
    every, memory = sampling.vllm_sync_every, sampling.vllm_gpu_memory
    return sync(model, step, every=every, gpu_memory=memory, ahead=ahead)


def step_batch(run, step: int, causes: str) -> StepBatch:
    """The rollouts (and, asynchronously, teacher scores) of optimizer step `step`."""
    from opd.step import _rollout

    tc = run.cfg.train
    if tc.async_rollouts == 0:
        if tc.async_correction:
            raise ConfigError(
                "train.async_correction=true corrects for stale rollouts and needs "
                "train.async_rollouts >= 1 (it is 0)"
            )
        info = sync_backend(run.ctx.backend, run.models.student, step, run.cfg.sampling)
        with autocast(mode(tc), run.device):  # bf16: rollouts under autocast too
            rollouts = [
                _rollout(run.method, run.stream, run.ctx, step, causes, run.dist, tc.seed, m)
                for m in range(tc.grad_accum)
            ]
        return StepBatch(rollouts, [None] * len(rollouts), info)
    pipe = getattr(run, "pipeline", None)
    if pipe is None:
        pipe = run.pipeline = Pipeline(run, tc.async_rollouts)
    return pipe.next_batch(step, causes)


def _capture(run) -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return run.stream.state_dict(), torch.get_rng_state(), cuda, random.getstate()


def _restore(run, state: tuple) -> None:
    data, cpu, cuda, py = state
    run.stream.load_state_dict(data)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(py)


@torch.no_grad()
def token_logprobs(model, rollout, vocab_size, temperature, chunk_size, device, precision):
    """log π(y_t) of the rollout's counted tokens under `model` at `temperature` (N,)."""
    from opd.step import student_rows

    dec, head_VD, _ = decoder_and_head(model, verify=False)
    rows = student_rows(dec, head_VD[:vocab_size], rollout, device, precision)
    tau = temperature if temperature > 0 else 1.0
    return chunked_token_logprobs(
        rows.hidden_ND.float(), rows.head_VD.float(), rows.target_ids_N, tau, chunk_size
    )


@dataclass
class Item:
    """One step's rollouts, teacher scores and π_β log-probs, written by θ_version."""

    rollouts: list
    scores: list
    behaviour: list
    version: int
    state: tuple  # the global state (data position, RNG) just before it was produced
    info: dict = field(default_factory=dict)
    error: BaseException | None = None


class Pipeline:
    """The queue of the next k steps' items and the thread that fills it (module doc)."""

    def __init__(self, run, k: int):
        check_async(run.method, run.models)
        self.run, self.k = run, k
        tc = run.cfg.train
        self.correction, self.clip = tc.async_correction, tc.async_correction_clip
        student = run.models.student
        self.generator = copy.deepcopy(student)  # the second copy of the weights
        self.generator.requires_grad_(False)
        self._pairs = list(zip(self.generator.state_dict().values(), student.state_dict().values()))
        own = {id(p) for p in student.parameters() if p.requires_grad}
        self._gen = self.generator.state_dict()
        self.trainable = [n for n, v in student.state_dict(keep_vars=True).items() if id(v) in own]
        self.snapshots: dict[int, dict] = {}  # version s → θ_s's trainable tensors (CPU)
        self.start: int | None = None  # r: the step the queue was last filled from θ_r
        self.resume = getattr(run, "queue_resume", None)  # (r, snapshots): opd.pipeline_state
        self.queue: deque[Item] = deque()
        self.producer_state: tuple | None = None
        self.thread: threading.Thread | None = None
        self.result: Item | None = None

    @torch.no_grad()
    def refresh(self) -> None:
        """The generator's weights ← the student's (θ_s)."""
        for dst, src in self._pairs:
            dst.copy_(src)

    @torch.no_grad()
    def snapshot(self, version: int) -> None:
        """Keep θ_version's trainable tensors (the generator holds θ_version) on the CPU."""
        self.snapshots[version] = {n: self._gen[n].to("cpu", copy=True) for n in self.trainable}

    @torch.no_grad()
    def load_version(self, version: int, step: int) -> None:
        """The generator's weights ← θ_version (a kept snapshot; the student's when = step)."""
        self.refresh()
        if version != step:
            for name, tensor in self.snapshots[version].items():
                self._gen[name].copy_(tensor)

    def produce(self, j: int, version: int, causes: str, snapshot: bool = False) -> Item:
        """Item j from the generator (θ_version), first keeping θ_version when `snapshot` (in
        the thread: the copy overlaps training); an exception is kept in the item."""
        from opd.step import _rollout

        run, tc = self.run, self.run.cfg.train
        m = run.models
        state = _capture(run)
        ctx = dataclasses.replace(run.ctx, student=self.generator, step=j, rollout=None, metrics={})
        try:
            if snapshot:
                self.snapshot(version)
            with torch.no_grad(), autocast(mode(tc), run.device):
                info = sync_backend(ctx.backend, self.generator, j, run.cfg.sampling, self.k + 1)
                rollouts = [
                    _rollout(run.method, run.stream, ctx, j, causes, run.dist, tc.seed, mi)
                    for mi in range(tc.grad_accum)
                ]
                scores = [run.method.teacher.score(m.teacher, r, m.vocab_size) for r in rollouts]
                behaviour = [self._logprobs(self.generator, r) for r in rollouts]
            return Item(rollouts, scores, behaviour, version, state, info)
        except BaseException as err:  # re-raised when the item is due, before any update
            return Item([], [], [], version, state, error=err)

    def _logprobs(self, model, rollout):
        if not self.correction:
            return None
        run = self.run
        return token_logprobs(
            model,
            rollout,
            run.models.vocab_size,
            run.cfg.sampling.temperature,
            run.cfg.train.chunk_size,
            run.device,
            mode(run.cfg.train),
        )

    def _fail(self, item: Item):
        """Drop the queue, put the global state back before `item`, raise its error."""
        self.queue.clear()
        self.producer_state = None
        _restore(self.run, item.state)
        raise item.error

    def fill(self, step: int, causes: str) -> None:
        """A (re)start: items step .. step+k−1, synchronously, each by θ_{v(j)} (module doc):
        all by θ_step, or after an exact resume by the checkpoint's weight versions."""
        start, saved = self.resume if self.resume is not None else (step, {})
        self.resume, self.start = None, start
        self.snapshots.update(saved)
        for j in range(step, min(step + self.k, self.run.cfg.train.steps)):
            version = max(j - self.k, start)
            self.load_version(version, step)
            self.queue.append(self.produce(j, version, causes))
            if self.queue[-1].error is not None:
                break
        self.producer_state = _capture(self.run)

    def next_batch(self, step: int, causes: str) -> StepBatch:
        if not self.queue:
            self.fill(step, causes)
        else:
            _restore(self.run, self.producer_state)
        item = self.queue.popleft()
        if item.error is not None:
            self._fail(item)
        self.refresh()  # θ_step, before this step's optimizer update
        for version in [v for v in self.snapshots if v <= step - self.k]:
            del self.snapshots[version]  # a checkpoint of step + 1 needs θ_{step+1−k} .. θ_step
        if step + self.k < self.run.cfg.train.steps and all(q.error is None for q in self.queue):
            self.thread = threading.Thread(
                target=self._work, args=(step + self.k, step, causes), daemon=True
            )
            self.thread.start()
        else:
            self.snapshot(step)
        info = {"policy_lag": float(step - item.version), **item.info}
        rollouts = item.rollouts
        if self.correction:
            rollouts, weights = self._correct(item)
            info.update(weights)
        return StepBatch(rollouts, item.scores, info, self)

    def _work(self, j: int, version: int, causes: str) -> None:
        self.result = self.produce(j, version, causes, snapshot=True)

    def _correct(self, item: Item):
        """Rollouts with w_t = min(π_θ/π_β, c) multiplied into their token weights."""
        run, out, w_all = self.run, [], []
        for rollout, logp_beh_N in zip(item.rollouts, item.behaviour):
            logp_cur_N = self._logprobs(run.models.student, rollout)
            w_N = torch.exp(logp_cur_N - logp_beh_N).clamp(max=self.clip)
            mask_BT = rollout.completion_mask_BT.bool()
            w_BT = torch.ones(mask_BT.shape, dtype=torch.float32)
            w_BT[mask_BT] = w_N.float().cpu()
            if rollout.token_weight_BT is not None:
                w_BT = w_BT * rollout.token_weight_BT.float()
            out.append(dataclasses.replace(rollout, token_weight_BT=w_BT))
            w_all.append(w_N.float().cpu())
        w = torch.cat(w_all) if w_all else torch.zeros(0)
        stats = {"async_weight_mean": float(w.mean()) if w.numel() else 1.0}
        stats["async_weight_max"] = float(w.max()) if w.numel() else 1.0
        return out, stats

    def finish(self) -> None:
        """Join the producer; keep its state aside; the global state → before item s + 1."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
            self.queue.append(self.result)
            self.result = None
            self.producer_state = _capture(self.run)
        if self.queue:
            _restore(self.run, self.queue[0].state)
