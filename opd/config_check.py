"""Checking one config value: its type (`check_type`) and its range (`validate_field`).

Types come from the dataclass annotations in `opd.config`; ranges and choices from the
`ge`/`gt`/`le`/`choices` metadata of each field. A float must be finite wherever it is checked:
nan, inf and overflowing literals (1e400 reads as inf) are refused with the valid range shown.
Every error is a one-line `ConfigError` starting with the field's full name.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing

from opd.errors import ConfigError


def check_type(name: str, value, tp):
    """Coerce `value` to the annotated type `tp` or raise ConfigError naming the field."""
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and value.strip().lower().lstrip("+-") in (
            "inf",
            "infinity",
            "nan",
        ):
            value = float(value)  # 'inf' / 'nan' spelled out: refused below as non-finite
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return str(value)
        if isinstance(value, (list, tuple)):  # a YAML list for a comma-separated field
            return ",".join(str(v) for v in value)
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    if tp is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if isinstance(tp, types.UnionType):  # pragma: no cover - not used yet
        return value
    return value


def range_text(m: dict) -> str:
    parts = [
        f"{op} {m[k]}"
        for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="))
        if m.get(k) is not None
    ]
    return " and ".join(parts)


def validate_field(name: str, f: dataclasses.Field, value):
    m = f.metadata
    if m.get("choices") and value not in m["choices"]:
        raise ConfigError(
            f"{name}: must be one of {', '.join(map(str, m['choices']))}, got {value!r}"
        )
    if isinstance(value, float) and not math.isfinite(value):
        rng = range_text(m)
        raise ConfigError(
            f"{name}: must be a finite number{' ' + rng if rng else ''}, got {value!r}"
        )
    if m.get("ge") is not None and value < m["ge"]:
        raise ConfigError(f"{name}: must be >= {m['ge']}, got {value!r}")
    if m.get("gt") is not None and value <= m["gt"]:
        raise ConfigError(f"{name}: must be > {m['gt']}, got {value!r}")
    if m.get("le") is not None and value > m["le"]:
        raise ConfigError(f"{name}: must be <= {m['le']}, got {value!r}")


def is_served(spec: str) -> bool:
    """True when a `model.teacher` value names a served teacher (http:// or https://)."""
    return spec.strip().lower().startswith(("http://", "https://"))


FIXED_ON_RESUME = (
    ("method", "recipe"),
    ("method", "args"),
    ("model", "teacher"),
    ("model", "teacher_weights"),
    ("model", "student"),
    ("model", "student_layers"),
    ("model", "student_prune_to"),
    ("model", "dtype"),
    ("data", "train"),
    ("data", "eval"),
    ("data", "eval_count"),
    ("train", "batch_size"),
    ("train", "grad_accum"),
    ("train", "seed"),
)
"""Settings an override may not change on --resume (the checkpoint depends on them);
`opd eval RUN_DIR` (resume=False) may evaluate on other data or models."""


def check_resume_overrides(run_dir, saved: dict, now: dict) -> None:
    """Refuse an override on --resume that changes a setting in `FIXED_ON_RESUME`."""
    for section, key in FIXED_ON_RESUME:
        if (section, key) == ("model", "teacher") and all(
            is_served(v[section][key]) for v in (now, saved)
        ):
            continue  # a served teacher may come back at another address after a restart
        if now[section][key] != saved[section][key]:
            if key in ("batch_size", "grad_accum") and _same_global_batch(run_dir, saved, now):
                continue  # [ddp] another process count, the same global batch
            raise ConfigError(
                f"{section}.{key}={now[section][key]!r}: the run in '{run_dir}' was started "
                f"with {section}.{key}={saved[section][key]!r}, and a checkpoint cannot continue "
                "under another method, model, data or batch order; start a new run instead"
            )


def _same_global_batch(run_dir, saved: dict, now: dict) -> bool:
    from opd.distributed import same_global_batch  # imports torch: only when needed

    return same_global_batch(run_dir, saved, now)
