"""Run configuration: dataclasses, YAML files, `key=value` overrides, validation.

Every field is documented once, in its `doc` metadata; `opd distill --help-config` prints
them. Values come from (later wins): the defaults below, a YAML file, `key=value` overrides.
A key is `section.field` (`train.lr=1e-4`) or, when unambiguous, just `field` (`lr=1e-4`,
`recipe=gkd`). Recipe arguments go under `method.args` (`method.args.beta=0.3`, or `args.beta=0.3`).
Validation errors name the field, the value and the valid range.
"""

from __future__ import annotations

import dataclasses
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from opd.errors import ConfigError


def _f(default, doc: str, *, ge=None, gt=None, le=None, choices=None, factory=None):
    meta = {"doc": doc, "ge": ge, "gt": gt, "le": le, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    teacher: str = _f(
        "embedded",
        "teacher: 'embedded' (SmolLM2-135M-Instruct), a HF folder or a .gguf file; "
        "several, comma-separated, make an ensemble",
    )
    teacher_weights: str = _f("", "ensemble weights, comma-separated (e.g. 0.7,0.3); empty = equal")
    student: str = _f(
        "", "student: a HF folder or .gguf file; empty = a depth-pruned copy of the teacher"
    )
    student_layers: int = _f(15, "layers kept when the student is pruned from the teacher", ge=1)
    dtype: str = _f(
        "float32", "parameter dtype of both models", choices=("float32", "bfloat16", "float16")
    )
    device: str = _f("auto", "'auto' (cuda if available), 'cpu' or 'cuda[:i]'")
    allow_download: bool = _f(
        False,
        "download a teacher/student given as a Hugging Face Hub id (org/name) when it is not "
        "in the local Hugging Face cache (HF_HUB_CACHE or HF_HOME); false = cache only",
    )


@dataclass
class DataConfig:
    train: str = _f(
        "task:arithmetic",
        "training prompts: a .jsonl/.json/.csv/.parquet file, a datasets save_to_disk "
        "folder (DIR or DIR:SPLIT), hf:ORG/NAME:SPLIT, or 'task:NAME[:split]'",
    )
    eval: str = _f(
        "",
        "held-out prompts (same forms); empty = follow data.train: a shipped task's test "
        "split, else rows held out from data.train (see docs/data.md)",
    )
    eval_count: int = _f(
        32, "number of held-out prompts used for evaluation (0 = no evaluation)", ge=0
    )
    max_prompt_tokens: int = _f(256, "prompts longer than this are truncated or rejected", ge=1)
    truncation: str = _f(
        "left",
        "over-long prompts: 'left' (keep the end, count) or 'error'",
        choices=("left", "error"),
    )
    chat_template: str = _f(
        "auto",
        "use the tokenizer's chat template: auto, true or false",
        choices=("auto", "true", "false"),
    )
    system_prompt: str = _f("", "system message prepended to chat prompts (empty = none)")
    skip_bad_rows: bool = _f(False, "skip and count malformed rows instead of stopping")
    allow_download: bool = _f(
        False, "allow data.train/data.eval=hf:ORG/NAME:SPLIT to download from the Hugging Face Hub"
    )


@dataclass
class SamplingConfig:
    max_new_tokens: int = _f(32, "longest completion, in tokens", ge=1)
    temperature: float = _f(1.0, "sampling temperature of rollouts (0 = greedy)", ge=0.0)
    top_p: float = _f(1.0, "nucleus sampling mass (1 = off)", gt=0.0, le=1.0)
    top_k: int = _f(0, "sample from the k most likely tokens only (0 = off)", ge=0)
    backend: str = _f(
        "auto",
        "'auto' (lean static-cache decoding for Llama-family models, else Hugging Face "
        "generate), 'fast' (the lean loop or an error) or 'hf' (generate, the reference)",
        choices=("auto", "fast", "hf"),
    )


@dataclass
class MethodConfig:
    recipe: str = _f("on_policy_rkl", "recipe name, see `opd recipes`")
    args: dict = _f(None, "recipe arguments, e.g. {beta: 0.5}", factory=dict)


@dataclass
class TrainConfig:
    steps: int = _f(60, "optimizer steps", ge=1)
    batch_size: int = _f(8, "prompts per micro-batch", ge=1)
    grad_accum: int = _f(1, "micro-batches per optimizer step", ge=1)
    lr: float = _f(5e-5, "peak learning rate (AdamW)", gt=0.0)
    weight_decay: float = _f(0.0, "AdamW weight decay", ge=0.0)
    warmup_steps: int = _f(0, "linear warm-up steps before the cosine decay", ge=0)
    min_lr_ratio: float = _f(0.1, "cosine decays to this fraction of lr", ge=0.0, le=1.0)
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 = off)", ge=0.0)
    seed: int = _f(0, "seed for data order, sampling and initialisation")
    eval_every: int = _f(0, "evaluate held-out KL every N steps (0 = only before/after)", ge=0)
    checkpoint_every: int = _f(
        50, "save a checkpoint every N steps (0 = off; also at the end and on Ctrl-C)", ge=0
    )
    keep_checkpoints: int = _f(2, "how many recent checkpoints to keep", ge=1)
    # 256 rows × V=49,152 × 4 B = 50 MB per logits block. At N=4,096 the chunked peak is
    # about ⅐ of the materialized one with 512-row chunks, ¼ with 1024
    # (benchmarks/results_chunked.md); 256 rows cut the speed benchmark's peak at V=49,152
    # from 851 to 519 MB at the same step time (benchmarks/results_speed.md).
    chunk_size: int = _f(256, "rows per chunk in the memory-lean divergence", ge=1)
    loss_path: str = _f(
        "chunked",
        "'chunked' (memory-lean) or 'materialized' (reference)",
        choices=("chunked", "materialized"),
    )
    threads: int = _f(0, "torch CPU threads (0 = torch default)", ge=0)
    progress: bool = _f(True, "show a progress bar")
    log_to: str = _f(
        "",
        "experiment trackers mirroring metrics.jsonl, comma-separated: tensorboard, wandb, "
        "mlflow (empty = none); see docs/tracking.md",
    )
    sample_every: int = _f(
        0,
        "every N steps, write held-out prompts with student and teacher greedy completions "
        "to samples.jsonl and the trackers (0 = off)",
        ge=0,
    )
    sample_count: int = _f(3, "held-out prompts per sample point (train.sample_every)", ge=1)
    checkpoint_minutes: float = _f(
        10.0,
        "also save a checkpoint when this many minutes passed since the last (0 = off)",
        ge=0.0,
    )


