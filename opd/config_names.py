""" "Did you mean": opd's keys for the names TRL / Hugging Face `TrainingArguments` users type.

`suggest(key, known)` returns the hint appended to an "unknown config key" error:
  1. a TRL/HF name (with or without a section: `learning_rate`, `train.learning_rate`) maps to
     opd's key through `TRL_NAMES` (shown only if that key exists in this build);
  2. a field written under the wrong section (`data.max_new_tokens`) points to the section
     that has it (`train.output_dir` to the top-level `output_dir`);
  3. otherwise the nearest known keys by `difflib` similarity (cutoff 0.6), if any.
"""

from __future__ import annotations

import difflib

# TRL / transformers name -> (opd key or `key=value`, optional note). docs/cli.md shows this table.
TRL_NAMES: dict[str, tuple[str, str]] = {
    "learning_rate": ("train.lr", ""),
    "max_steps": ("train.steps", ""),
    "num_train_epochs": ("train.epochs", ""),
    "num_epochs": ("train.epochs", ""),
    "per_device_train_batch_size": ("train.batch_size", ""),
    "train_batch_size": ("train.batch_size", ""),
    "gradient_accumulation_steps": ("train.grad_accum", ""),
    "warmup_ratio": ("train.warmup_steps", "opd counts warm-up in steps"),
    "lr_scheduler_type": ("train.min_lr_ratio", "opd always warms up linearly, then cosine"),
    "logging_steps": ("train.eval_every", "every step's loss is always in metrics.jsonl"),
    "save_steps": ("train.checkpoint_every", ""),
    "save_total_limit": ("train.keep_checkpoints", ""),
    "eval_steps": ("train.eval_every", ""),
    "eval_strategy": ("train.eval_every", ""),
    "evaluation_strategy": ("train.eval_every", ""),
    "data_seed": ("train.seed", ""),
    "report_to": ("train.log_to", ""),
    "disable_tqdm": ("train.progress=false", ""),
    "out_dir": ("output_dir", ""),
    "outdir": ("output_dir", ""),
    "output": ("output_dir", ""),
    "output_path": ("output_dir", ""),
    "output-dir": ("output_dir", ""),
    "outputdir": ("output_dir", ""),
    "run_dir": ("output_dir", ""),
    "save_dir": ("output_dir", ""),
    "logging_dir": ("output_dir", "logs are written into the run folder"),
    "max_completion_length": ("sampling.max_new_tokens", ""),
    "max_prompt_length": ("data.max_prompt_tokens", ""),
    "max_seq_length": ("data.max_prompt_tokens", "and sampling.max_new_tokens"),
    "max_length": ("data.max_prompt_tokens", "and sampling.max_new_tokens"),
    "do_sample": ("sampling.temperature", "0 = greedy"),
    "model_name_or_path": ("model.student", ""),
    "student_model": ("model.student", ""),
    "student_model_name_or_path": ("model.student", ""),
    "teacher_model": ("model.teacher", ""),
    "teacher_model_name_or_path": ("model.teacher", ""),
    "torch_dtype": ("model.dtype", ""),
    "bf16": ("model.dtype=bfloat16", ""),
    "fp16": ("model.dtype=float16", ""),
    "use_cpu": ("model.device=cpu", ""),
    "no_cuda": ("model.device=cpu", ""),
    "dataset_name": ("data.train", "a file or task:NAME[:split]"),
    "dataset": ("data.train", ""),
    "train_file": ("data.train", ""),
    "train_dataset": ("data.train", ""),
    "eval_dataset": ("data.eval", ""),
    "validation_file": ("data.eval", ""),
    "test_file": ("data.eval", ""),
    "dataset_text_field": ("data.train", "rows need a `prompt` field"),
    "beta": ("method.args.beta", "recipe arguments go under method.args"),
    "lmbda": ("method.args.lmbda", "recipe arguments go under method.args"),
    "loss_type": ("method.recipe", "see `opd recipes`"),
}


def _exists(target: str, known: set[str]) -> bool:
    key = target.split("=", 1)[0]
    return key in known or key.startswith("method.args.")


def suggest(key: str, known: set[str], fields_by_name: dict[str, list[str]]) -> str:
    """A ' (did you mean ...?)' hint for the unknown `key`, or '' when nothing is close.

    Args:
      key: the key as written (`learning_rate`, `train.max_steps`, `data.max_new_tokens`).
      known: every valid full key (`train.lr`, `output_dir`, ...).
      fields_by_name: field name -> the full keys having it (`seed` -> [`train.seed`]).
    """
    last = key.replace("-", "_").split(".")[-1].lower()
    for name in (key.lower(), last):
        if name in TRL_NAMES and _exists(TRL_NAMES[name][0], known):
            target, note = TRL_NAMES[name]
            return f" (did you mean {target}?" + (f" {note})" if note else ")")
    if last in fields_by_name and key not in known:
        return f" (did you mean {' or '.join(fields_by_name[last])}?)"
    if last in known and key != last:  # a top-level key under a section: train.output_dir
        return f" (did you mean {last}?)"
    sections = {k.split(".")[0] for k in known if "." in k}
    head = key.split(".")[0]
    if "." in key and head in sections:  # a valid section: the nearest of its fields
        pool = sorted(k for k in known if k.startswith(head + "."))
        close = [f"{head}.{n}" for n in _close(last, [k.split(".", 1)[1] for k in pool])]
    else:
        shorts = {k.split(".")[-1] for k in known} - sections
        trl = {n: t for n, (t, _) in TRL_NAMES.items() if _exists(t, known)}
        close = _close(key, sorted(known | shorts | set(trl)))
        close = list(dict.fromkeys(trl.get(c, c) for c in close))  # a TRL name -> opd's key
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _close(word: str, pool: list[str]) -> list[str]:
    return difflib.get_close_matches(word, pool, n=3, cutoff=0.6)
