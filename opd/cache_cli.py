"""`opd cache-teacher MODEL --data FILE_OR_TASK --out DIR`: precompute a teacher cache.

The rows of the dataset are loaded and encoded as `opd distill` would with the same `data.*`
overrides (`opd.build.build_data`, `data.eval_count=0`, so every row is kept), each completion
is truncated to `sampling.max_new_tokens` (`--max-new-tokens`), and the local teacher's top-k
(+ tail) and token log-probabilities are written by `opd.teachers.cache.write_cache`.
Train on it with `opd distill model.teacher=cache:DIR model.student=... data.eval_count=0`
and a recipe whose prefixes are the dataset's completions (e.g. `recipe=topk_rkl
method.args.lmbda=0`). See docs/teacher-cache.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_cache_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the teacher: a folder, .gguf file, Hub id or 'embedded'")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="data.* / model.* overrides")
    p.add_argument("--data", required=True, help="rows with completions: a file or task:NAME")
    p.add_argument("--out", required=True, help="the cache folder to create (must not exist)")
    p.add_argument("--k", type=int, default=20, help="top-k log-probs kept per token (20)")
    p.add_argument("--temperature", type=float, default=1.0, help="teacher temperature τ (1.0)")
    p.add_argument("--shard-rows", type=int, default=1024, help="rows per shard file (1024)")
    p.add_argument("--max-new-tokens", type=int, help="completion tokens kept (config default)")
    p.add_argument("--batch-size", type=int, default=16, help="rows scored at once (16)")


def run_cache_teacher(args) -> int:
    from opd.build import DTYPES, build_data, resolve_device
    from opd.config import load_config
    from opd.errors import ConfigError
    from opd.models import check_head, load_model, shared_vocab_size
    from opd.teachers.cache import write_cache

    for name in ("k", "shard_rows", "batch_size", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {value}")
    if not args.temperature > 0:
        raise ConfigError(f"--temperature: must be > 0, got {args.temperature}")
    if Path(args.out).exists():
        raise ConfigError(f"--out {args.out}: already exists; give a new folder")
    bad = [o for o in args.overrides if not o.startswith(("data.", "model."))]
    if bad:
        raise ConfigError(f"opd cache-teacher: only data.* and model.* overrides, got {bad[0]!r}")
    extra = [f"sampling.max_new_tokens={args.max_new_tokens}"] if args.max_new_tokens else []
    cfg = load_config(
        None,
        [*args.overrides, f"model.teacher={args.model}", f"data.train={args.data}",
         "data.eval_count=0", *extra],
    )  # fmt: skip
    model, tok = load_model(
        args.model,
        dtype=DTYPES[cfg.model.dtype],
        device=resolve_device(cfg.model.device),
        allow_download=cfg.model.allow_download,
    )
    check_head(model, args.model)
    model.eval()
    data = build_data(cfg, tok)
    vocab = shared_vocab_size(model, tok, model, tok)  # as a run with this teacher's vocabulary
    if args.k > vocab:
        raise ConfigError(f"--k {args.k}: larger than the teacher's vocabulary ({vocab} tokens)")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    manifest = write_cache(
        model,
        data.train,
        args.out,
        k=args.k,
        temperature=args.temperature,
        vocab_size=vocab,
        pad_id=int(pad),
        max_new_tokens=cfg.sampling.max_new_tokens,
        tokenizer=tok,
        shard_rows=args.shard_rows,
        batch_size=args.batch_size,
        meta={"teacher": args.model, "data": args.data, "data_overrides": args.overrides},
    )
    print(
        f"teacher cache {args.out}: {manifest['rows']} rows, {manifest['tokens']} tokens, "
        f"top-{args.k} + tail at temperature {args.temperature}, "
        f"{len(manifest['shards'])} shard(s)"
    )
    return 0
