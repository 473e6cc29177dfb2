"""What distillation costs: opd vs TRL per training step, and the chunked-loss microbenchmark.

1. Step benchmark. opd (`distill` with `gkd`, λ = 1; at β = 1 with `on_policy_rkl`, the same
   objective) and TRL's `DistillationTrainer` (trl ≥ 1.x; `GKDTrainer` with `lmbda=1` where
   only that exists) train the same randomly initialised tiny Llama student (2 × 128) against
   the same teacher (4 × 256), built from the same seeds, on the same prompts (the `sort`
   task), with the same batch, max_new_tokens, stop tokens (eos and <|im_end|>), sampling
   temperature, β, learning rate, float32 and torch threads. TRL's defaults bf16 and gradient
   checkpointing are turned off, because opd uses neither. A step is everything from the
   prompts to the optimizer update: student sampling, both scoring forwards, the loss,
   backward, clipping, AdamW. It runs with each output vocabulary of `--vocabs`: the
   105-token character vocabulary, and 49,152 rows (SmolLM2's size) on the same bodies.

       seconds / step          median over the measured steps (the first `--skip` dropped)
       completion tokens / s   Σ completion tokens / Σ step seconds over the measured steps
                               (a completion's stop token counts; padding does not)
       tokens / CPU second     all completion tokens / process CPU time of the training call
                               (the least disturbed by other jobs on a shared machine)
       peak memory             peak RSS − RSS just before training, in a fresh process per
                               side, after its libraries, models and data are loaded and one
                               save + generate call has loaded that code; the absolute peak
                               RSS is reported too (TRL imports more libraries)

   Each side runs in `--repeats` fresh processes, alternating opd, TRL, opd, ...; the median
   over processes is reported (peak memory: the largest). One torch thread by default: on a
   machine shared with other jobs, two OpenMP threads on two cores can be many times slower.

2. Loss microbenchmark. One forward + backward of a per-token generalized JSD (β = 0.5 by
   default) at V = 49,152, D = 576 (SmolLM2's sizes) and N ∈ {512, 2048, 4096} rows:
   opd's chunked path (`chunked_divergence`, row chunks of 1024; its backward recomputes
   both heads' logits), opd's one-pass path (`chunked_weighted_divergence` with c_n = 1/N,
   the trainer's path for unweighted divergence recipes: the gradient is taken in the
   forward pass), opd's materialized path (the (N, V) logits, `divergence`), and TRL's `ChunkedDivergenceFunction` (its CPU tile
   path: 4096-row × 32,768-column tiles). Memory is measured as in
   `benchmarks/bench_chunked.py`: a fresh process per configuration, the peak-RSS counter
   reset after the inputs exist (`/proc/self/clear_refs`), peak − baseline reported. The
   per-token values of every path are compared with opd's materialized reference.

Deviations: TRL's trainer generates through `unwrap_model_for_generation` and logs through
`transformers.Trainer`; those costs are part of what is measured (they are what a user pays).
opd writes a checkpoint at the end of the run and TRL (`save_strategy="no"`) does not; it
falls inside opd's numbers. Random students rarely emit a stop token, so completions are
close to max_new_tokens on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from opd.bench.memory import peak_kb, reset_peak

VOCAB, HIDDEN = 49_152, 576
INSTALL_HINT = "pip install 'opd[bench]'"


def trl_version() -> str | None:
    try:
        import trl
    except ImportError:
        return None
    return trl.__version__


# ------------------------------------------------------------------------ step workers


def tiny_pair(vocab: int = 0):
    """The benchmark's (teacher, student, tokenizer): 4 × 256 and 2 × 128 Llamas.

    `vocab` > 0 gives both models that many output rows (e.g. SmolLM2's 49,152) on top of the
    105-token character tokenizer: the extra rows are never prompt tokens but are sampled,
    projected and distilled like real ones, so the lm_head and the loss cost what they would
    with a real vocabulary.
    """
    from opd.tiny import char_tokenizer, tiny_llama

    tok = char_tokenizer()
    v = vocab or len(tok)
    teacher = tiny_llama(v, hidden=256, layers=4, heads=4, seed=1)
    student = tiny_llama(v, hidden=128, layers=2, heads=4, seed=2)
    return teacher, student, tok


def prompts(n: int = 256) -> list[str]:
    from opd.tasks import get_task

    return [r["prompt"] for r in get_task("sort").generate(n, seed=0)]


def _summary(seconds: list[float], tokens: list[int], skip: int, base_kb: int,
             cpu_seconds: float) -> dict:
    sec, tok = seconds[skip:], tokens[skip:]
    return {
        # Process CPU time of the whole training call (every step, warm-up and the final
        # save included): less sensitive than wall time to other jobs on a shared machine.
        "cpu_seconds_per_step": cpu_seconds / len(seconds),
        "tokens_per_cpu_s": sum(tokens) / cpu_seconds,
        "steps_measured": len(sec),
        "seconds_per_step": statistics.median(sec),
        "tokens_per_s": sum(tok) / sum(sec),
        "tokens_per_step": statistics.mean(tok),
        "peak_mb": (peak_kb() - base_kb) / 1024,
        "peak_rss_mb": peak_kb() / 1024,
    }


def _prewarm(student, tok) -> None:
    """Load, before the memory baseline, the library code both sides use (saving, generation),
    so that peak − baseline counts training memory rather than lazily imported modules."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        student.save_pretrained(tmp)
    ids = torch.tensor([tok("sort: 1 2\n", add_special_tokens=False)["input_ids"]])
    student.generate(ids, max_new_tokens=2, do_sample=True, pad_token_id=tok.pad_token_id)


def _opd_recipe(beta: float) -> list[str]:
    """opd's name for TRL's on-policy objective: GKD with λ = 1 and β (at β = 1 the logged
    KL(q_student ‖ p_teacher) reuses the loss values, as for `on_policy_rkl`)."""
    return ["method.recipe=gkd", "method.args.lmbda=1.0", f"method.args.beta={beta}"]


def worker_opd(a) -> dict:
    import torch

    from opd.build import finish_models
    from opd.config import load_config
    from opd.train import distill

    torch.set_num_threads(a.threads)
    teacher, student, tok = tiny_pair(a.vocab)
    models = finish_models(teacher, student, tok)
    _prewarm(student, tok)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp, "prompts.jsonl")
        data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts()))
        cfg = load_config(None, [
            f"output_dir={tmp}/run", f"data.train={data}", f"data.eval={data}",
            "data.eval_count=1", "data.chat_template=false", *_opd_recipe(a.beta),
            f"train.steps={a.steps}",
            f"train.batch_size={a.batch}", f"train.lr={a.lr}", "train.progress=false",
            f"sampling.max_new_tokens={a.new_tokens}", f"sampling.temperature={a.temperature}",
            f"train.threads={a.threads}", f"sampling.backend={a.backend}",
        ])  # fmt: skip
        base, cpu = reset_peak(), time.process_time()
        res = distill(cfg, models=models, evaluate=False, log=lambda *_: None)
        cpu = time.process_time() - cpu
    rows = res.metrics
    return {"side": "opd", "backend": a.backend, **_summary([r["seconds"] for r in rows], [r["tokens"] for r in rows],
                                      a.skip, base, cpu)}


