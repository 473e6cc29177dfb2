"""The step benchmark's workers: opd and TRL train the same tiny models, one process each.

opd (`distill` with `gkd`, λ = 1; at β = 1 with `on_policy_rkl`, the same
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

Deviations: TRL's trainer generates through `unwrap_model_for_generation` and logs through
`transformers.Trainer`; those costs are part of what is measured (they are what a user pays).
opd writes a checkpoint at the end of the run and TRL (`save_strategy="no"`) does not; it
falls inside opd's numbers. Random students rarely emit a stop token, so completions are
close to max_new_tokens on both sides.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from opd.bench.memory import peak_kb, reset_peak
from opd.build import finish_models
from opd.config import load_config
from opd.tasks import get_task
from opd.tiny import char_tokenizer, tiny_llama
from opd.train import distill

INSTALL_HINT = "pip install 'opd[bench]'"


def trl_version() -> str | None:
    try:
        import trl
    except ImportError:
        return None
    return trl.__version__


SIDES = {"opd": "auto", "opd-hf": "hf", "trl": None}  # side -> opd's sampling.backend


def side_name(side: str, trl: str | None = None, trainer: str | None = None) -> str:
    if side == "trl":
        return f"TRL {trl} `{trainer}`"
    return "opd" if side == "opd" else "opd, sampling.backend=hf (Hugging Face generate)"


def tiny_pair(vocab: int = 0):
    """The benchmark's (teacher, student, tokenizer): 4 × 256 and 2 × 128 Llamas.

    `vocab` > 0 gives both models that many output rows (e.g. SmolLM2's 49,152) on top of the
    105-token character tokenizer: the extra rows are never prompt tokens but are sampled,
    projected and distilled like real ones, so the lm_head and the loss cost what they would
    with a real vocabulary.
    """
    tok = char_tokenizer()
    v = vocab or len(tok)
    teacher = tiny_llama(v, hidden=256, layers=4, heads=4, seed=1)
    student = tiny_llama(v, hidden=128, layers=2, heads=4, seed=2)
    return teacher, student, tok


def prompts(n: int = 256) -> list[str]:
    return [r["prompt"] for r in get_task("sort").generate(n, seed=0)]


def _summary(
    seconds: list[float], tokens: list[int], skip: int, base_kb: int, cpu_seconds: float
) -> dict:
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
    with tempfile.TemporaryDirectory() as tmp:
        student.save_pretrained(tmp)
    ids = torch.tensor([tok("sort: 1 2\n", add_special_tokens=False)["input_ids"]])
    student.generate(ids, max_new_tokens=2, do_sample=True, pad_token_id=tok.pad_token_id)


def _opd_recipe(beta: float) -> list[str]:
    """opd's name for TRL's on-policy objective: GKD with λ = 1 and β (at β = 1 the logged
    KL(q_student ‖ p_teacher) reuses the loss values, as for `on_policy_rkl`)."""
    return ["method.recipe=gkd", "method.args.lmbda=1.0", f"method.args.beta={beta}"]


def worker_opd(a) -> dict:
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
    return {
        "side": "opd",
        "backend": a.backend,
        **_summary([r["seconds"] for r in rows], [r["tokens"] for r in rows], a.skip, base, cpu),
    }


def worker_trl(a) -> dict:
    from datasets import Dataset  # installed with trl

    torch.set_num_threads(a.threads)
    teacher, student, tok = tiny_pair(a.vocab)
    # The same stop tokens as opd (eos and <|im_end|>); TRL reads them from here.
    student.generation_config.eos_token_id = list(finish_models(teacher, student, tok).stop_ids)
    _prewarm(student, tok)
    common = dict(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=a.batch,
        max_steps=a.steps,
        learning_rate=a.lr,
        lr_scheduler_type="cosine",
        temperature=a.temperature,
        max_completion_length=a.new_tokens,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        max_grad_norm=1.0,
        seed=0,
        beta=a.beta,
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
    trainer = Counted(
        model=student,
        teacher_model=teacher,
        args=Config(**common),
        train_dataset=dataset,
        processing_class=tok,
        callbacks=[Clock()],
    )
    base, cpu = reset_peak(), time.process_time()
    trainer.train()
    cpu = time.process_time() - cpu
    return {
        "side": "trl",
        "trainer": Trainer.__name__,
        **_summary(seconds, tokens, a.skip, base, cpu),
    }
