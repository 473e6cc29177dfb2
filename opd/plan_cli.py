"""`opd plan [--config FILE] [key=value ...]`: the predicted cost of a run (opd.plan).

Model sizes come from the config's model folders (their config.json; `embedded` is
SmolLM2-135M-Instruct; a student pruned from the teacher keeps `model.student_layers` of its
layers) or from `--teacher-shape` / `--student-shape`; the device numbers from
`--calibrate` (measured now; `--save FILE` keeps them), `--device FILE`, or
`--flops` / `--bandwidth` (then without latencies).
"""

from __future__ import annotations

import json
from pathlib import Path

from opd.errors import ConfigError
from opd.plan import Shape, Workload, peak_memory_bytes, staged_split, step_flops, variants

EMBEDDED = Shape(hidden=576, layers=30, intermediate=1536, vocab=49152, heads=9, kv_heads=3,
                 tied=True)  # fmt: skip
DEFAULT_PROMPT_TOKENS = 64
SHAPE_HELP = "hidden=576,layers=30,intermediate=1536,vocab=49152[,heads=9,kv_heads=3,tied=1]"


def add_plan_arguments(p) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--config", help="a YAML config file")
    p.add_argument("--calibrate", action="store_true", help="measure this device first (~1 min)")
    p.add_argument("--save", metavar="FILE", help="with --calibrate: write the device JSON here")
    p.add_argument("--device", metavar="FILE", help="device JSON from --calibrate --save")
    p.add_argument("--flops", type=float, help="effective FLOP/s (instead of a device file)")
    p.add_argument("--bandwidth", type=float, default=1e10, help="memory bytes/s with --flops")
    p.add_argument("--threads", type=int, default=0, help="torch threads when calibrating")
    p.add_argument(
        "--cpu-seconds",
        action="store_true",
        help="with --calibrate --threads 1: "
        "time this thread's CPU seconds (an idle machine's speed on a busy one)",
    )
    p.add_argument(
        "--prompt-tokens", type=float, help=f"mean prompt length (default {DEFAULT_PROMPT_TOKENS})"
    )
    p.add_argument("--completion-tokens", type=float, help="mean completion length (default "
                   "sampling.max_new_tokens: random students rarely stop)")  # fmt: skip
    p.add_argument("--teacher-shape", help=f"the teacher's size, e.g. {SHAPE_HELP}")
    p.add_argument("--student-shape", help="the student's size, same form")
    p.add_argument(
        "--budget-hours", type=float, help="budget (default: train.steps on-policy steps)"
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def parse_shape(text: str, option: str) -> Shape:
    keys = {"hidden", "layers", "intermediate", "vocab", "heads", "kv_heads", "tied"}
    vals = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, eq, value = item.partition("=")
        if (
            not eq
            or key not in keys
            or not value.isdigit()
            or int(value) < (key == "tied" and 0 or 1)
        ):
            raise ConfigError(f"{option}: bad item {item!r}; expected {SHAPE_HELP}")
        vals[key] = int(value)
    missing = [k for k in ("hidden", "layers", "intermediate", "vocab") if k not in vals]
    if missing:
        raise ConfigError(f"{option}: {missing[0]} is missing; expected {SHAPE_HELP}")
    return Shape(**{**vals, "tied": bool(vals.get("tied", 0))})


def shape_of_folder(path: str, what: str) -> Shape:
    if path == "embedded":
        return EMBEDDED
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(
            f"model.{what}='{path}': no config.json to read its size from (a served, GGUF or "
            f"Hub model): give --{what}-shape {SHAPE_HELP}"
        )
    try:
        c = json.loads(cfg_file.read_text())
        c = c.get("text_config", c)
        return Shape(
            hidden=int(c["hidden_size"]), layers=int(c["num_hidden_layers"]),
            intermediate=int(c["intermediate_size"]), vocab=int(c["vocab_size"]),
            heads=int(c.get("num_attention_heads", 1)),
            kv_heads=int(c.get("num_key_value_heads") or c.get("num_attention_heads", 1)),
            tied=bool(c.get("tie_word_embeddings", False)),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(
            f"'{cfg_file}': cannot read the model size ({type(err).__name__}: {err}); "
            f"give --{what}-shape {SHAPE_HELP}"
        ) from None


def shapes(cfg, args) -> tuple[Shape, Shape]:
    teacher_src = cfg.model.teacher.split(",")[0].strip()
    if args.teacher_shape:
        teacher = parse_shape(args.teacher_shape, "--teacher-shape")
    else:
        teacher = shape_of_folder(teacher_src, "teacher")
    if args.student_shape:
        student = parse_shape(args.student_shape, "--student-shape")
    elif cfg.model.student:
        student = shape_of_folder(cfg.model.student, "student")
    else:  # pruned from the teacher
        student = Shape(
            **{**teacher.__dict__, "layers": min(cfg.model.student_layers, teacher.layers)}
        )
    return teacher, student


def workload(cfg, args) -> tuple[Workload, str]:
    from opd.bench.flops import writer_params
    from opd.recipes import get_recipe
    from opd.run_setup import build_method

    info = get_recipe(cfg.method.recipe)
    prefixes = build_method(cfg).prefixes
    bpp = 2 if cfg.model.dtype in ("bfloat16", "float16", "bf16", "fp16") else 4
    return Workload(
        batch=cfg.train.batch_size * cfg.train.grad_accum,
        prompt_tokens=args.prompt_tokens or DEFAULT_PROMPT_TOKENS,
        completion_tokens=args.completion_tokens or cfg.sampling.max_new_tokens,
        student_writes=writer_params(prefixes, 1.0, 0.0),
        teacher_writes=writer_params(prefixes, 0.0, 1.0),
        teacher_scores=info.access != "black-box",
        full_vocab_loss=info.access == "white-box",
        chunk_size=cfg.train.chunk_size,
        bytes_per_param=bpp,
    ), info.access  # fmt: skip


def device(args):
    from opd.plan import Device
    from opd.plan_device import calibrate, load_device, save_device

    if args.cpu_seconds and (not args.calibrate or args.threads != 1):
        raise ConfigError(
            "--cpu-seconds needs --calibrate --threads 1 (CPU seconds of one "
            "thread are its wall seconds on an idle machine; of N threads, not)"
        )
    if args.calibrate:
        import time

        dev = calibrate(args.threads, time.thread_time if args.cpu_seconds else None)
        if args.save:
            save_device(dev, args.save)
        return dev
    if args.device:
        return load_device(args.device)
    if args.flops:
        if args.flops <= 0 or args.bandwidth <= 0:
            raise ConfigError("--flops and --bandwidth must be > 0")
        return Device(fwd_flops=args.flops, bandwidth=args.bandwidth)
    raise ConfigError("opd plan needs the device's speed: --calibrate, --device FILE, or "
                      "--flops X [--bandwidth Y]")  # fmt: skip


def make_plan(cfg, args) -> dict:
    teacher, student = shapes(cfg, args)
    w, access = workload(cfg, args)
    dev = device(args)
    steps = variants(student, teacher, w, dev)
    on = steps["on_policy"]
    budget = args.budget_hours * 3600 if args.budget_hours else cfg.train.steps * on["total"]
    return {
        "recipe": cfg.method.recipe, "teacher_access": access,
        "teacher": teacher.__dict__, "student": student.__dict__,
        "params": {"teacher": teacher.total_params, "student": student.total_params},
        "workload": w.__dict__, "device": dev.__dict__,
        "step_seconds": on, "step_flops_eq35": step_flops(student, teacher, w),
        "steps": cfg.train.steps, "wall_seconds": cfg.train.steps * on["total"],
        "peak_memory_bytes": peak_memory_bytes(student, teacher, w),
        "budget_seconds": budget, "stage_steps": staged_split(budget, on, steps["off_policy"], steps["reward"]),
        "stage_step_seconds": {k: v["total"] for k, v in steps.items()},
    }  # fmt: skip


def render(plan: dict) -> str:
    w, dev, sec, fl = (
        plan["workload"],
        plan["device"],
        plan["step_seconds"],
        plan["step_flops_eq35"],
    )
    lines = [
        f"opd plan: recipe {plan['recipe']} (teacher access: {plan['teacher_access']}), "
        f"{w['batch']} prompts × ({w['prompt_tokens']:g} prompt + {w['completion_tokens']:g} "
        "completion tokens) per step",
        f"student {plan['student']['layers']} × {plan['student']['hidden']} "
        f"({plan['params']['student'] / 1e6:.1f} M parameters), teacher "
        f"{plan['teacher']['layers']} × {plan['teacher']['hidden']} "
        f"({plan['params']['teacher'] / 1e6:.1f} M), vocabulary {plan['student']['vocab']}",
        f"device ({dev['name']}): {dev['fwd_flops'] / 1e9:.1f} GFLOP/s forward at width 512, "
        f"{dev['bandwidth'] / 1e9:.1f} GB/s memory, {dev['threads'] or 'default'} threads",
        "",
        f"{'per step':<20}{'seconds':>10}{'share':>8}{'GFLOPs (eq. 35)':>18}",
    ]
    for key, label in (("generation", "student generation"), ("teacher", "teacher scoring"),
                       ("student", "student fwd + bwd"), ("loss", "loss (vocabulary)")):  # fmt: skip
        flops = f"{fl[key] / 1e9:.2f}" if key in fl else "—"
        share = sec[key] / max(sec["total"], 1e-12)
        lines.append(f"  {label:<18}{sec[key]:>10.4f}{share:>8.0%}{flops:>18}")
    lines.append(f"  {'total':<18}{sec['total']:>10.4f}")
    mem = plan["peak_memory_bytes"]
    lines += [
        "",
        f"wall time for train.steps={plan['steps']}: {plan['wall_seconds'] / 60:.1f} min "
        "(training steps only; evaluations, loading and checkpoints not included)",
        f"peak memory ≈ {mem['total'] / 2**30:.2f} GiB ({mem['after loading'] / 2**30:.2f} "
        "GiB beyond the weights; the phases' parts do not all coexist): "
        + ", ".join(
            f"{k} {v / 2**20:.0f} MiB"
            for k, v in mem.items()
            if k not in ("total", "after loading")
        ),
        "",
        f"staged split of a {plan['budget_seconds'] / 3600:.2f} h budget (survey: 60–70 % "
        "off-policy, 20–30 % on-policy, 10 % reward refinement):",
    ]
    per = plan["stage_step_seconds"]
    for (name, share, seconds, steps), key in zip(
        plan["stage_steps"], ("off_policy", "on_policy", "reward")
    ):
        lines.append(f"  {name:<24}{share:>5.0%}  {seconds / 60:8.1f} min  {steps:>8} steps "
                     f"of {per[key]:.4f} s")  # fmt: skip
    return "\n".join(lines)


def run_plan(args) -> int:
    from opd.config import load_config

    cfg = load_config(args.config, args.overrides)
    plan = make_plan(cfg, args)
    print(json.dumps(plan, indent=1) if args.json else render(plan))
    if args.calibrate and args.save:
        print(f"device numbers saved to {args.save} (pass them back with --device {args.save})")
    return 0