@dataclass
class RunConfig:
    output_dir: str = _f("", "run folder; empty = runs/<recipe>-<timestamp>")
    model: ModelConfig = _f(None, "models", factory=ModelConfig)
    data: DataConfig = _f(None, "prompt sets", factory=DataConfig)
    sampling: SamplingConfig = _f(None, "rollout sampling", factory=SamplingConfig)
    method: MethodConfig = _f(None, "the distillation method", factory=MethodConfig)
    train: TrainConfig = _f(None, "optimisation", factory=TrainConfig)


SECTIONS = ("model", "data", "sampling", "method", "train")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _check_type(name: str, value, tp):
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


def _validate_field(name: str, f: dataclasses.Field, value):
    m = f.metadata
    if m.get("choices") and value not in m["choices"]:
        raise ConfigError(
            f"{name}: must be one of {', '.join(map(str, m['choices']))}, got {value!r}"
        )
    if m.get("ge") is not None and value < m["ge"]:
        raise ConfigError(f"{name}: must be >= {m['ge']}, got {value!r}")
    if m.get("gt") is not None and value <= m["gt"]:
        raise ConfigError(f"{name}: must be > {m['gt']}, got {value!r}")
    if m.get("le") is not None and value > m["le"]:
        raise ConfigError(f"{name}: must be <= {m['le']}, got {value!r}")


