"""Reports: a quality sweep's summary, table and accuracy / KL figures; a speed run's tables.

Numbers are the mean ± sample standard deviation over seeds (± 0 with one seed). The
figures put each method's curve on the compute axis after the shared warm-up (GFLOPs,
counted as in `opd.bench.quality`), starting from the warm-up checkpoint at 0. matplotlib is
optional (`pip install 'opd[plots]'`); without it the figures are skipped with a note.
This module imports no benchmark: only their shared names (method labels, speed sides and
sizes), so the benchmarks import it and not the other way round.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from opd.bench.loss_worker import HIDDEN, VOCAB
from opd.bench.methods import label
from opd.bench.step_workers import SIDES, side_name
from opd.bench.sweep import sweep_markdown


def _pm(mean, std, scale: float = 1.0, digits: int = 1) -> str:
    if mean is None:
        return "—"
    return f"{scale * mean:.{digits}f} ± {scale * (std or 0.0):.{digits}f}"


def _mean_std(xs: list) -> tuple:
    """Mean and sample std of the values that are not None; (None, None) if none is."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(runs: list[dict], methods) -> dict:
    """Per method: mean and sample std over seeds of the final accuracy, both held-out KLs and
    the share of completions with a correction marker; its lr and collapsed runs."""
    out = {}
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        row = {"steps": rs[0]["steps"], "seeds": len(rs), "lr": rs[0]["lr"],
               "gflop_mean": statistics.mean(r["flops"] for r in rs) / 1e9,
               "seconds_mean": statistics.mean(r["seconds"] for r in rs),
               "collapsed": sum(bool(r.get("stability", {}).get("collapsed")) for r in rs)}
        for key in ("accuracy", "teacher_kl", "teacher_fkl", "with_correction"):
            xs = [r["final"][key] for r in rs
                  if r["final"].get(key) is not None and math.isfinite(r["final"][key])]
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std(xs) if xs else (None, None)
        out[m] = row
    return out


