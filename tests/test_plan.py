"""`opd plan`: parameter counts, the cost model's scaling, the staged split, the CLI."""

from __future__ import annotations

import json
import math

import pytest

from opd.bench.flops import flop_params
from opd.plan import (
    LARGE_CHUNK,
    LOSS_CHUNK_TENSORS,
    RUNTIME_BYTES,
    SMALL_CHUNK,
    Device,
    Shape,
    Workload,
    decode_step_seconds,
    loss_flops,
    loss_seconds,
    peak_memory_bytes,
    predict_step,
    staged_split,
    step_flops,
)
from opd.plan_device import _head_rate, _line, load_device, save_device
from opd.tiny import tiny_llama
from tests.helpers import assert_clean_error, run_opd, save_tiny_models, write_prompts

DEV = Device(fwd_flops=1e10, train_flops=8e9, fwd_flops_narrow=5e9, train_flops_narrow=4e9,
             bandwidth=5e9, head_flops=[2e10, 4e10, 8e10], update_s=4e-8, sample_entry_s=1e-7,
             sample_row_s=5e-5, loss_entry_s=3e-8, loss_entry_small_s=1e-8, loss_chunk_s=1e-3,
             decode_fixed_s=1e-4, decode_layer_s=2e-3, forward_fixed_s=5e-3,
             forward_layer_s=3e-4, train_fixed_s=1e-3, train_layer_s=1e-2)  # fmt: skip
T = Shape(hidden=256, layers=4, intermediate=512, vocab=105, heads=4, kv_heads=4)
S = Shape(hidden=128, layers=2, intermediate=256, vocab=105, heads=4, kv_heads=4)
W = Workload(batch=16, prompt_tokens=20, completion_tokens=32)


@pytest.mark.parametrize("kv_heads,tied", [(4, False), (2, True)])
def test_shape_counts_the_parameters_of_a_real_llama(kv_heads, tied):
    m = tiny_llama(105, hidden=64, layers=3, heads=4, tie_embeddings=tied)
    if kv_heads != 4:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=105, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                          tie_word_embeddings=True)  # fmt: skip
        m = LlamaForCausalLM(cfg)
    s = Shape(hidden=64, layers=3, intermediate=128, vocab=105, heads=4, kv_heads=kv_heads,
              tied=tied)  # fmt: skip
    norms = 2 * 64 * 3 + 64  # RMSNorm weights: not multiply-adds, not in Shape
    assert s.body_params + s.head_params + norms == flop_params(m)
    assert s.total_params + norms == sum(p.numel() for p in m.parameters())


def test_eq35_flops_by_hand():
    f = step_flops(S, T, W)
    tokens = 16 * 52
    assert f["student"] == 6 * S.body_params * tokens
    assert f["teacher"] == 2 * T.body_params * tokens
    assert f["generation"] == 2 * S.body_params * tokens  # on-policy: the student writes
    # the loss's head matmuls: student projection, dZ·W and dZᵀ·h (3·d_s) + teacher's (d_t)
    assert f["loss"] == 2 * 16 * 32 * 105 * (3 * 128 + 256)


