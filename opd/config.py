"""Run configuration: dataclasses, YAML files, `key=value` overrides, validation.

Every field is documented once, in its `doc` metadata; `opd distill --help-config` prints
them. Values come from (later wins): the defaults below, a YAML file, `key=value` overrides.
A key is `section.field` (`train.lr=1e-4`) or, when unambiguous, just `field` (`lr=1e-4`,
`recipe=gkd`). Recipe arguments go under `method.args` (`method.args.beta=0.3`, or `args.beta=0.3`).
Validation errors name the field, the value and the valid range; a float must also be finite
(nan, inf and overflowing literals such as 1e400 are refused wherever a range is checked).
Unknown keys get a "did you mean" hint, including for TRL/HF names (`opd.config_names`).
Config files are read with a strict YAML loader (`opd.config_io`: no aliases, `1e-3` is a
float) and `save_config` writes atomically.

Epochs: `train.epochs > 0` replaces `train.steps` (giving both is an error);
`resolve_steps` sets steps = max(1, ceil(epochs · n_train_prompts / (batch_size · grad_accum))).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from fractions import Fraction
from pathlib import Path

import yaml

from opd.config_check import check_resume_overrides
from opd.config_check import check_type as _check_type
from opd.config_check import range_text as _range_text
from opd.config_check import validate_field as _validate_field
from opd.config_io import atomic_write_text, parse_override, read_yaml_file, unique_run_dir
from opd.config_names import suggest
from opd.config_sections import (  # noqa: F401 - re-exported: opd.config is the entry
    DataConfig,
    MethodConfig,
    ModelConfig,
    RunConfig,
    SamplingConfig,
    TrainConfig,
)
from opd.errors import ConfigError

SECTIONS = ("model", "data", "sampling", "method", "train")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _section_fields(section_cls) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(section_cls)
    out = {}
    for f in dataclasses.fields(section_cls):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def _fields_of(section: str) -> dict[str, dataclasses.Field]:
    return _section_fields(type(getattr(RunConfig(), section)))


def known_keys() -> set[str]:
    """Every valid full key: `output_dir` and `section.field`."""
    return {"output_dir"} | {f"{s}.{n}" for s in SECTIONS for n in _fields_of(s)}


def _fields_by_name() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for s in SECTIONS:
        for n in _fields_of(s):
            out.setdefault(n, []).append(f"{s}.{n}")
    return out


def _unknown(origin: str, key: str, extra: str = "") -> ConfigError:
    hint = suggest(key, known_keys(), _fields_by_name())
    tail = extra or "; see `opd distill --help-config`"
    return ConfigError(f"{origin}: unknown config key {key!r}{hint}{tail}")


def _set(cfg: RunConfig, key: str, value, origin: str, where: str = "") -> str:
    """Set one key; returns the full key set. `where` prefixes value errors (a file name)."""
    parts = key.split(".")
    if parts == ["output_dir"]:
        cfg.output_dir = _check_type(f"{where}output_dir", value, str)
        return "output_dir"
    if len(parts) == 1:
        parts = [*_resolve_short_key(parts[0], origin)]
    if parts[0] == "args" and len(parts) >= 2:
        parts = ["method", *parts]
    section = parts[0]
    if section not in SECTIONS:
        raise _unknown(origin, key, f"; sections are {', '.join(SECTIONS)}")
    sec_obj = getattr(cfg, section)
    fields = _section_fields(type(sec_obj))
    if len(parts) < 2 or parts[1] not in fields:
        raise _unknown(origin, key, f"; valid keys in '{section}': {', '.join(fields)}")
    fname = parts[1]
    full = f"{section}.{fname}"
    if len(parts) > 2:  # method.args.beta=0.3
        if fields[fname].type is not dict:
            raise ConfigError(f"{origin}: {full} is not a mapping; cannot set {key!r}")
        getattr(sec_obj, fname)[".".join(parts[2:])] = value
        return full
    v = _check_type(f"{where}{full}", value, fields[fname].type)
    _validate_field(f"{where}{full}", fields[fname], v)
    setattr(sec_obj, fname, v)
    return full


def _resolve_short_key(name: str, origin: str) -> list[str]:
    hits = [s for s in SECTIONS if name in _fields_of(s)]
    if len(hits) == 1:
        return [hits[0], name]
    if not hits:
        if name in SECTIONS:
            raise ConfigError(f"{origin}: {name!r} is a section; set {name}.FIELD=VALUE")
        raise _unknown(origin, name)
    raise ConfigError(
        f"{origin}: config key {name!r} is ambiguous; write one of "
        f"{', '.join(f'{s}.{name}' for s in hits)}"
    )


def _apply_mapping(cfg: RunConfig, data: dict, origin: str, set_keys: set, prefix: str = ""):
    for k, v in data.items():
        key = f"{prefix}{k}"
        if key in SECTIONS and not isinstance(v, dict):
            raise ConfigError(f"{origin}: '{key}' must be a mapping of {key}.* keys, got {v!r}")
        if key in SECTIONS:
            if key == "method" and "args" in v:
                set_keys.add(_set(cfg, "method.args", v["args"], origin, f"{origin}: "))
                v = {kk: vv for kk, vv in v.items() if kk != "args"}
            _apply_mapping(cfg, v, origin, set_keys, prefix=f"{key}.")
        else:
            set_keys.add(_set(cfg, key, v, origin, f"{origin}: "))


def _apply_file(cfg: RunConfig, path, set_keys: set, *, what: str) -> None:
    p = Path(path)
    data = read_yaml_file(p, what)
    if data is None:
        raise ConfigError(f"{what} '{p}' is empty; expected a mapping of sections (train: ...)")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{p}: the top level must be a mapping of sections, got a {type(data).__name__}"
        )
    _apply_mapping(cfg, data, str(p), set_keys)


def _apply_overrides(cfg: RunConfig, overrides, set_keys: set) -> None:
    for o in overrides:
        k, v = parse_override(o)
        set_keys.add(_set(cfg, k, v, f"override {o!r}"))


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Build a RunConfig from defaults, an optional YAML file and key=value overrides."""
    cfg, set_keys = RunConfig(), set()
    if path:
        _apply_file(cfg, path, set_keys, what="config file")
    _apply_overrides(cfg, overrides, set_keys)
    if cfg.train.epochs > 0 and "train.steps" in set_keys:
        raise ConfigError(
            f"train.epochs={cfg.train.epochs} and train.steps={cfg.train.steps} are both set; "
            "give one of them (train.epochs=0 means use train.steps)"
        )
    return cfg