def markdown_table(result: dict) -> str:
    """One row per method, plus the teacher, the initial student and the warm-up start."""
    comp = result["compute"]
    lines = [
        "| method | lr | steps | GFLOP spent | accuracy % (greedy, exact match) "
        "| KL(q_student ‖ p_teacher), student text | KL(p_teacher ‖ q_student), teacher text "
        "| completions with a correction % | collapsed runs | seconds / run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    teacher = result["teacher"]["eval"]
    lines.append(f"| teacher ({result['teacher'].get('params')} params) | — | — | — "
                 f"| {100 * teacher['accuracy']:.1f} | 0 | 0 "
                 f"| {_pct(teacher.get('with_correction'))} | — | — |")
    for name, idx in (("student at init", 0), ("warm-up checkpoint (start of every method)", -1)):
        acc, kl, fkl, fix = (_mean_std([w["curve"][idx].get(k) for w in result["warmup"]])
                             for k in ("accuracy", "teacher_kl", "teacher_fkl", "with_correction"))
        spent = f"{comp['warmup_gflop_mean']:.1f} (shared)" if idx == -1 else "0"
        warm = sorted({w["steps"] for w in result["warmup"]})  # per seed when at a plateau
        steps = "/".join(map(str, warm)) if idx == -1 else 0
        lines.append(f"| {name} | — | {steps} | {spent} | {_pm(*acc, 100)} | {_pm(*kl, 1, 4)} "
                     f"| {_pm(*fkl, 1, 4)} | {_pm(*fix, 100)} | — | — |")
    for method, row in result["summary"].items():
        lines.append(
            f"| {label(method)} | {row['lr']:g} | {row['steps']} | {row['gflop_mean']:.1f} "
            f"| {_pm(row['accuracy_mean'], row['accuracy_std'], 100)} "
            f"| {_pm(row['teacher_kl_mean'], row['teacher_kl_std'], 1, 4)} "
            f"| {_pm(row.get('teacher_fkl_mean'), row.get('teacher_fkl_std'), 1, 4)} "
            f"| {_pm(row.get('with_correction_mean'), row.get('with_correction_std'), 100)} "
            f"| {row.get('collapsed', 0)}/{row['seeds']} | {row['seconds_mean']:.0f} |"
        )
    return "\n".join(lines)


def _warmup_steps(result: dict) -> str:
    """'400', or with a plateau warm-up 'to the plateau, 1600/1700/1800' (steps per seed)."""
    if result["settings"].get("warmup") != "plateau":
        return str(result["settings"]["warmup_steps"])
    return "to the plateau, " + "/".join(str(w["steps"]) for w in result["warmup"])


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def paired_markdown(result: dict, base: str = "supervised_kd") -> str:
    """Per method, its final accuracy minus `base`'s on the same seed (same warm-up
    checkpoint), in points: each seed, and mean ± std; '' when `base` was not run."""
    finals = {(r["method"], r["seed"]): r["final"]["accuracy"] for r in result["runs"]}
    seeds = sorted({r["seed"] for r in result["runs"]})
    if not any(m == base for m, _ in finals):
        return ""
    lines = [f"| method − {base} (accuracy points) | "
             + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
             "|---|" + "---:|" * (len(seeds) + 1)]
    for method in result["summary"]:
        if method == base:
            continue
        d = [100 * (finals[method, s] - finals[base, s]) for s in seeds
             if (method, s) in finals and (base, s) in finals]
        lines.append(f"| {label(method)} | " + " | ".join(f"{x:+.1f}" for x in d)
                     + f" | {_pm(*_mean_std(d))} |")
    return "\n".join(lines)


def curves(result: dict) -> dict[str, dict[str, list]]:
    """Per method, the seed-averaged curve: gflop, accuracy (mean, std), KL (mean, std)."""
    start_acc = statistics.mean(w["final"]["accuracy"] for w in result["warmup"])
    start_kl = statistics.mean(w["final"]["teacher_kl"] for w in result["warmup"])
    out = {}
    for method in result["summary"]:
        runs = [r for r in result["runs"] if r["method"] == method]
        c = {"gflop": [0.0], "acc": [start_acc], "acc_sd": [0.0], "kl": [start_kl], "kl_sd": [0.0]}
        for i in range(min(len(r["curve"]) for r in runs)):
            pts = [r["curve"][i] for r in runs]
            c["gflop"].append(statistics.mean(p["flops"] for p in pts) / 1e9)
            for key, name in (("acc", "accuracy"), ("kl", "teacher_kl")):
                m, sd = _mean_std([p[name] for p in pts])
                c[key].append(m)
                c[f"{key}_sd"].append(sd)
        out[method] = c
    return out


def plot(result: dict, path: Path) -> Path | None:
    """Accuracy and KL vs GFLOPs, one line per method with a ± std band; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_acc, ax_kl) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, c in curves(result).items():
        style = "--" if any(k in method for k in ("supervised_kd", "seqkd")) else "-"
        for ax, key, scale in ((ax_acc, "acc", 100), (ax_kl, "kl", 1)):
            mean = [scale * v for v in c[key]]
            sd = [scale * v for v in c[f"{key}_sd"]]
            (line,) = ax.plot(c["gflop"], mean, style, marker="o", ms=3, label=label(method))
            ax.fill_between(c["gflop"], [m - s for m, s in zip(mean, sd)],
                            [m + s for m, s in zip(mean, sd)], color=line.get_color(), alpha=0.15)
    teacher_acc = 100 * result["teacher"]["eval"]["accuracy"]
    ax_acc.axhline(teacher_acc, color="k", lw=0.8, ls=":", label="teacher")
    ax_acc.set(xlabel="GFLOPs after the warm-up", ylabel="held-out accuracy (%)",
               title=f"{result['task']}: accuracy vs compute")
    ax_kl.set(xlabel="GFLOPs after the warm-up", ylabel="KL(q_student ‖ p_teacher), held-out",
              title=f"{result['task']}: teacher KL vs compute", yscale="log")
    ax_acc.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(result: dict, out_dir: Path, log=print) -> Path:
    """`results.md` (table, settings, plot link) and `accuracy_vs_compute.png` in `out_dir`."""
    png = plot(result, out_dir / "accuracy_vs_compute.png")
    s, comp = result["settings"], result["compute"]
    note = (f"![accuracy vs compute]({png.name})" if png else
            "(plots skipped: matplotlib is not installed; `pip install 'opd[plots]'`)")
    text = (
        f"# Quality at equal compute: task `{result['task']}`\n\n"
        f"{s['seeds']} seeds; student {result['student']['layers']} layers × "
        f"{result['student']['hidden']} ({result['student']['flop_params']:,} FLOP-counted "
        f"params), teacher {result['teacher']['flop_params']:,}; batch {s['batch_size']}, "
        + (f"lr per method from the sweep below ({', '.join(map(str, s['lrs']))}) "
           if result.get("sweep") else f"lr {s['lr']} ")
        + f"(warm-up {_warmup_steps(result)} steps of supervised_kd at {s['warmup_lr']}); "
        f"budget {comp['budget_gflop']:.1f} GFLOP per method after the warm-up; up to "
        f"{comp['max_new_tokens']} new tokens, sampling temperature {s['temperature']}.\n"
        f"Wall time {result['wall_seconds'] / 60:.1f} min. Machine at start: "
        f"{result['machine_at_start']}; at end: {result['machine_at_end']}.\n\n"
        + markdown_table(result) + "\n\n" + note + "\n"
    )
    paired = paired_markdown(result)
    text += f"\nPaired per-seed differences:\n\n{paired}\n" if paired else ""
    if result.get("sweep"):
        text += ("\nLearning-rate sweep (seed 0, validation split; opd.bench.sweep):\n\n"
                 + sweep_markdown(result["sweep"]) + "\n")
    path = out_dir / "results.md"
    path.write_text(text)
    log(text)
    return path


def speed_markdown(result: dict) -> str:
    """The markdown tables of a speed run (`opd.bench.speed`)."""
    a, lines = result["settings"], []
    for step in result["step"]:
        lines += [
            f"Step, output vocabulary {step['vocab']}: batch {a['batch']}, ≤ {a['new_tokens']} new "
            f"tokens, temperature {a['temperature']}, β = {a['beta']}, {a['threads']} torch "
            f"thread(s), {a['steps'] - a['skip']} measured steps × {a['repeats']} fresh processes "
            "per side.", "",
            "| side | s / step (median) | completion tokens / s | tokens / CPU s | tokens / step "
            "| peak − baseline RSS (MB) | peak RSS (MB) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for side in SIDES:
            if side in step:
                r = step[side]
                name = side_name(side, result["trl"], r["repeats"][0].get("trainer"))
                lines.append(f"| {name} | {r['seconds_per_step']:.3f} | {r['tokens_per_s']:.0f} "
                             f"| {r['tokens_per_cpu_s']:.0f} | {r['tokens_per_step']:.0f} "
                             f"| {r['peak_mb']:.0f} | {r['peak_rss_mb']:.0f} |")
        if "speedup_tokens_per_s" in step:
            lines.append(f"| **opd / TRL** | | **{step['speedup_tokens_per_s']:.2f}×** "
                         f"| **{step['speedup_tokens_per_cpu_s']:.2f}×** | | "
                         f"{step['peak_ratio']:.2f}× | |")
        lines.append("")
    if result["loss"]:
        lines += [f"Loss: generalized JSD β = {a['loss_beta']}, V = {VOCAB:,}, D = {HIDDEN}, "
                  "float32, one forward + backward, fresh process per row.", "",
                  "| N | path | peak − baseline RSS (MB) | seconds | max abs diff vs materialized |",
                  "|---:|---|---:|---:|---:|"]
        for r in result["loss"]:
            lines.append(f"| {r['n']} | {r['mode']} | {r['peak_mb']:.0f} | {r['seconds']:.2f} "
                         f"| {r['max_abs_diff']:.1e} |")
    return "\n".join(lines)