def test_loss_seconds_are_head_flops_over_the_head_rate_plus_elementwise_work():
    rows = 16 * 32  # 512 rows, two chunks of 256
    assert loss_flops(S, T, rows) == {128: 2 * rows * 105 * 384, 256: 2 * rows * 105 * 256}
    assert loss_flops(S, T, rows, full_vocab=False) == {128: 2 * rows * 105 * 384}
    # H(d): log-linear through widths 64, 256, 1024, clamped
    assert DEV.head_rate(32) == 2e10 and DEV.head_rate(4096) == 8e10
    assert DEV.head_rate(128) == pytest.approx(math.sqrt(2e10 * 4e10))
    assert Device(fwd_flops=1e10).head_rate(512) == pytest.approx(1e10)  # uncalibrated: R(d)
    # e(chunk): linear in log(entries) between the small and the large calibration chunk
    assert DEV.loss_entry(SMALL_CHUNK // 4) == 1e-8 and DEV.loss_entry(4 * LARGE_CHUNK) == 3e-8
    mid = math.sqrt(SMALL_CHUNK * LARGE_CHUNK)
    assert DEV.loss_entry(mid) == pytest.approx(2e-8)
    chunk = 256 * 105
    e = DEV.loss_entry(chunk)
    want = 2 * rows * 105 * (384 / DEV.head_rate(128) + 256 / 4e10) + rows * 105 * e + 2 * 1e-3
    assert loss_seconds(S, T, W, DEV) == pytest.approx(want, rel=1e-12)
    assert predict_step(S, T, W, DEV)["loss"] == pytest.approx(want, rel=1e-12)
    # the demo's shapes: width 576 heads run at H(576), not a line fitted on narrow widths
    demo_s = Shape(hidden=576, layers=15, intermediate=1536, vocab=49152, heads=9, kv_heads=3)
    demo_t = Shape(**{**demo_s.__dict__, "layers": 30})
    w = Workload(batch=8, prompt_tokens=55.5, completion_tokens=32)
    flops = 2 * 256 * 49152 * 4 * 576
    h576 = DEV.head_rate(576)
    assert 4e10 < h576 < 8e10
    assert loss_seconds(demo_s, demo_t, w, DEV) == pytest.approx(
        flops / h576 + 256 * 49152 * 3e-8 + 1e-3, rel=1e-12
    )


def test_decode_step_takes_the_larger_of_compute_and_weight_reads():
    B = W.batch
    body = max(2 * S.body_params * B / DEV.rate(128),
               (S.body_params * 4 + 2 * 2 * 128 * B * (20 + 16) * 4) / 5e9)  # fmt: skip
    head = max(2 * B * 105 * 128 / DEV.head_rate(128), 105 * 128 * 4 / 5e9)
    want = body + head + B * 105 * 1e-7 + B * 5e-5 + 1e-4 + 2 * 2e-3
    assert decode_step_seconds(S, W, DEV) == pytest.approx(want, rel=1e-12)
    slow_memory = Device(**{**DEV.__dict__, "bandwidth": 1e3})  # weight reads dominate
    expect = (S.body_params * 4 + 2 * 2 * 128 * B * 36 * 4 + 105 * 128 * 4) / 1e3
    assert decode_step_seconds(S, W, slow_memory) == pytest.approx(expect, rel=1e-3)
    # a few-row decode streams its weights at the calibrated decode rate, not copy bandwidth
    slow_decode = Device(**{**DEV.__dict__, "decode_bandwidth": 1e3})
    assert decode_step_seconds(S, W, slow_decode) == pytest.approx(expect, rel=1e-3)


def test_peak_memory_terms_on_a_known_config():
    s = Shape(hidden=128, layers=2, intermediate=256, vocab=49152, heads=4, kv_heads=4)
    t = Shape(hidden=256, layers=4, intermediate=512, vocab=49152, heads=4, kv_heads=4)
    w = Workload(batch=16, prompt_tokens=20, completion_tokens=30)
    m = peak_memory_bytes(s, t, w)
    P = s.total_params
    assert m["student weights"] == 4 * P and m["AdamW moments"] == 8 * P
    assert m["teacher weights"] == 4 * t.total_params
    assert m["activations"] == 2 * 16 * 50 * (10 * 128 + 4 * 256) * 4
    assert m["loss buffers"] == (2 * 49152 + 480) * 128 * 4 + LOSS_CHUNK_TENSORS * 256 * 49152 * 4
    assert m["KV cache"] == 2 * 2 * 128 * 16 * 50 * 4
    held = m["teacher weights"] + m["student weights"] + m["AdamW moments"] + RUNTIME_BYTES
    loss_phase = m["activations"] + m["teacher rows"] + m["loss buffers"]
    assert loss_phase > m["gradients"] + m["AdamW temporaries"]  # the loss phase is the peak
    assert m["total"] == pytest.approx(held + loss_phase)
    assert m["after loading"] == pytest.approx(m["total"] - 4 * (P + t.total_params))
    # a black-box recipe keeps no teacher rows; a smaller chunk shrinks the loss buffers
    bb = peak_memory_bytes(s, t, Workload(16, 20, 30, teacher_scores=False))
    assert bb["teacher rows"] == 0 and bb["teacher weights"] == 0
    small = peak_memory_bytes(s, t, Workload(16, 20, 30, chunk_size=64))
    assert m["loss buffers"] - small["loss buffers"] == LOSS_CHUNK_TENSORS * 192 * 49152 * 4


def test_head_rate_calibration_measures_a_positive_rate():
    assert 1e6 < _head_rate(16, rows=8, vocab=64) < 1e14


def test_components_scale_with_what_they_depend_on():
    base = predict_step(S, T, W, DEV)
    assert base["total"] == pytest.approx(sum(base[k] for k in ("generation", "teacher",
                                                                "student", "loss")))  # fmt: skip
    longer = predict_step(S, T, Workload(16, 20, 32, decode_steps=64), DEV)
    assert longer["generation"] > 1.8 * base["generation"]
    deep_teacher = predict_step(S, Shape(**{**T.__dict__, "layers": 8}), W, DEV)
    assert deep_teacher["teacher"] > 1.5 * base["teacher"]
    assert deep_teacher["student"] == base["student"]
    big_vocab = [Shape(**{**x.__dict__, "vocab": 49152}) for x in (S, T)]
    big = predict_step(*big_vocab, W, DEV)
    assert big["loss"] > 100 * base["loss"] and big["generation"] > 5 * base["generation"]
    offline = predict_step(S, T, Workload(16, 20, 32, student_writes=0.0), DEV)
    assert offline["generation"] == 0 and offline["teacher"] == base["teacher"]
    blackbox = predict_step(S, T, Workload(16, 20, 32, teacher_scores=False,
                                           full_vocab_loss=False), DEV)  # fmt: skip
    assert blackbox["teacher"] == 0 and blackbox["loss"] < base["loss"]
    # a wider model runs its matmuls faster per FLOP (log-linear between widths 128 and 512)
    assert DEV.rate(100) == pytest.approx(5e9) and DEV.rate(128) == pytest.approx(5e9)
    assert DEV.rate(512) == pytest.approx(1e10) == DEV.rate(4096)
    assert DEV.rate(256) == pytest.approx(math.sqrt(5e9 * 1e10))


def test_staged_split_is_65_25_10_in_steps():
    on, off, rl = {"total": 2.0}, {"total": 1.0}, {"total": 1.5}
    rows = staged_split(1000.0, on, off, rl)
    assert [r[1] for r in rows] == [0.65, 0.25, 0.10]
    assert [r[2] for r in rows] == pytest.approx([650.0, 250.0, 100.0])
    assert [r[3] for r in rows] == [650, 125, 66]


def test_device_file_round_trip_and_errors(tmp_path):
    save_device(DEV, tmp_path / "d.json")
    assert load_device(tmp_path / "d.json") == DEV
    assert _line(1.0, 4.0) == (0.0, 1.0)
    (tmp_path / "bad.json").write_text('{"fwd_flops": 1e9, "speed": 3}')
    cfg = ["model.teacher=embedded"]
    assert_clean_error(run_opd(["plan", *cfg, "--device", tmp_path / "bad.json"]), "speed")
    (tmp_path / "neg.json").write_text('{"fwd_flops": -1}')
    assert_clean_error(run_opd(["plan", *cfg, "--device", tmp_path / "neg.json"]), "fwd_flops")
    assert_clean_error(run_opd(["plan", *cfg, "--device", tmp_path / "none.json"]), "none.json")
    assert_clean_error(run_opd(["plan", *cfg]), "--calibrate")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plan")
    return tmp, save_tiny_models(tmp), write_prompts(tmp / "p.jsonl")


def test_cli_reads_model_sizes_from_the_folders(folders, tmp_path):
    tmp, (t, s), data = folders
    save_device(DEV, tmp_path / "d.json")
    args = ["plan", f"model.teacher={t}", f"model.student={s}", f"data.train={data}",
            "train.batch_size=4", "train.steps=10", "sampling.max_new_tokens=8",
            "--device", tmp_path / "d.json", "--prompt-tokens", "6"]  # fmt: skip
    res = run_opd([*args, "--json"])
    assert res.code == 0, res.err + (res.traceback or "")
    plan = json.loads(res.out)
    assert (plan["teacher"]["layers"], plan["teacher"]["hidden"]) == (3, 64)
    assert (plan["student"]["layers"], plan["student"]["hidden"]) == (2, 48)
    w = plan["workload"]
    assert (w["batch"], w["prompt_tokens"], w["completion_tokens"]) == (4, 6, 8)
    assert plan["wall_seconds"] == pytest.approx(10 * plan["step_seconds"]["total"])
    stages = plan["stage_steps"]
    assert [round(x[1], 2) for x in stages] == [0.65, 0.25, 0.1]
    assert stages[1][3] == int(0.25 * 10)  # the budget is train.steps on-policy steps
    text = run_opd(args).out
    for needle in ("student generation", "teacher scoring", "student fwd + bwd", "loss",
                   "peak memory", "off-policy warm-up", "reward refinement"):  # fmt: skip
        assert needle in text
    # pruned student: the teacher's shape with model.student_layers layers
    res = run_opd(["plan", f"model.teacher={t}", "model.student_layers=1", "--flops", "1e10",
                   "--json"])  # fmt: skip
    assert json.loads(res.out)["student"]["layers"] == 1


def test_cli_without_a_readable_size_names_the_shape_option(folders):
    assert_clean_error(run_opd(["plan", "model.teacher=http://localhost:1", "model.student=x",
                                "--flops", "1e10"]), "--teacher-shape")  # fmt: skip
    bad = run_opd(["plan", "model.teacher=embedded", "--teacher-shape", "hidden=5,layers=x",
                   "--flops", "1e10"])  # fmt: skip
    assert_clean_error(bad, "--teacher-shape", "layers=x")
    ok = run_opd(["plan", "model.teacher=http://h:1", "--teacher-shape",
                  "hidden=64,layers=2,intermediate=128,vocab=105", "--flops", "1e10", "--json"])  # fmt: skip
    assert ok.code == 0 and json.loads(ok.out)["params"]["teacher"] == 2 * (4 * 64 * 64 + 3 * 64
                                                                            * 128) + 2 * 105 * 64  # fmt: skip


def test_calibrate_cpu_seconds_times_the_thread(monkeypatch, tmp_path):
    import time

    import opd.plan_device

    seen = []

    def fake(threads, clock=None):
        seen.append((threads, clock))
        return DEV

    monkeypatch.setattr(opd.plan_device, "calibrate", fake)
    base = ["plan", "model.teacher=embedded", "--calibrate", "--json"]
    res = run_opd([*base, "--threads", "1", "--cpu-seconds", "--save", tmp_path / "d.json"])
    assert res.code == 0, res.err + (res.traceback or "")
    assert seen == [(1, time.thread_time)] and load_device(tmp_path / "d.json") == DEV
    assert run_opd([*base, "--threads", "2"]).code == 0 and seen[-1] == (2, None)
    assert_clean_error(run_opd([*base, "--threads", "2", "--cpu-seconds"]), "--threads 1")
    assert_clean_error(run_opd(["plan", "model.teacher=embedded", "--flops", "1e10",
                                "--cpu-seconds"]), "--calibrate")  # fmt: skip


@pytest.mark.slow
def test_calibrate_measures_every_number_in_cpu_seconds(tmp_path):
    """The whole calibration once (about 15 CPU-seconds): every rate and cost is measured."""
    import time

    from opd.plan_device import calibrate

    t0 = time.thread_time()
    dev = calibrate(1, time.thread_time)
    assert dev.threads == 1 and dev.name == "calibrated"
    for rate in (dev.fwd_flops, dev.train_flops, dev.fwd_flops_narrow, dev.train_flops_narrow,
                 *dev.head_flops):  # fmt: skip
        assert 1e8 < rate < 1e13  # FLOP/s of one CPU thread
    assert len(dev.head_flops) == 3
    assert 1e8 < dev.decode_bandwidth < dev.bandwidth * 2 and dev.bandwidth < 1e12
    for cost in (dev.update_s, dev.sample_entry_s, dev.sample_row_s, dev.loss_entry_s,
                 dev.loss_chunk_s):  # fmt: skip
        assert 0 < cost < 1.0
    for fixed, layer in ((dev.decode_fixed_s, dev.decode_layer_s),
                         (dev.forward_fixed_s, dev.forward_layer_s),
                         (dev.train_fixed_s, dev.train_layer_s)):  # fmt: skip
        assert fixed >= 0 and layer >= 0 and 0 < fixed + 4 * layer < 1.0  # (clamped at 0)
    assert dev.loss_entry_small_s >= 0
    assert dev.loss_entry(256 * 49152) == pytest.approx(dev.loss_entry_s, rel=1e-12)
    save_device(dev, tmp_path / "d.json")
    assert load_device(tmp_path / "d.json") == dev
    assert time.thread_time() - t0 < 120
