"""Experiment trackers (`train.log_to`): each backend really writes what metrics.jsonl holds,
resumes the same run, and never writes a secret. No network: W&B offline, MLflow local."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from opd import tracking
from opd.config import load_config
from opd.errors import ConfigError
from opd.tracking import Trackers, open_trackers, parse_log_to, redact, row_metrics

ROWS = [
    {"event": "eval", "step": 0, "heldout_kl": 2.5, "heldout_accuracy": None},
    {"step": 1, "loss": 1.25, "grad_norm": 0.5, "lr": 1e-3, "note": "x", "flag": True},
    {"step": 2, "loss": 0.75, "grad_norm": float("nan"), "lr": 9e-4},
    {"event": "eval", "step": 2, "heldout_kl": 1.5, "heldout_accuracy": 0.25},
]
SAMPLES = [{"step": 2, "prompt": "3+4=", "student": "7", "teacher": "7|", "answer": "7"}]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, no telemetry, nothing written outside tmp_path."""
    home = tmp_path / "home"
    for k, v in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(home / "config"),
        "WANDB_CACHE_DIR": str(home / "cache"),
        "WANDB_DATA_DIR": str(home / "data"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }.items():
        monkeypatch.setenv(k, v)
    for k in ("WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_DIR"):
        monkeypatch.delenv(k, raising=False)
    return tmp_path


def expected(key: str) -> dict[int, float]:
    """step -> value of metric `key` as the trackers should hold it."""
    out = {}
    for row in ROWS:
        step, metrics = row_metrics(row)
        if key in metrics:
            out[step] = metrics[key]
    return out


def log_all(trk: Trackers, rows=ROWS) -> None:
    for row in rows:
        trk.log(row)
    trk.log_samples(2, SAMPLES)


# ------------------------------------------------------------------ names and config


def test_log_to_names_are_checked():
    assert parse_log_to("") == ()
    assert parse_log_to(" TensorBoard , wandb,tensorboard,") == ("tensorboard", "wandb")
    with pytest.raises(ConfigError) as err:
        parse_log_to("tensorboard,comet")
    msg = str(err.value)
    assert "train.log_to" in msg and "'comet'" in msg
    assert all(n in msg for n in ("tensorboard", "wandb", "mlflow"))