def worker_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from opd.build import finish_models

    torch.set_num_threads(a.threads)
    teacher, student, tok = tiny_pair(a.vocab)
    # The same stop tokens as opd (eos and <|im_end|>); TRL reads them from here.
    student.generation_config.eos_token_id = list(finish_models(teacher, student, tok).stop_ids)
    _prewarm(student, tok)
    common = dict(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=a.batch, max_steps=a.steps,
        learning_rate=a.lr, lr_scheduler_type="cosine", temperature=a.temperature,
        max_completion_length=a.new_tokens, bf16=False, fp16=False, gradient_checkpointing=False,
        report_to="none", save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, max_grad_norm=1.0, seed=0, beta=a.beta,
    )
    try:
        from trl import DistillationConfig as Config
        from trl import DistillationTrainer as Trainer
    except ImportError:  # older TRL: GKD with lmbda = 1 is the same on-policy method
        from trl import GKDConfig as Config
        from trl import GKDTrainer as Trainer

        common["lmbda"] = 1.0
    seconds, tokens = [], []

    class Counted(Trainer):
        """Counts the completion tokens of each generated batch (completion_mask sums)."""

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            tokens.append(int(out["completion_mask"].sum()))
            return out

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            seconds.append(time.perf_counter() - self.t0)

    dataset = Dataset.from_list([{"prompt": p} for p in prompts()])
    trainer = Counted(model=student, teacher_model=teacher, args=Config(**common),
                      train_dataset=dataset, processing_class=tok, callbacks=[Clock()])
    base, cpu = reset_peak(), time.process_time()
    trainer.train()
    cpu = time.process_time() - cpu
    return {"side": "trl", "trainer": Trainer.__name__,
            **_summary(seconds, tokens, a.skip, base, cpu)}


