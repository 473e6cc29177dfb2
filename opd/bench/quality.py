"""What distillation buys: off-policy vs on-policy recipes at equal compute.

What is measured. A teacher trained from scratch on a synthetic task with compounding errors
(`opd.tasks`: sort, chain, brackets, reverse; `opd.tasks.teacher`, ≥ 95 % exact match) is
distilled into a smaller student (default 2 layers × 64 wide vs the teacher's 2 × 128, same
character tokenizer). Per seed, the student is first warmed up off-policy (supervised KD on
dataset completions) and every method continues from that one checkpoint, as in the papers
(on-policy training of a random student mostly teaches it from its own noise):

    supervised_kd               dataset writes y;  KL(p_teacher ‖ q_student)   off-policy
    seqkd                       teacher samples y; KL(p_teacher ‖ q_student)   off-policy
    gkd λ=0.5, β = 0 / 0.5 / 1  half the rows student-written; JSD(β)          mixed
    gkd λ=1, β = 0 / 0.5 / 1    student samples y; generalized JSD(β)          on-policy
    on_policy_rkl               student samples y; KL(q_student ‖ p_teacher)   on-policy
    sampled_rkl                 student samples y; sampled-token RKL estimate  on-policy
    staged                      dataset FKL, then on-policy RKL, then reward   staged

At fractions of the budget (`eval_points`) we record exact-match accuracy of greedy
completions on the teacher's held-out prompts (the task's verifier) and the held-out
token-mean KL(q_student ‖ p_teacher) on greedy student completions (`heldout_kl`) and
KL(p_teacher ‖ q_student) on the teacher's greedy completions (`opd.bench.stability`); the
summary is mean ± sample std over seeds at the end of the budget, with paired per-seed
differences to supervised KD. `--lrs`: each method's lr is chosen on a validation split
(`opd.bench.sweep`); every run has a collapse record (`opd.bench.stability`).

Compute: `opd.bench.flops` (estimated FLOPs, the 2N / 6N rule of Kaplan et al. 2020, N_writer
the parameters that decode each completion token). Equal compute: the budget B is
`budget_gflop`, or by default the estimated cost of `steps` on-policy steps; each method gets
round(B / its estimated step cost) steps, estimated with C = the mean reference completion
length; the FLOPs spent are counted from the logged completion tokens and reported beside B.
The shared warm-up is counted apart: `warmup_steps`, or to its plateau (`opd.bench.warmup`).
Chain / sort tasks record the teacher's recovery accuracy and the students' correction markers
and errors (`opd.tasks.recovery`; docs/tasks.md, also for knobs and long variants in `--task`).

Limits: P is the pool's mean prompt length (FLOP count: `opd.bench.flops`); FLOPs are not
seconds (tiny models decode latency bound; seconds are reported too). Reference: Agarwal et
al., ICLR 2024 (GKD), who also start from a supervised checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from opd.bench.environment import machine
from opd.bench.flops import flop_params, microbatch_flops, writer_params
from opd.bench.methods import parse_method, prefixes_of, slug
from opd.bench.plots import summarize, write_report
from opd.bench.stability import evaluate_student
from opd.bench.sweep import run_methods
from opd.bench.warmup import describe_warmup, run_plateau_warmup, write_valid_split
from opd.build import Models, finish_models
from opd.cli import _Parser as CliParser  # a bad option: one `opd: error:` line, exit 2
from opd.config import load_config
from opd.tasks import get_task
from opd.tasks.recovery import teacher_recovery
from opd.tasks.teacher import EVAL_SEED, train_task_teacher
from opd.tasks.variants import task_spec
from opd.tiny import tiny_llama
from opd.train import distill

METHODS = ("supervised_kd", "seqkd", *(f"gkd:lmbda={lm},beta={b}" for lm in (0.5, 1.0)
                                       for b in (0.0, 0.5, 1.0)),
           "on_policy_rkl", "sampled_rkl", "staged")
TRAIN_SEED = 20_240_101  # the student's training prompt pool (held-out prompts removed)


def _f(default, doc: str, **cli):
    return field(default=default, metadata={"doc": doc, **cli})


@dataclass
class Settings:
    """Everything a quality sweep depends on; each field is also a command-line option."""

    task: str = _f("sort", "synthetic task", cli=False)
    knobs: dict = _f(None, "task knobs (opd.tasks.variants.task_spec)", cli=False)
    seeds: int = _f(3, "number of seeds (0 .. n-1): student init, data order, sampling")
    methods: tuple = _f(METHODS, "methods, 'recipe' or 'recipe:arg=value,arg=value'", item=str)
    steps: int = _f(200, "on-policy steps whose estimated FLOPs define the budget")
    budget_gflop: float = _f(None, "the budget in GFLOPs instead (overrides --steps)",
                             flag="--budget", type=float)
    warmup: str = _f("fixed", "'fixed' (warmup_steps) or 'plateau' (opd.bench.warmup)",
                     choices=("fixed", "plateau"))
    warmup_steps: int = _f(400, "steps of the shared supervised-KD warm-up (constant lr)")
    warmup_eval_every: int = _f(100, "plateau warm-up: steps between validation evaluations")
    warmup_patience: int = _f(3, "plateau warm-up: evaluations without improvement that stop it")
    warmup_min_delta: float = _f(0.0, "plateau warm-up: smallest accuracy gain that counts")
    warmup_max_steps: int = _f(4000, "plateau warm-up: stop here at the latest")
    valid_rows: int = _f(200, "plateau warm-up: validation prompts (not held-out, not training)")
    warmup_lr: float = _f(3e-3, "learning rate of the warm-up")
    lr: float = _f(2e-3, "peak learning rate of every method (cosine to 10 %)")
    lrs: tuple = _f((), "sweep: lrs tried per method on seed 0, validation accuracy picks one "
                    "(opd.bench.sweep); none: --lr for all", item=float)
    lr_warmup: int = _f(10, "linear lr ramp of every method (a fresh AdamW)")
    batch_size: int = _f(32, "prompts per step")
    temperature: float = _f(1.0, "sampling temperature of rollouts (student and teacher)")
    student_hidden: int = _f(64, "student width")
    student_layers: int = _f(2, "student depth")
    student_heads: int = _f(4, "student attention heads")
    train_rows: int = _f(4000, "training prompt pool")
    eval_rows: int = _f(200, "held-out prompts for accuracy (≤ 200: the teacher's held-out set)")
    kl_rows: int = _f(64, "held-out prompts for the teacher KL")
    eval_points: tuple = _f((0.25, 0.5, 1.0), "fractions of the budget where we evaluate",
                            item=float)
    teacher_seed: int = _f(0, "seed of the task teacher")
    teacher_steps: int = _f(None, "teacher training steps (default: the task preset)", type=int)
    cache_dir: str = _f(None, "task-teacher cache (default ~/.cache/opd)", type=str)
    workers: int = _f(2, "runs side by side, one process each")
    threads: int = _f(1, "torch threads per worker")
    progress: bool = _f(True, "show the sweep's progress bar", cli=False)
    teacher_preset: object = _f(None, "an opd.tasks.teacher.TeacherPreset (tests)", cli=False)


# ------------------------------------------------------------------------ the task and models


@dataclass
class TaskSetup:
    """Files and facts shared by every run of one task (picklable, for worker processes)."""

    task: str
    out_dir: str
    train_file: str
    eval_file: str
    teacher_kwargs: dict
    teacher_info: dict
    max_new_tokens: int
    prompt_tokens: float  # mean prompt length of the training pool
    completion_tokens: float  # mean reference completion length, eos included
    valid_file: str = ""  # validation split of the plateau warm-up (opd.bench.warmup)


def teacher_kwargs(s: Settings) -> dict:
    """`train_task_teacher`'s keyword arguments for these settings (one cache folder)."""
    return dict(seed=s.teacher_seed, cache_dir=s.cache_dir, progress=s.progress,
                steps=s.teacher_steps, preset=s.teacher_preset, num_threads=s.threads,
                **({"knobs": s.knobs} if s.knobs else {}))