def test_missing_tracker_package_names_the_extra(monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(
        tracking.importlib.util, "find_spec", lambda n: None if n == "wandb" else real(n)
    )
    with pytest.raises(ConfigError) as err:
        open_trackers("tensorboard,wandb", Path("unused"), {}, False)
    assert "train.log_to" in str(err.value) and "pip install 'opd[wandb]'" in str(err.value)
    assert not Path("unused").exists()


def test_config_fields():
    cfg = load_config(None, ["train.log_to=tensorboard,mlflow", "sample_every=5"])
    assert cfg.train.log_to == "tensorboard,mlflow"
    assert (cfg.train.sample_every, cfg.train.sample_count) == (5, 3)
    assert load_config(None, ["train.log_to=[wandb, mlflow]"]).train.log_to == "wandb,mlflow"
    with pytest.raises(ConfigError, match="train.sample_count: must be >= 1"):
        load_config(None, ["train.sample_count=0"])
    with pytest.raises(ConfigError, match="train.sample_every: must be >= 0"):
        load_config(None, ["train.sample_every=-1"])


def test_no_trackers_is_a_no_op(tmp_path):
    trk = open_trackers("", tmp_path / "run", {"lr": 1}, False)
    assert not trk and trk.names == ()
    log_all(trk)
    trk.close()
    assert not (tmp_path / "run").exists()


def test_row_metrics_mirror_numbers_and_prefix_events():
    assert row_metrics(ROWS[0]) == (0, {"eval/heldout_kl": 2.5})
    assert row_metrics(ROWS[1]) == (1, {"loss": 1.25, "grad_norm": 0.5, "lr": 1e-3})
    assert row_metrics(ROWS[2]) == (2, {"loss": 0.75, "lr": 9e-4})  # NaN is null in jsonl


def test_redact_secret_keys_and_environment_values(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "env-secret-0123456789")
    cfg = {
        "method": {"args": {"api_key": "abc", "beta": 0.5, "Hub_Token": ["x"]}},
        "train": {"lr": 1e-3, "note": "uses env-secret-0123456789 inside"},
        "db_password": 3,
    }
    out = redact(cfg)
    assert out["method"]["args"] == {
        "api_key": "<redacted>",
        "beta": 0.5,
        "Hub_Token": "<redacted>",
    }
    assert out["train"] == {"lr": 1e-3, "note": "<redacted>"}
    assert out["db_password"] == "<redacted>"
    assert cfg["method"]["args"]["api_key"] == "abc"  # the caller's dict is untouched


class _Flaky:
    name = "flaky"

    def __init__(self, fail_at):
        self.fail_at, self.seen = fail_at, []

    def log(self, step, metrics):
        if step == self.fail_at:
            raise OSError("disk full\nsecond line")
        self.seen.append(step)

    def log_samples(self, step, samples):
        self.seen.append(("samples", step))

    def close(self):
        self.seen.append("closed")


def test_a_failing_tracker_is_turned_off_with_a_warning():
    bad, good = _Flaky(fail_at=1), _Flaky(fail_at=-5)
    trk = Trackers([bad, good])
    with pytest.warns(UserWarning, match=r"tracker flaky failed at step 1 \(disk full\)"):
        log_all(trk)
    assert bad.seen == [0]
    assert good.seen == [0, 1, 2, 2, ("samples", 2)]
    trk.close()
    assert good.seen[-1] == "closed" and trk.backends == []


def test_a_tracker_that_cannot_start_is_a_config_error(monkeypatch, tmp_path):
    def boom(*a):
        raise RuntimeError("no route to host\ndetails")

    monkeypatch.setitem(tracking._BACKENDS, "tensorboard", boom)
    with pytest.raises(ConfigError, match=r"^train.log_to: could not start tensorboard: no route"):
        open_trackers("tensorboard", tmp_path, {}, False)


# ------------------------------------------------------------------------ TensorBoard


def read_tensorboard(folder: Path):
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def scalars(acc, tag) -> dict[int, float]:
    events = acc.Scalars(tag)
    assert len({e.step for e in events}) == len(events), f"duplicate steps for {tag}"
    return {e.step: e.value for e in events}


def test_tensorboard_writes_every_row(tmp_path):
    trk = open_trackers("tensorboard", tmp_path, {"train": {"lr": 1e-3}}, False)
    log_all(trk)
    trk.close()
    acc = read_tensorboard(tmp_path / "tensorboard")
    assert set(acc.Tags()["scalars"]) == {
        "loss",
        "grad_norm",
        "lr",
        "eval/heldout_kl",
        "eval/heldout_accuracy",
    }
    for tag in acc.Tags()["scalars"]:
        got, want = scalars(acc, tag), expected(tag)
        assert got.keys() == want.keys()
        assert all(math.isclose(got[s], want[s], rel_tol=1e-6) for s in want), tag
    text = acc.Tensors("samples/text_summary")
    assert [t.step for t in text] == [2]
    table = text[0].tensor_proto.string_val[0].decode()
    assert "| step | prompt | student | teacher | answer |" in table and "7\\|" in table


def test_tensorboard_resume_hides_steps_after_the_checkpoint(tmp_path):
    trk = open_trackers("tensorboard", tmp_path, {}, False)
    for step in (1, 2, 3, 4):
        trk.log({"step": step, "loss": float(step)})
    trk.close()
    trk = open_trackers("tensorboard", tmp_path, {}, True, resume_step=2)
    for step in (3, 4, 5):
        trk.log({"step": step, "loss": 10.0 * step})
    trk.close()
    got = scalars(read_tensorboard(tmp_path / "tensorboard"), "loss")
    assert got == {1: 1.0, 2: 2.0, 3: 30.0, 4: 40.0, 5: 50.0}


# ------------------------------------------------------------------------ W&B offline


def read_wandb_log(path: Path) -> list:
    """Records of an offline W&B run file (.wandb): a 7-byte header, then 32 KiB blocks of
    chunks, each `crc32 (4) | length (2, LE) | type (1: full, 2: first, 3: middle, 4: last)`."""
    from wandb.proto import wandb_internal_pb2 as pb

    buf = path.read_bytes()
    assert buf[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(buf):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", buf[pos : pos + 7])
        pending += buf[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def wandb_history(run_file: Path) -> tuple[list[dict], dict]:
    history, config = [], {}
    for rec in read_wandb_log(run_file):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append(
                {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in rec.history.item
                }
            )
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
    return history, config


def wandb_flush() -> None:
    """Offline W&B writes its run file in a service process; `teardown` waits for it."""
    import wandb

    wandb.teardown()


@pytest.mark.slow  # starting the W&B service takes seconds
def test_wandb_offline_run_holds_the_history_and_resumes_the_same_run(offline):
    run_dir = offline / "run"
    cfg = {"train": {"lr": 1e-3}, "method": {"args": {"api_key": "cfg-secret"}}}
    trk = open_trackers("wandb", run_dir, cfg, False)
    log_all(trk)
    trk.close()
    wandb_flush()
    run_id = json.loads((run_dir / "tracking.json").read_text())["wandb_id"]
    (first,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    history, config = wandb_history(first)
    by_step = {h["_step"]: h for h in history}
    for key in ("loss", "grad_norm", "lr", "eval/heldout_kl", "eval/heldout_accuracy"):
        got = {s: h[key] for s, h in by_step.items() if key in h}
        assert got == expected(key), key
    assert by_step[2]["samples/_type"] == "table-file"
    assert by_step[2]["samples/nrows"] == 1
    assert config["train"] == {"lr": 1e-3}
    assert config["method"] == {"args": {"api_key": "<redacted>"}}

    trk = open_trackers("wandb", run_dir, cfg, True, resume_step=2)
    trk.log({"step": 3, "loss": 0.5})
    trk.close()
    wandb_flush()
    assert json.loads((run_dir / "tracking.json").read_text())["wandb_id"] == run_id
    runs = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    history = [h for f in runs for h in wandb_history(f)[0]]
    assert {h["_step"]: h["loss"] for h in history if "loss" in h} == {1: 1.25, 2: 0.75, 3: 0.5}


# ------------------------------------------------------------------------------ MLflow


@pytest.mark.slow  # MLflow creates its SQLite schema (~10 s on a busy machine)
def test_mlflow_local_store_holds_metrics_params_samples_and_resumes(offline):
    from mlflow.tracking import MlflowClient

    run_dir = offline / "run"
    cfg = {"train": {"lr": 1e-3, "steps": 4}, "data": {"hf_token": "cfg-secret"}}
    trk = open_trackers("mlflow", run_dir, cfg, False)
    log_all(trk)
    trk.close()
    run_id = json.loads((run_dir / "tracking.json").read_text())["mlflow_run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{(run_dir / 'mlruns' / 'mlflow.db').resolve()}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.001" and run.data.params["train.steps"] == "4"
    assert run.data.params["data.hf_token"] == "<redacted>"
    for key in ("loss", "grad_norm", "lr", "eval/heldout_kl", "eval/heldout_accuracy"):
        got = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        assert got == expected(key), key
    art = Path(client.download_artifacts(run_id, "samples/step_000002.json", str(offline)))
    assert json.loads(art.read_text()) == SAMPLES
    assert (run_dir / "mlruns" / "artifacts").is_dir()  # artifacts stay in the run folder

    trk = open_trackers("mlflow", run_dir, cfg, True, resume_step=2)
    trk.log({"step": 3, "loss": 0.5})
    trk.close()
    assert json.loads((run_dir / "tracking.json").read_text())["mlflow_run_id"] == run_id
    got = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert got == {1: 1.25, 2: 0.75, 3: 0.5}
    assert len(client.search_runs([run.info.experiment_id])) == 1


# ------------------------------------------------------------------------------ secrets

SECRETS = {
    "WANDB_API_KEY": "wandb-fake-key-5f3a9c1e7b2d4e6f8a0b",
    "MLFLOW_TRACKING_TOKEN": "mlflow-fake-token-91c2d3e4",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-fake-password-77aa",
    "HF_TOKEN": "hf_fakeTokenABCDEFGHIJKLMN",
    "OPD_TEST_SECRET": "another-fake-secret-0042",
}


@pytest.mark.slow  # all three trackers, MLflow's schema set-up included
def test_secrets_from_the_environment_are_never_written(offline, monkeypatch):
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    run_dir = offline / "run"
    in_config = "config-fake-api-key-1234"
    cfg = {
        "output_dir": str(run_dir),
        "model": {"teacher": f"org/model?token={SECRETS['HF_TOKEN']}"},
        "method": {"args": {"api_key": in_config, "beta": 0.5}},
    }
    trk = open_trackers("tensorboard,wandb,mlflow", run_dir, cfg, False)
    log_all(trk)
    assert trk.names == ("tensorboard", "wandb", "mlflow")  # none failed and was turned off
    trk.close()
    wandb_flush()
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(files) > 5
    assert any(p.suffix == ".wandb" for p in files) and any(p.name == "mlflow.db" for p in files)
    for p in files:
        data = p.read_bytes()
        for secret in [*SECRETS.values(), in_config]:
            assert secret.encode() not in data, f"{secret} written to {p}"


def test_mlflow_local_store_needs_sqlalchemy_remote_does_not(monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(
        tracking.importlib.util, "find_spec", lambda n: None if n == "sqlalchemy" else real(n)
    )
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match=r"'sqlalchemy' package.*pip install 'opd\[mlflow\]'"):
        parse_log_to("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert parse_log_to("mlflow") == ("mlflow",)