def _section_fields(section_cls) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(section_cls)
    out = {}
    for f in dataclasses.fields(section_cls):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def _set(cfg: RunConfig, key: str, value, origin: str):
    parts = key.split(".")
    if parts[0] in ("output_dir",) and len(parts) == 1:
        cfg.output_dir = _check_type("output_dir", value, str)
        return
    if len(parts) == 1:
        parts = [
            *_resolve_short_key(parts[0], origin),
        ]
    if parts[0] == "args" and len(parts) >= 2:
        parts = ["method", *parts]
    section = parts[0]
    if section not in SECTIONS:
        raise ConfigError(
            f"{origin}: unknown config key {key!r}; sections are {', '.join(SECTIONS)} "
            "(see `opd distill --help-config`)"
        )
    sec_obj = getattr(cfg, section)
    fields = _section_fields(type(sec_obj))
    if len(parts) < 2 or parts[1] not in fields:
        raise ConfigError(
            f"{origin}: unknown config key {key!r}; valid keys in '{section}': {', '.join(fields)}"
        )
    fname = parts[1]
    full = f"{section}.{fname}"
    if len(parts) > 2:  # method.args.beta=0.3
        if fields[fname].type is not dict:
            raise ConfigError(f"{origin}: {full} is not a mapping; cannot set {key!r}")
        getattr(sec_obj, fname)[".".join(parts[2:])] = value
        return
    v = _check_type(full, value, fields[fname].type)
    _validate_field(full, fields[fname], v)
    setattr(sec_obj, fname, v)


def _resolve_short_key(name: str, origin: str) -> list[str]:
    hits = [s for s in SECTIONS if name in _section_fields(type(getattr(RunConfig(), s)))]
    if len(hits) == 1:
        return [hits[0], name]
    if not hits:
        raise ConfigError(
            f"{origin}: unknown config key {name!r} (see `opd distill --help-config`)"
        )
    raise ConfigError(
        f"{origin}: config key {name!r} is ambiguous; write one of "
        f"{', '.join(f'{s}.{name}' for s in hits)}"
    )


def _apply_mapping(cfg: RunConfig, data: dict, origin: str, prefix: str = ""):
    for k, v in data.items():
        key = f"{prefix}{k}"
        is_section = key in SECTIONS
        if is_section and isinstance(v, dict):
            if key == "method" and "args" in v:
                _set(cfg, "method.args", v["args"], origin)
                v = {kk: vv for kk, vv in v.items() if kk != "args"}
            _apply_mapping(cfg, v, origin, prefix=f"{key}.")
        else:
            _set(cfg, key, v, origin)


def parse_override(text: str) -> tuple[str, object]:
    """Split `key=value`; the value is parsed as YAML (numbers, booleans, lists, strings)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must have the form key=value (e.g. train.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads '1e-4' as a string; accept it as a float.
    if isinstance(value, str):
        try:
            value = (
                float(value)
                if any(c in value for c in ".eE") and value[0] in "+-.0123456789"
                else value
            )
        except ValueError:
            pass
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Build a RunConfig from defaults, an optional YAML file and key=value overrides."""
    cfg = RunConfig()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            line = getattr(getattr(err, "problem_mark", None), "line", None)
            where = f":{line + 1}" if line is not None else ""
            raise ConfigError(
                f"{p}{where}: not valid YAML ({getattr(err, 'problem', err)})"
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        _apply_mapping(cfg, data, str(p))
    for o in overrides:
        k, v = parse_override(o)
        _set(cfg, k, v, f"override {o!r}")
    return cfg


def resolve_output_dir(cfg: RunConfig) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.method.recipe}-{stamp}"


def save_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_help() -> str:
    """Every field with its default and doc, one per line."""
    lines = []
    for s in SECTIONS:
        lines.append(f"{s}:")
        for name, f in _section_fields(type(getattr(RunConfig(), s))).items():
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {s}.{name} = {default!r}\n      {f.metadata['doc']}")
    return "\n".join(lines)