# ------------------------------------------------------------------------ loss worker


def loss_inputs(n: int, seed: int = 0):
    """Random (student hidden, student head, teacher hidden, teacher head) at V = VOCAB,
    D = HIDDEN, float32; the student's two require grad. Shared by the loss benchmarks."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    h_s_ND = torch.randn(n, HIDDEN, generator=gen).requires_grad_()
    w_s_VD = (torch.randn(VOCAB, HIDDEN, generator=gen) / HIDDEN**0.5).requires_grad_()
    h_t_ND = torch.randn(n, HIDDEN, generator=gen)
    w_t_VD = torch.randn(VOCAB, HIDDEN, generator=gen) / HIDDEN**0.5
    return h_s_ND, w_s_VD, h_t_ND, w_t_VD


def worker_loss(a) -> dict:
    import torch

    from opd.losses import chunked_divergence, chunked_weighted_divergence, divergence

    torch.set_num_threads(a.threads)
    h_s_ND, w_s_VD, h_t_ND, w_t_VD = loss_inputs(a.n)

    def step(hs, ht):
        if a.mode == "opd_one_pass":  # the trainer's path: Σ c_n D_n, gradient in the forward
            coef_N = torch.full((hs.shape[0],), 1.0 / hs.shape[0])
            loss, values_N = chunked_weighted_divergence(
                "generalized_jsd", hs, w_s_VD, ht, w_t_VD, coef_N, chunk_size=a.chunk_size,
                beta=a.beta)
            loss.backward()
            return values_N
        if a.mode == "opd_chunked":
            values_N = chunked_divergence("generalized_jsd", hs, w_s_VD, ht, w_t_VD,
                                          chunk_size=a.chunk_size, beta=a.beta)
        elif a.mode == "opd_materialized":
            with torch.no_grad():
                logits_t_NV = ht @ w_t_VD.T
            values_N = divergence("generalized_jsd", hs @ w_s_VD.T, logits_t_NV, beta=a.beta)
        else:
            from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

            values_N, _ = ChunkedDivergenceFunction.apply(
                hs, w_s_VD, None, ht, w_t_VD, None, a.beta, 1.0, 1.0, None, 1.0, None)
        values_N.mean().backward()
        return values_N.detach()

    step(h_s_ND[:8].detach().requires_grad_(), h_t_ND[:8])  # kernels, thread pools
    w_s_VD.grad = None
    base = reset_peak()
    t0 = time.perf_counter()
    values_N = step(h_s_ND, h_t_ND)
    seconds = time.perf_counter() - t0
    torch.save(values_N, a.values_out)
    return {"mode": a.mode, "n": a.n, "peak_mb": (peak_kb() - base) / 1024, "seconds": seconds}


# ------------------------------------------------------------------------ the parent


def _spawn(args: list[str]) -> dict:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "HF_HUB_OFFLINE": "1",
           "TQDM_DISABLE": "1"}
    out = subprocess.run([sys.executable, "-m", "opd.bench.speed", "--worker", *args],
                         capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {args[:1]} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_bench(a, log=print) -> dict:
    """opd and TRL (if importable) alternately, `repeats` times each, in fresh processes.

    Per side, the reported numbers are the medians over repeats (peak memory: the largest).
    """
    flags = ["--steps", str(a.steps), "--skip", str(a.skip), "--batch", str(a.batch),
             "--new-tokens", str(a.new_tokens), "--beta", str(a.beta), "--lr", str(a.lr),
             "--temperature", str(a.temperature), "--threads", str(a.threads),
             "--vocab", str(a.vocab)]
    sides = [s for s in a.sides if s != "trl" or trl_version()]
    if "trl" in a.sides and "trl" not in sides:
        log(f"TRL is not installed: only opd's numbers are reported ({INSTALL_HINT} adds it)")
    runs = {side: [] for side in sides}
    for _ in range(a.repeats):
        for side in sides:
            worker = ["trl"] if side == "trl" else ["opd", "--backend", SIDES[side]]
            runs[side].append(_spawn([*worker, *flags]))
    out = {"vocab": a.vocab or "char (105)"}
    log(f"step benchmark, output vocabulary {out['vocab']}:")
    for side, rs in runs.items():
        out[side] = {"repeats": rs, **{k: statistics.median(r[k] for r in rs) for k in (
            "seconds_per_step", "tokens_per_s", "tokens_per_step", "cpu_seconds_per_step",
            "tokens_per_cpu_s")},
            "peak_mb": max(r["peak_mb"] for r in rs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)}
        name = side_name(side, trl_version(), rs[0].get("trainer"))
        log(f"{name}: {out[side]['seconds_per_step']:.3f} s/step, "
            f"{out[side]['tokens_per_s']:.0f} completion tokens/s "
            f"({out[side]['tokens_per_cpu_s']:.0f} per CPU second), "
            f"peak +{out[side]['peak_mb']:.0f} MB (RSS {out[side]['peak_rss_mb']:.0f} MB)")
    if "trl" in out:
        out["speedup_tokens_per_s"] = out["opd"]["tokens_per_s"] / out["trl"]["tokens_per_s"]
        out["speedup_tokens_per_cpu_s"] = (out["opd"]["tokens_per_cpu_s"]
                                           / out["trl"]["tokens_per_cpu_s"])
        out["peak_ratio"] = out["opd"]["peak_mb"] / max(out["trl"]["peak_mb"], 1e-9)
        log(f"opd / TRL completion tokens/s: {out['speedup_tokens_per_s']:.2f}x (per CPU second "
            f"{out['speedup_tokens_per_cpu_s']:.2f}x); peak memory opd / TRL: {out['peak_ratio']:.2f}")
    return out


def loss_bench(a, log=print) -> list[dict]:
    import torch

    modes = ["opd_materialized", "opd_chunked", "opd_one_pass"] + (
        ["trl_chunked"] if trl_version() else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.loss_n:
            ref = None
            for mode in modes:
                values = Path(tmp, f"{mode}.pt")
                r = _spawn(["loss", "--mode", mode, "--n", str(n), "--beta", str(a.loss_beta),
                            "--chunk-size", str(a.chunk_size), "--threads", str(a.threads),
                            "--values-out", str(values)])
                v = torch.load(values)
                ref = v if ref is None else ref
                r["max_abs_diff"] = float((v - ref).abs().max())
                rows.append(r)
                log(f"loss N={n:5d} {mode:17s} peak {r['peak_mb']:7.0f} MB  {r['seconds']:6.2f} s"
                    f"  |Δ vs materialized| {r['max_abs_diff']:.1e}")
    return rows


SIDES = {"opd": "auto", "opd-hf": "hf", "trl": None}  # side -> opd's sampling.backend


def side_name(side: str, trl: str | None = None, trainer: str | None = None) -> str:
    if side == "trl":
        return f"TRL {trl} `{trainer}`"
    return "opd" if side == "opd" else "opd, sampling.backend=hf (Hugging Face generate)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="opd bench speed", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=12, help="training steps per process")
    p.add_argument("--skip", type=int, default=2, help="first steps left out (warm-up)")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per side, alternating")
    p.add_argument("--sides", nargs="+", choices=sorted(SIDES), default=["opd", "trl"],
                   help="what to run: opd (default decoding), opd-hf (opd with Hugging Face "
                   "generate), trl")
    p.add_argument("--backend", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--beta", type=float, default=1.0, help="generalized JSD β of both sides")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--vocabs", type=int, nargs="+", default=[0, VOCAB],
                   help="output vocabularies of the step benchmark (0: the 105-char tokenizer's)")
    p.add_argument("--vocab", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (on a busy machine > 1 can be far slower)")
    p.add_argument("--loss-n", type=int, nargs="*", default=[512, 2048, 4096],
                   help="rows of the loss microbenchmark (none: skip it)")
    p.add_argument("--loss-beta", type=float, default=0.5)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--out", default=None, help="write speed.json here (a folder)")
    p.add_argument("--worker", choices=["opd", "trl", "loss"], help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--values-out", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    from opd.bench import machine

    a = _parser().parse_args(argv)
    if a.worker:
        fn = {"opd": worker_opd, "trl": worker_trl, "loss": worker_loss}[a.worker]
        print(json.dumps(fn(a)))
        return 0
    t0 = time.perf_counter()
    result = {"machine_at_start": machine(), "trl": trl_version(), "settings": vars(a)}
    print(result["machine_at_start"], flush=True)
    result["step"] = [step_bench(argparse.Namespace(**{**vars(a), "vocab": v})) for v in a.vocabs]
    result["loss"] = loss_bench(a) if a.loss_n else []
    result["machine_at_end"] = machine()
    result["wall_seconds"] = time.perf_counter() - t0
    from opd.bench.plots import speed_markdown

    print(speed_markdown(result))
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "speed.json").write_text(json.dumps(result, indent=1))
        (Path(a.out) / "speed.md").write_text(speed_markdown(result) + "\n")
        print(f"wrote {Path(a.out) / 'speed.json'} and speed.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