def prepare_task(s: Settings, out_dir: Path) -> TaskSetup:
    """Train (or load) the teacher and write the student's train / held-out prompt files."""
    kwargs = teacher_kwargs(s)
    task, knobs = get_task(s.task), s.knobs or {}
    eval_rows = task.generate(s.eval_rows, EVAL_SEED + s.teacher_seed, **knobs)  # its held-out
    held_out = {r["prompt"] for r in eval_rows}
    train_rows = [r for r in task.generate(s.train_rows, TRAIN_SEED, **knobs)
                  if r["prompt"] not in held_out]
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
        (out_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = held_out | {r["prompt"] for r in train_rows}  # the plateau's validation split avoids
    valid = write_valid_split(s, task, knobs, seen, out_dir) \
        if s.warmup == "plateau" or len(set(s.lrs)) > 1 else ""
    _, tok, info = train_task_teacher(s.task, **kwargs)  # after the checks of the prompt files
    prompt_ids = tok([r["prompt"] for r in train_rows], add_special_tokens=False)["input_ids"]
    comp_ids = tok([r["completion"] for r in train_rows], add_special_tokens=False)["input_ids"]
    return TaskSetup(
        task=s.task, out_dir=str(out_dir), train_file=str(out_dir / "train.jsonl"),
        eval_file=str(out_dir / "eval.jsonl"), teacher_kwargs={**kwargs, "progress": False},
        teacher_info=dict(info),
        max_new_tokens=max(len(c) for c in comp_ids) + 1 + 4,  # + eos, + 4 to ramble in
        prompt_tokens=statistics.mean(len(p) for p in prompt_ids),
        completion_tokens=statistics.mean(len(c) + 1 for c in comp_ids), valid_file=valid,
    )


def _models(setup: TaskSetup, s: Settings, seed: int, student_dir: Path | None):
    teacher, tok, _ = train_task_teacher(setup.task, **setup.teacher_kwargs)  # cached
    if student_dir is None:
        student = tiny_llama(len(tok), hidden=s.student_hidden, layers=s.student_layers,
                             heads=s.student_heads, max_positions=256, seed=10_000 + seed)
    else:
        student = AutoModelForCausalLM.from_pretrained(student_dir)
    return finish_models(teacher, student, tok)


def _config(s: Settings, setup: TaskSetup, run_dir: Path, method: str, steps: int, seed: int,
            lr: float, ramp: int, min_lr_ratio: float):
    recipe, args = parse_method(method)
    return load_config(None, [
        f"output_dir={run_dir}", f"data.train={setup.train_file}", f"data.eval={setup.eval_file}",
        "data.eval_count=8", "data.chat_template=false",
        f"sampling.max_new_tokens={setup.max_new_tokens}", f"sampling.temperature={s.temperature}",
        f"method.recipe={recipe}", *[f"method.args.{k}={v}" for k, v in args.items()],
        f"train.steps={steps}", f"train.batch_size={s.batch_size}", f"train.lr={lr}",
        f"train.warmup_steps={ramp}", f"train.min_lr_ratio={min_lr_ratio}", f"train.seed={seed}",
        "train.progress=false", f"train.threads={s.threads}",
    ])  # fmt: skip


# ------------------------------------------------------------------------ one run


def run_method(s: Settings, setup: TaskSetup, method: str, seed: int, steps: int, lr: float,
               report=lambda n: None, warmup: bool = False, valid: bool = False) -> dict:
    """Train from the seed's warm-up checkpoint (from scratch if `warmup`), evaluating as we go.

    Training runs in segments that end at the eval points (`distill(stop_after=...)`, then
    `resume=True`), so the curve comes from one run with one learning-rate schedule.
    With `valid` (a learning-rate sweep's run) the end is also scored on the validation split.
    """
    _quiet()
    torch.set_num_threads(s.threads)
    runs = Path(setup.out_dir) / "runs"
    run_dir = runs / f"{'warmup' if warmup else slug(method)}{f'-lr{lr:g}' * valid}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    models = _models(setup, s, seed, None if warmup else runs / f"warmup-seed{seed}" / "student")
    prefixes = prefixes_of(method)
    points = [0, steps] if warmup else sorted({max(1, round(f * steps)) for f in s.eval_points})
    points = points if points[-1] == steps else [*points, steps]
    # The warm-up keeps its lr constant after a 10 % ramp: its checkpoint is mid-training, not
    # annealed, so every method continues a student that is still learning.
    schedule = (steps // 10, 1.0) if warmup else (s.lr_warmup, 0.1)
    curve, flops, seconds, done, losses = [], 0.0, 0.0, 0, []
    for stop in points:
        if stop > done:
            f, sec, seg = train_segment(s, setup, models, run_dir, method, steps, seed, lr,
                                        schedule, done, stop, prefixes)
            flops, seconds = flops + f, seconds + sec
            losses += seg
            report(stop - done)
            done = stop
        curve.append({"step": stop, "flops": flops, "seconds": seconds,
                      **evaluate_student(models, setup, s)})
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return {"method": method, "seed": seed, "steps": steps, "lr": lr, "flops": flops,
            "seconds": seconds, "curve": curve, "final": curve[-1], "losses": losses,
            **({"valid": evaluate_student(models, setup, s, setup.valid_file)} if valid else {})}


def train_segment(s: Settings, setup: TaskSetup, models, run_dir: Path, method: str, steps: int,
                  seed: int, lr: float, schedule: tuple, done: int, stop: int, prefixes):
    """Steps `done`..`stop` of a `steps`-step run (one lr schedule); returns (FLOPs, seconds,
    the steps' losses)."""
    n_s, n_t = flop_params(models.student), flop_params(models.teacher)
    cfg = _config(s, setup, run_dir, method, steps, seed, lr, *schedule)
    t0 = time.perf_counter()
    res = distill(cfg, models=models, resume=done > 0, stop_after=stop, evaluate=False,
                  log=lambda *_: None)
    seconds, flops = time.perf_counter() - t0, 0.0
    for row in res.metrics:  # one per optimizer step; `tokens` = completion tokens
        flops += microbatch_flops(
            n_student=n_s, n_teacher=n_t,
            n_writer=writer_params(prefixes, n_s, n_t, row.get("student_share")),
            prompt_tokens=s.batch_size * cfg.train.grad_accum * setup.prompt_tokens,
            completion_tokens=row["tokens"],
        )
    return flops, seconds, [float(row["loss"]) for row in res.metrics]


def _quiet() -> None:
    """No library progress bars or advisory warnings inside the sweep's own display."""
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _job(queue, kwargs: dict) -> dict:
    return _run(kwargs, queue.put)


def _run(job: dict, report) -> dict:
    if not job.pop("plateau", False):
        return run_method(**job, report=report)
    _quiet()
    torch.set_num_threads(job["s"].threads)
    return run_plateau_warmup(**job, models=_models(job["setup"], job["s"], job["seed"], None),
                              train=train_segment, evaluate=evaluate_student, report=report)


def run_jobs(jobs: list[dict], workers: int, bar) -> list[dict]:
    """`run_method(**job)` for each job, here or in `workers` spawned processes.

    Tiny models leave a core mostly idle on Python overhead, so two one-thread workers on two
    cores finish a sweep in about half the time of one two-thread process.
    """
    if workers <= 1:
        return [_run(dict(job), bar.update) for job in jobs]
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        queue = manager.Queue()
        futures = [pool.submit(_job, queue, job) for job in jobs]
        pending = set(futures)
        while pending:
            _, pending = wait(pending, timeout=0.5)
            while not queue.empty():
                bar.update(queue.get())
        return [f.result() for f in futures]


# ------------------------------------------------------------------------ the sweep


def run_quality(s: Settings, out_dir: Path, log=print) -> dict:
    """The whole sweep for one task; writes `quality.json`, `results.md` and the plot."""
    t0, started_on = time.perf_counter(), machine()
    _quiet()
    torch.set_num_threads(s.threads)
    setup = prepare_task(s, out_dir)
    teacher_seconds = time.perf_counter() - t0
    how = "cached" if setup.teacher_info.get("cached") else f"trained in {teacher_seconds:.0f} s"
    log(f"[{s.task}] teacher: {setup.teacher_info.get('params')} params, held-out accuracy "
        f"{setup.teacher_info.get('accuracy')} ({how})")
    lrs = f"lr swept over {list(dict.fromkeys(s.lrs))}" if len(set(s.lrs)) > 1 else f"lr {s.lr}"
    log(f"[{s.task}] {len(s.methods)} methods ({', '.join(s.methods)}), {s.seeds} seeds, {lrs}; "
        + describe_warmup(s))
    probe = _models(setup, s, 0, None)
    n_s, n_t = flop_params(probe.student), flop_params(probe.teacher)
    step_cost = {m: microbatch_flops(  # estimated FLOPs of one step, C = reference length
        n_student=n_s, n_teacher=n_t, n_writer=writer_params(prefixes_of(m), n_s, n_t),
        prompt_tokens=s.batch_size * setup.prompt_tokens,
        completion_tokens=s.batch_size * setup.completion_tokens,
    ) for m in (*s.methods, "on_policy_rkl")}
    budget = s.budget_gflop * 1e9 if s.budget_gflop else s.steps * step_cost["on_policy_rkl"]
    steps = {m: max(1, round(budget / step_cost[m])) for m in s.methods}
    sweeps = s.seeds + max(0, len(set(s.lrs)) - 1)  # runs per method
    bar = tqdm(total=s.seeds * s.warmup_steps + sweeps * sum(steps.values()), desc=f"bench {s.task}",
               unit="step", disable=not s.progress, dynamic_ncols=True)
    common = dict(s=s, setup=setup)
    warmups = run_jobs([dict(common, method="supervised_kd", seed=seed, steps=s.warmup_steps,
                             lr=s.warmup_lr, warmup=True) for seed in range(s.seeds)],
                       s.workers, bar) if s.warmup == "fixed" else run_jobs(
        [dict(common, seed=seed, plateau=True) for seed in range(s.seeds)], s.workers, bar)
    runs, sweep = run_methods(s, common, steps, warmups, run_jobs, bar)
    bar.close()
    for r in runs:
        log(f"[{s.task}] {r['method']} seed {r['seed']}: accuracy {r['final']['accuracy']:.3f}, "
            f"KL {r['final']['teacher_kl']:.4f}, {r['seconds']:.0f} s")
    # The teacher scored as if it were the student: its accuracy.
    as_student = Models(probe.teacher, probe.teacher, probe.tokenizer, probe.vocab_size)
    settings = dataclasses.asdict(s)  # teacher_preset as a dict (None: the task's preset)
    recovery = teacher_recovery(probe.teacher, probe.tokenizer, s.task, setup.eval_file)
    result = {
        "task": s.task, "settings": settings,
        "machine_at_start": started_on, "machine_at_end": machine(),
        "teacher": {**setup.teacher_info, "flop_params": n_t, **recovery,
                    "eval": evaluate_student(as_student, setup, s)},
        "student": {"flop_params": n_s, "hidden": s.student_hidden, "layers": s.student_layers},
        "compute": {
            "budget_gflop": budget / 1e9, "steps": steps,
            "step_gflop_estimate": {m: step_cost[m] / 1e9 for m in s.methods},
            "prompt_tokens_mean": setup.prompt_tokens,
            "completion_tokens_mean": setup.completion_tokens,
            "max_new_tokens": setup.max_new_tokens,
            "warmup_gflop_mean": statistics.mean(w["flops"] for w in warmups) / 1e9,
        },
        "warmup": warmups, "runs": runs, "summary": summarize(runs, s.methods), "sweep": sweep,
        "wall_seconds": time.perf_counter() - t0, "teacher_seconds": teacher_seconds,
    }
    (out_dir / "quality.json").write_text(json.dumps(result, indent=1, default=str))
    write_report(result, out_dir, log=log)
    return result


def _parser() -> argparse.ArgumentParser:
    p = CliParser(prog="opd bench quality", description=__doc__.split("\n")[0])
    p.add_argument("--task", nargs="+", default=["sort"], help="synthetic tasks: NAME, "
                   "NAME:knob=value,... or a variant (opd.tasks.variants)")
    p.add_argument("--recipes", nargs="*", default=[], help="methods added to --methods")
    p.add_argument("--out", default=None, help="run folder (default runs/bench-quality-<time>)")
    p.add_argument("--no-progress", action="store_true")
    for f in dataclasses.fields(Settings):
        if f.metadata.get("cli", True):
            flag, d = f.metadata.get("flag", "--" + f.name.replace("_", "-")), f.default
            shown = " ".join(map(str, d)) if isinstance(d, tuple) else d
            kw = dict(nargs="+", type=f.metadata["item"]) if isinstance(d, tuple) else dict(
                type=f.metadata.get("type", type(d)))
            kw.update({"choices": f.metadata["choices"]} if "choices" in f.metadata else {})
            doc = f.metadata["doc"].replace("%", "%%")
            doc += "" if d in (None, ()) else f" (default {shown})"
            p.add_argument(flag, dest=f.name, default=d, help=doc, **kw)
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    out = Path(args.pop("out") or f"runs/bench-quality-{time.strftime('%Y%m%d-%H%M%S')}")
    tasks, extra, quiet = args.pop("task"), args.pop("recipes"), args.pop("no_progress")
    args["methods"] = tuple(args["methods"]) + tuple(extra)
    args["eval_points"] = tuple(args["eval_points"])
    for spec in tasks:
        v = task_spec(spec)  # a task, 'task:knob=value,...' or a variant such as chain_fix_long
        run_quality(Settings(task=v.task, knobs=v.knobs or None, teacher_preset=v.preset,
                             progress=not quiet, **args),
                    out / slug(spec) if len(tasks) > 1 else out)
    return 0

