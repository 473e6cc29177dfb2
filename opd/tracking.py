"""Experiment trackers that mirror metrics.jsonl: TensorBoard, Weights & Biases, MLflow.

`train.log_to` is a comma list of tracker names (empty = none). `metrics.jsonl` stays the
source of truth; each row written there is mirrored to every tracker by `Trackers.log`:

    step row  {"step": s, "loss": ..., ...}            ->  loss, ... at step s
    other row {"event": "eval", "step": s, "heldout_kl": ...}  ->  eval/heldout_kl at step s

Only finite numbers are mirrored (metrics.jsonl writes non-finite values as null; booleans,
strings and nulls are not metrics). `Trackers.log_samples` sends sample completions
(`opd.samples`): a text table to TensorBoard, a `wandb.Table`, a JSON artifact in MLflow.

Where things go (RUN = the run folder):
  tensorboard  RUN/tensorboard/ (torch.utils.tensorboard.SummaryWriter)
  wandb        RUN/wandb/; mode from WANDB_MODE, else "offline" (no network; `wandb sync`
               uploads later); project from WANDB_PROJECT, else "opd"
  mlflow       MLFLOW_TRACKING_URI if set, else a local SQLite store RUN/mlruns/mlflow.db
               with artifacts in RUN/mlruns/artifacts; experiment MLFLOW_EXPERIMENT_NAME or "opd"
On resume the same W&B run (`resume="allow"`) and MLflow run continue: their ids are kept in
RUN/tracking.json (ids only, never a URI or a credential). TensorBoard drops the events
after the checkpoint's step (`purge_step`), as MetricsLog drops those rows.

Secrets: credentials (WANDB_API_KEY, MLFLOW_TRACKING_TOKEN / _PASSWORD, HF_TOKEN) are read by
the tracker libraries from the environment only. The config sent to a tracker has every
key with a word KEY, TOKEN, SECRET or PASSWORD in its name (`api_key`, `hfToken`; not
`max_new_tokens`) replaced by "<redacted>", and any string containing the value of such an
environment variable (8+ characters) redacted as well.

A tracker failing in the middle of a run (a network error, a full disk) is turned off with a
warning; training goes on, since metrics.jsonl has every row.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import time
import uuid
import warnings
from pathlib import Path

from opd.errors import ConfigError

TRACKERS = ("tensorboard", "wandb", "mlflow")
# The imports each tracker needs; the pip extra `opd[NAME]` installs them.
_NEEDS = {"tensorboard": ("tensorboard",), "wandb": ("wandb",), "mlflow": ("mlflow",)}
_MLFLOW_LOCAL_STORE = ("sqlalchemy", "alembic")  # the SQLite store in the run folder
STATE_FILE = "tracking.json"
REDACTED = "<redacted>"
# A name is secret when one of its words (split at non-alphanumerics and camelCase) is one
# of these: `api_key`, `HF_TOKEN`, `clientSecret`, `db_password` are; `max_new_tokens` is not.
_SECRET_WORDS = frozenset(
    "key token secret password passwd apikey secretkey accesskey accesstoken authtoken".split()
)
_WORD_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")
_SECRET_ENV = ("WANDB_API_KEY", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN")


def parse_log_to(text: str) -> tuple[str, ...]:
    """The tracker names in `train.log_to`, checked (unknown name or missing package ->
    ConfigError). Cheap: nothing is imported. Call it before creating the run folder."""
    names: list[str] = []
    for raw in str(text or "").split(","):
        name = raw.strip().lower()
        if not name:
            continue
        if name not in TRACKERS:
            raise ConfigError(
                f"train.log_to: unknown tracker {raw.strip()!r}; valid names are "
                f"{', '.join(TRACKERS)} (comma-separated; empty = none)"
            )
        needs = _NEEDS[name]
        if name == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
            needs += _MLFLOW_LOCAL_STORE
        missing = [m for m in needs if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(
                f"train.log_to: {name} needs the '{missing[0]}' package, which is not "
                f"installed; install it with: pip install 'opd[{name}]'"
            )
        if name not in names:
            names.append(name)
    return tuple(names)


# ------------------------------------------------------------------------------ secrets


def is_secret_name(name) -> bool:
    """Whether a config key or environment variable name looks like a credential."""
    return any(w.lower() in _SECRET_WORDS for w in _WORD_SPLIT.split(str(name)))


def _secret_values() -> list[str]:
    """Values of secret-looking environment variables (8+ characters), to scrub strings."""
    keys = set(_SECRET_ENV) | {k for k in os.environ if is_secret_name(k)}
    return [os.environ[k] for k in keys if len(os.environ.get(k, "")) >= 8]


def redact(config, _secrets: list[str] | None = None):
    """A copy of `config` with secret-named keys and environment secret values redacted."""
    secrets = _secret_values() if _secrets is None else _secrets
    if isinstance(config, dict):
        return {
            k: (REDACTED if is_secret_name(k) else redact(v, secrets)) for k, v in config.items()
        }
    if isinstance(config, (list, tuple)):
        return [redact(v, secrets) for v in config]
    if isinstance(config, str) and any(s in config for s in secrets):
        return REDACTED
    return config


def flatten(config: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1}."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def row_metrics(row: dict) -> tuple[int, dict[str, float]]:
    """(step, {name: value}) of a metrics.jsonl row: finite numbers only; a row with an
    "event" has its names prefixed with it ("eval/heldout_kl")."""
    event = row.get("event")
    prefix = f"{event}/" if event else ""
    metrics = {}
    for k, v in row.items():
        if k in ("step", "event") or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            metrics[prefix + str(k)] = float(v)
    return int(row.get("step", 0)), metrics


# ----------------------------------------------------------------------------- backends


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, run_dir: Path, config: dict, state: dict, resume: bool, resume_step):
        from torch.utils.tensorboard import SummaryWriter

        # Events after the checkpoint's step are hidden, as MetricsLog drops those rows.
        purge = resume_step + 1 if resume and resume_step is not None else None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)
        if not resume:
            text = "    " + json.dumps(config, indent=1).replace("\n", "\n    ")
            self.writer.add_text("config", text, 0)

    def log(self, step: int, metrics: dict) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def log_samples(self, step: int, samples: list[dict]) -> None:
        self.writer.add_text("samples", _markdown_table(samples), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    name = "wandb"

    def __init__(self, run_dir: Path, config: dict, state: dict, resume: bool, resume_step):
        import wandb

        self.wandb = wandb
        run_id = state.get("wandb_id") if resume else None
        run_id = run_id or uuid.uuid4().hex[:12]
        self.run = wandb.init(
            mode=os.environ.get("WANDB_MODE") or "offline",
            dir=str(run_dir),
            project=os.environ.get("WANDB_PROJECT") or "opd",
            name=run_dir.name,
            config=config,
            id=run_id,
            resume="allow",
            reinit="create_new",
            settings=wandb.Settings(console="off", save_code=False),
        )
        state["wandb_id"] = run_id

    def log(self, step: int, metrics: dict) -> None:
        self.run.log(metrics, step=step)

    def log_samples(self, step: int, samples: list[dict]) -> None:
        cols = _columns(samples)
        table = self.wandb.Table(columns=cols, data=[[s.get(c) for c in cols] for s in samples])
        self.run.log({"samples": table}, step=step)

    def close(self) -> None:
        self.run.finish()


_MLFLOW_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")


class _MLflow:
    name = "mlflow"

    def __init__(self, run_dir: Path, config: dict, state: dict, resume: bool, resume_step):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        artifacts = None
        if not uri:  # a local store inside the run folder
            store = (run_dir / "mlruns").resolve()
            store.mkdir(parents=True, exist_ok=True)
            uri, artifacts = f"sqlite:///{store / 'mlflow.db'}", (store / "artifacts").as_uri()
        for noisy in ("alembic", "mlflow.store.db.utils"):  # schema set-up chatter
            logging.getLogger(noisy).setLevel(logging.WARNING)
        self.client = client = MlflowClient(tracking_uri=uri)
        self.run_id = state.get("mlflow_run_id") if resume else None
        if self.run_id:
            try:
                client.update_run(self.run_id, status="RUNNING")
            except Exception:  # noqa: BLE001 - the saved run is gone: start a new one
                self.run_id = None
        if not self.run_id:
            exp_name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "opd"
            exp = client.get_experiment_by_name(exp_name)
            exp_id = exp.experiment_id if exp else client.create_experiment(exp_name, artifacts)
            run = client.create_run(
                exp_id, run_name=run_dir.name, tags={"opd.run_dir": str(run_dir.resolve())}
            )
            self.run_id = run.info.run_id
            params = [
                Param(_MLFLOW_KEY.sub("_", k)[:250], str(v)[:500])
                for k, v in flatten(config).items()
            ]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 per batch
                client.log_batch(self.run_id, params=params[i : i + 100])
        state["mlflow_run_id"] = self.run_id

    def log(self, step: int, metrics: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(_MLFLOW_KEY.sub("_", k), v, now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_samples(self, step: int, samples: list[dict]) -> None:
        text = json.dumps(samples, indent=1, ensure_ascii=False)
        self.client.log_text(self.run_id, text, f"samples/step_{step:06d}.json")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


_BACKENDS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


def _columns(samples: list[dict]) -> list[str]:
    cols: list[str] = []
    for s in samples:
        cols += [k for k in s if k not in cols]
    return cols


def _markdown_table(samples: list[dict]) -> str:
    cols = _columns(samples)

    def cell(v) -> str:
        return str("" if v is None else v).replace("|", "\\|").replace("\n", " ⏎ ")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(s.get(c)) for c in cols) + " |" for s in samples]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the API


class Trackers:
    """The open trackers of a run; with none, every method is a cheap no-op."""

    def __init__(self, backends=()):
        self.backends = list(backends)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.backends)

    def __bool__(self) -> bool:
        return bool(self.backends)

    def log(self, row: dict) -> None:
        """Mirror one metrics.jsonl row (see the module docstring for the names)."""
        if not self.backends:
            return
        step, metrics = row_metrics(row)
        if metrics:
            self._each("log", step, step, metrics)

    def log_samples(self, step: int, samples: list[dict]) -> None:
        if self.backends and samples:
            self._each("log_samples", step, step, samples)

    def close(self) -> None:
        for backend in self.backends:
            try:
                backend.close()
            except Exception as err:  # noqa: BLE001 - closing must not hide the run's outcome
                warnings.warn(f"opd: closing tracker {backend.name} failed: {err}", stacklevel=2)
        self.backends = []

    def _each(self, method: str, step: int, *args) -> None:
        for backend in list(self.backends):
            try:
                getattr(backend, method)(*args)
            except Exception as err:  # noqa: BLE001 - a tracker must not stop training
                self.backends.remove(backend)
                first = _first_line(err)
                warnings.warn(
                    f"opd: tracker {backend.name} failed at step {step} ({first}); it is "
                    "turned off for this run, metrics.jsonl keeps every row",
                    stacklevel=3,
                )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_trackers(
    names: str, run_dir: Path, config: dict, resume: bool, *, resume_step: int | None = None
) -> Trackers:
    """Open the trackers named in `names` (`train.log_to`) for the run in `run_dir`.

    Args:
      names: comma list of tracker names; empty -> a no-op `Trackers` (nothing imported).
      run_dir: the run folder (created if missing).
      config: the run's config as a dict (`opd.config.to_dict`); secrets are redacted.
      resume: continue the W&B / MLflow runs whose ids RUN/tracking.json holds.
      resume_step: the checkpoint step resumed from; TensorBoard hides its events after it
        (None: nothing is hidden).
    Raises ConfigError for an unknown name, a missing package, or a tracker that cannot start.
    """
    selected = parse_log_to(names)
    if not selected:
        return Trackers()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = _load_state(run_dir) if resume else {}
    safe = redact(config)
    backends = []
    for name in selected:
        try:
            backends.append(_BACKENDS[name](run_dir, safe, state, resume, resume_step))
        except Exception as err:  # noqa: BLE001 - reported as one line naming the tracker
            Trackers(backends).close()
            raise ConfigError(f"train.log_to: could not start {name}: {_first_line(err)}") from err
    _save_state(run_dir, state)
    return Trackers(backends)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _load_state(run_dir: Path) -> dict:
    try:
        state = json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _save_state(run_dir: Path, state: dict) -> None:
    path = run_dir / STATE_FILE
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    os.replace(tmp, path)