def load_run_config(
    run_dir: str | Path, overrides: list[str] = (), *, resume: bool = True
) -> RunConfig:
    """The saved config of the run in `run_dir` plus overrides, for --resume and `opd eval`.

    A missing, empty, unreadable or invalid config.yaml is a ConfigError naming it; defaults
    are never substituted. `output_dir` is set to `run_dir`. With `resume`, an override of a
    setting in `opd.config_check.FIXED_ON_RESUME` (method, models, data, batch order) is refused.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run folder '{run_dir}' does not exist or is not a folder")
    path = run_dir / "config.yaml"
    if not path.exists():
        raise ConfigError(f"'{run_dir}' is not a run folder: '{path}' does not exist")
    cfg, set_keys = RunConfig(), set()
    _apply_file(cfg, path, set_keys, what="run config")
    saved = to_dict(cfg)
    _apply_overrides(cfg, overrides, set_keys)
    if resume:
        check_resume_overrides(run_dir, saved, to_dict(cfg))
    cfg.output_dir = str(run_dir)
    return cfg


def resolve_steps(cfg: RunConfig, n_train_prompts: int) -> int:
    """Set and return `cfg.train.steps`; from `train.epochs` when it is > 0.

    steps = max(1, ceil(epochs · n_train_prompts / (batch_size · grad_accum))), computed on
    the decimal value of epochs (0.1 · 30 / 3 is exactly 1 step, not 2).
    """
    tc = cfg.train
    if n_train_prompts < 0:
        raise ValueError(f"n_train_prompts must be >= 0, got {n_train_prompts}")
    if tc.epochs > 0:
        per_step = tc.batch_size * tc.grad_accum
        tc.steps = max(1, math.ceil(Fraction(repr(tc.epochs)) * n_train_prompts / per_step))
    return tc.steps


def resolve_output_dir(cfg: RunConfig) -> Path:
    """`cfg.output_dir`, or a new unique `runs/<recipe>-<timestamp>[-N]` (created, empty)."""
    if cfg.output_dir:
        return Path(cfg.output_dir)
    return unique_run_dir(cfg.method.recipe)


def save_config(cfg: RunConfig, path: Path) -> None:
    """Write the config as YAML atomically (temp file + fsync + os.replace).

    With `train.epochs` > 0 the number of steps is derived from the data (`resolve_steps`),
    so `train.steps` is left out: the file can be given back with --config.
    """
    data = to_dict(cfg)
    if cfg.train.epochs > 0:
        data["train"].pop("steps", None)
    atomic_write_text(Path(path), yaml.safe_dump(data, sort_keys=False))


def config_help() -> str:
    """Every key with its short form, default, valid range and doc."""
    by_name = _fields_by_name()
    out_doc = RunConfig.__dataclass_fields__["output_dir"].metadata["doc"]
    lines = [
        "Set keys as `section.field=VALUE` overrides, in a YAML file (--config), or by the",
        "short form `field=VALUE` where only one section has that field.",
        "",
        "output_dir = ''   (short form: output_dir=)",
        f"      {out_doc}",
    ]
    for s in SECTIONS:
        lines.append(f"{s}:")
        for name, f in _fields_of(s).items():
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            short = f"   (short form: {name}=)" if len(by_name[name]) == 1 else ""
            m = f.metadata
            valid = f"one of {', '.join(m['choices'])}" if m.get("choices") else _range_text(m)
            lines.append(f"  {s}.{name} = {default!r}{short}")
            lines.append(f"      {m['doc']}" + (f" [{valid}]" if valid else ""))
    lines.append("method.args.NAME=VALUE (short form: args.NAME=) sets a recipe argument.")
    return "\n".join(lines)
