"""`opd plan`: parameter counts, the cost model's scaling, the staged split, the CLI."""

from __future__ import annotations

import json
import math

import pytest

from opd.bench.flops import flop_params
from opd.plan import Device, Shape, Workload, predict_step, staged_split, step_flops
from opd.plan_device import _line, _two_points, load_device, save_device
from opd.tiny import tiny_llama
from tests.helpers import assert_clean_error, run_opd, save_tiny_models, write_prompts

DEV = Device(fwd_flops=1e10, train_flops=8e9, fwd_flops_narrow=5e9, train_flops_narrow=4e9,
             bandwidth=5e9, adam_s=4e-8, entry_s=1e-7, entry_width_s=4e-10, loss_entry_s=3e-8,
             loss_width_s=2e-10, loss_chunk_s=1e-3, decode_fixed_s=1e-4, decode_layer_s=2e-3,
             forward_fixed_s=5e-3, forward_layer_s=3e-4, train_fixed_s=1e-3,
             train_layer_s=1e-2)  # fmt: skip
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
    assert _line(1.0, 4.0) == (0.0, 1.0) and _two_points(1, 3, 3, 7) == (1.0, 2.0)
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
