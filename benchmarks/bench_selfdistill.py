"""Does self-distillation with the solution in context raise accuracy with no external teacher?

The experiment (issue 11's "must show"), per seed:

1. Warm-up. A tiny character-level Llama (`opd.tiny`, 2 layers x 64 wide) is trained from
   scratch by supervised next-token cross-entropy on a mixture of two views of the same task:
   half of each batch is the plain prompt `"sort: 5 3 9 1\\n"`, half the privileged prompt
   `"hint 1 3 5 9\\nsort: 5 3 9 1\\n"` (the opsd teacher template `hint {context}\\n{prompt}`
   with the row's `solution` = the answer), both followed by the completion. The warm-up is
   stopped early (`--warmup-steps`), while the plain view is still poor and the privileged
   view (a copy task) is already good: a model that can USE its context but cannot yet solve
   the task alone. This is the regime self-distillation is for (the model as its own teacher
   under privileged information); a model that never saw the context format cannot use it,
   which is why the warm-up includes the privileged view.
2. `opd distill recipe=opsd model.teacher=self` from that checkpoint: the student writes on
   the PLAIN prompt, the frozen warm-up model scores the same tokens under the privileged
   prompt, JSD_0.5 between them on the student's own tokens. No external teacher exists.
3. Greedy exact-match accuracy (the task verifier) on 200 held-out plain prompts before and
   after, and the privileged-view accuracy of the warm-up checkpoint (what the teacher knows).

Reported: per-seed rows, mean ± sample std, and the paired (after − before) difference.
Control: the same opsd run with each row's solution replaced by another row's (same format,
no information about this row), which separates what the privileged context contributes
from the self-training dynamics alone.

    .venv/bin/python benchmarks/bench_selfdistill.py --seeds 3 --out benchmarks/results_selfdistill
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from opd.config import load_config
from opd.tasks import get_task
from opd.tasks.teacher import EVAL_SEED, encode_sft_batch, evaluate_accuracy
from opd.tiny import char_tokenizer, tiny_llama
from opd.train import distill

TEMPLATE = "hint {context}\n{prompt}"


def rows(task, rng: random.Random, n: int, avoid: set[str] = frozenset()) -> list[dict]:
    out = []
    while len(out) < n:
        row = task.sample(rng, **task.resolve_knobs(None))
        if row["prompt"] not in avoid:
            out.append({**row, "solution": row["answer"]})
    return out


def privileged(row: dict) -> dict:
    return {**row, "prompt": TEMPLATE.format(prompt=row["prompt"], context=row["solution"])}


def warm_up(task, tok, seed: int, steps: int, eval_prompts: set[str], lr: float = 3e-3):
    torch.manual_seed(seed)
    model = tiny_llama(len(tok), hidden=64, layers=2, heads=4, max_positions=256, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        batch = rows(task, rng, 64, eval_prompts)
        batch = batch[:32] + [privileged(r) for r in batch[32:]]
        ids, attn, labels = encode_sft_batch(tok, batch)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


def accuracy(model, tok, task, eval_rows) -> float:
    return evaluate_accuracy(model, tok, task, eval_rows)


def one_seed(args, seed: int, out: Path) -> dict:
    task, tok = get_task(args.task), char_tokenizer()
    eval_rows = rows(task, random.Random(EVAL_SEED + seed), 200)
    avoid = {r["prompt"] for r in eval_rows}
    t0 = time.perf_counter()
    model = warm_up(task, tok, seed, args.warmup_steps, avoid)
    warm_dir = out / f"warmup-seed{seed}"
    model.save_pretrained(warm_dir)
    tok.save_pretrained(warm_dir)
    before = accuracy(model, tok, task, eval_rows)
    before_priv = accuracy(model, tok, task, [privileged(r) for r in eval_rows])
    train = rows(task, random.Random(seed + 777), 2000, avoid)
    t1 = time.perf_counter()
    res = run_opsd(args, seed, out / f"opsd-seed{seed}", warm_dir, train, eval_rows)
    t2 = time.perf_counter()
    after = accuracy(res.models.student.eval(), tok, task, eval_rows)
    # Control: the same run with each row's solution replaced by another row's (same format,
    # no information about this row): isolates what the privileged context contributes.
    shuffled = [r["solution"] for r in train]
    random.Random(seed).shuffle(shuffled)
    control = [{**r, "solution": s} for r, s in zip(train, shuffled)]
    res_c = run_opsd(args, seed, out / f"control-seed{seed}", warm_dir, control, eval_rows)
    after_control = accuracy(res_c.models.student.eval(), tok, task, eval_rows)
    return {
        "seed": seed,
        "before": before,
        "before_privileged": before_priv,
        "after": after,
        "after_control": after_control,
        "warmup_s": round(t1 - t0, 1),
        "opsd_s": round(t2 - t1, 1),
        "final_loss": res.metrics[-1]["loss"] if res.metrics else None,
    }


def run_opsd(args, seed: int, run_dir: Path, warm_dir: Path, train: list, eval_rows: list):
    train_file = run_dir.with_suffix(".train.jsonl")
    train_file.write_text("".join(json.dumps(r) + "\n" for r in train))
    eval_file = run_dir.with_suffix(".eval.jsonl")
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in eval_rows[:16]))
    cfg = load_config(None, [
        f"output_dir={run_dir}", "model.teacher=self", f"model.student={warm_dir}",
        f"data.train={train_file}", f"data.eval={eval_file}", "data.chat_template=false",
        "sampling.max_new_tokens=24", "sampling.temperature=1.0",
        "method.recipe=opsd", f"method.args.template={TEMPLATE!r}",
        f"train.steps={args.steps}", "train.batch_size=32", f"train.lr={args.lr}",
        "train.warmup_steps=5", f"train.seed={seed}", "train.progress=false",
        "train.threads=1",
    ])  # fmt: skip
    return distill(cfg, evaluate=False, log=lambda *_: None)


def _pm(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * statistics.mean(xs):.1f} ± {100 * sd:.1f}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="sort")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--warmup-steps", type=int, default=400)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--out", default="benchmarks/results_selfdistill")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in range(args.seeds):
        results.append(one_seed(args, seed, out / "runs"))
        print(json.dumps(results[-1]), flush=True)
    diffs = [r["after"] - r["before"] for r in results]
    lines = [
        f"# Self-distillation (opsd, solution in context) on `{args.task}`", "",
        f"Warm-up {args.warmup_steps} steps (half plain, half privileged prompts), then "
        f"{args.steps} opsd steps (batch 32, lr {args.lr}, frozen self-teacher, JSD 0.5). "
        "Greedy exact match on 200 held-out plain prompts, %.", "",
        "| seed | privileged view (teacher) | student before | after opsd | after − before "
        "| after control (shuffled solutions) |",
        "|---|---|---|---|---|---|",
        *[f"| {r['seed']} | {100 * r['before_privileged']:.1f} | {100 * r['before']:.1f} | "
          f"{100 * r['after']:.1f} | {100 * (r['after'] - r['before']):+.1f} | "
          f"{100 * r['after_control']:.1f} |" for r in results],
        f"| mean ± std | {_pm([r['before_privileged'] for r in results])} | "
        f"{_pm([r['before'] for r in results])} | {_pm([r['after'] for r in results])} | "
        f"{_pm(diffs)} | {_pm([r['after_control'] for r in results])} |", "",
        "Seconds per seed (warm-up + evaluation, opsd): "
        + ", ".join(f"{r['warmup_s']} + {r['opsd_s']}" for r in results), "",
    ]  # fmt: skip
    (out / "results.md").write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps({"args": vars(args), "runs": results}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
