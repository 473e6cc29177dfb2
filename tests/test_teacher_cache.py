"""The offline teacher cache (`opd cache-teacher`, `opd.teachers.cache`): cached scores equal
the live teacher's, an off-policy run on the cache equals one on the live teacher, and a
corrupted / mismatched / incomplete cache is refused with one clear line."""

from __future__ import annotations

import json

import pytest
import torch

from opd.build import Models, build_data
from opd.errors import ConfigError
from opd.method import Method
from opd.sampling import dataset
from opd.sampling.sources import make_rollout
from opd.signals import TopKDivergence
from opd.teachers import TopK
from opd.teachers.base import LocalTeacher, check_teacher_serves
from opd.teachers.cache import CachedTeacher, write_cache
from opd.teachers.sampled import SampledLogprobs
from opd.tiny import char_tokenizer
from opd.train import distill
from tests.helpers import (
    assert_clean_error,
    fresh_models,
    run_opd,
    save_tiny_models,
    tiny_cfg,
    tree_digest,
    write_prompts,
)

K, MAX_NEW = 5, 6


def _cache(tmp_path, tok, prompt_file, models, *, k=K, temperature=1.0, shard_rows=7):
    cfg = tiny_cfg(tmp_path, prompt_file, "data.eval_count=0")
    examples = build_data(cfg, tok).train
    out = tmp_path / "cache"
    write_cache(
        models.teacher, examples, out, k=k, temperature=temperature,
        vocab_size=models.vocab_size, pad_id=models.pad_id, max_new_tokens=MAX_NEW,
        tokenizer=tok, shard_rows=shard_rows, batch_size=5, meta={"data": str(prompt_file)},
    )  # fmt: skip
    return out, examples


def _rollout(examples, pad_id):
    comps = [ex.completion_ids[:MAX_NEW] for ex in examples]
    return make_rollout([ex.prompt_ids for ex in examples], comps, pad_id, "dataset")


def test_cached_scores_equal_the_live_teacher(tmp_path, tok, prompt_file):
    models = fresh_models(tok)
    out, examples = _cache(tmp_path, tok, prompt_file, models, temperature=0.7)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == 24 and len(manifest["shards"]) == 4  # 7 + 7 + 7 + 3 rows
    assert manifest["k"] == K and manifest["temperature"] == 0.7
    cached = CachedTeacher(out)
    # rows from several shards, in another order and batch than they were written
    ro = _rollout([examples[i] for i in (20, 3, 9, 15, 0)], models.pad_id)
    V = models.vocab_size
    for k in (K, 2):  # k < cached: first k columns with their own tail
        live = TopK(k, 0.7).score(models.teacher, ro, V)
        got = TopK(k, 0.7).score(cached, ro, V)
        assert got.topk_ids_NK.shape == (ro.num_tokens, k + 1)
        assert torch.equal(got.topk_ids_NK, live.topk_ids_NK)
        torch.testing.assert_close(got.topk_logprobs_NK, live.topk_logprobs_NK, rtol=0, atol=1e-6)
        torch.testing.assert_close(got.token_logprobs_N, live.token_logprobs_N, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="temperature 0.7.*asks for 1.0"):
        SampledLogprobs().score(cached, ro, V)  # τ = 1 for sampled-token access
    with pytest.raises(ConfigError, match=f"holds top-{K} .* k=8"):
        TopK(8, 0.7).score(cached, ro, V)


def test_sampled_token_logprobs_and_missing_row(tmp_path, tok, prompt_file):
    models = fresh_models(tok)
    out, examples = _cache(tmp_path, tok, prompt_file, models)
    cached = CachedTeacher(out)
    ro = _rollout(examples[:6], models.pad_id)
    live = SampledLogprobs().score(models.teacher, ro, models.vocab_size)
    got = SampledLogprobs().score(cached, ro, models.vocab_size)
    torch.testing.assert_close(got.token_logprobs_N, live.token_logprobs_N, rtol=0, atol=1e-6)
    # a sampled completion (not the dataset's) is not in the cache
    other = make_rollout([examples[0].prompt_ids], [[5, 6, 7]], models.pad_id, "student")
    with pytest.raises(ConfigError, match=f"teacher cache {out}: row 0 .*cached dataset"):
        cached.logprobs(other, K, 1.0, models.vocab_size)
    # ... unless a fallback teacher is given (mixed recipes): the whole batch goes there
    mixed = CachedTeacher(out, fallback=LocalTeacher(models.teacher))
    want = LocalTeacher(models.teacher).logprobs(other, K, 1.0, models.vocab_size)
    assert torch.equal(mixed.logprobs(other, K, 1.0, models.vocab_size).topk_ids_NK,
                       want.topk_ids_NK)  # fmt: skip


def _off_policy_method():
    return Method(prefixes=dataset(), teacher=TopK(K), signal=TopKDivergence("forward_kl"))


def test_off_policy_run_on_the_cache_equals_the_live_teacher(tmp_path, tok, prompt_file):
    live_models = fresh_models(tok)
    out, _ = _cache(tmp_path, tok, prompt_file, live_models)
    args = ("train.steps=3", "data.eval_count=0", f"sampling.max_new_tokens={MAX_NEW}")
    live = distill(
        tiny_cfg(tmp_path, prompt_file, *args, name="live"),
        models=live_models,
        method=_off_policy_method(),
    )
    m = fresh_models(tok)
    cached = Models(CachedTeacher(out), m.student, tok, m.vocab_size)
    check_teacher_serves(_off_policy_method(), cached.teacher)
    run = distill(
        tiny_cfg(tmp_path, prompt_file, *args, name="cached"),
        models=cached,
        method=_off_policy_method(),
    )
    assert len(live.losses) == 3 and all(x > 0 for x in live.losses)
    assert run.losses == pytest.approx(live.losses, rel=1e-6, abs=1e-7)


def test_corrupted_cache_and_tokenizer_mismatch_are_refused(tmp_path, tok, prompt_file):
    models = fresh_models(tok)
    out, _ = _cache(tmp_path, tok, prompt_file, models)
    shard = out / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="shard-00001.safetensors: sha256 differs"):
        CachedTeacher(out)
    shard.unlink()
    with pytest.raises(ConfigError, match="shard shard-00001.safetensors is missing"):
        CachedTeacher(out)
    manifest = out / "manifest.json"
    manifest.write_text(manifest.read_text()[:-20])
    with pytest.raises(ConfigError, match="manifest.json: not a valid opd-teacher-cache"):
        CachedTeacher(out)
    out2, _ = _cache(tmp_path / "b", tok, prompt_file, models)
    other_tok = char_tokenizer()
    other_tok.add_tokens(["<extra>"])
    with pytest.raises(ConfigError, match="tokenizer fingerprint .* student's tokenizer"):
        CachedTeacher(out2).check_tokenizer(other_tok)
    CachedTeacher(out2).check_tokenizer(tok)  # the same tokenizer passes
    with pytest.raises(ConfigError, match="already exists"):
        _cache(tmp_path / "b", tok, prompt_file, models)


def test_cli_cache_teacher_then_distill_on_the_cache(tmp_path):
    t, s = save_tiny_models(tmp_path / "models")
    data = write_prompts(tmp_path / "rows.jsonl", n=12)
    out = tmp_path / "cache"
    common = ["data.chat_template=false"]
    res = run_opd(["cache-teacher", t, "--data", data, "--out", out, "--k", "4",
                   "--max-new-tokens", "4", "--shard-rows", "5", *common])  # fmt: skip
    assert res.code == 0 and res.traceback is None, res.err
    assert "12 rows" in res.out and "3 shard(s)" in res.out
    assert json.loads((out / "manifest.json").read_text())["teacher"] == str(t)
    before = tree_digest(out)
    again = run_opd(["cache-teacher", t, "--data", data, "--out", out])
    assert_clean_error(again, "already exists")
    assert tree_digest(out) == before
    big = run_opd(["cache-teacher", t, "--data", data, "--out", tmp_path / "big", "--k", "99999"])
    assert_clean_error(big, "--k 99999", "vocabulary")
    assert not (tmp_path / "big").exists()
    train = [f"model.teacher=cache:{out}", f"model.student={s}", f"data.train={data}",
             "data.eval_count=0", "recipe=topk_rkl", "method.args.k=4", "method.args.lmbda=0",
             "train.steps=2", "train.batch_size=2", "sampling.max_new_tokens=4",
             "train.progress=false", *common]  # fmt: skip
    res = run_opd(["distill", *train, f"output_dir={tmp_path / 'run'}", "--no-report"])
    assert res.code == 0 and res.traceback is None, res.err
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in steps if "loss" in r]) == 2
    # on-policy prefixes cannot be served by a cache: a clear error naming it
    res = run_opd(["distill", *train, "method.args.lmbda=1", f"output_dir={tmp_path / 'r2'}"])
    assert_clean_error(res, f"teacher cache {out}", "cached dataset")
    res = run_opd(["distill", *train, "method.args.k=9", f"output_dir={tmp_path / 'r3'}"])
    assert_clean_error(res, "holds top-4", "k=9")
    res = run_opd(["distill", *train[:-3], "data.eval_count=4", f"output_dir={tmp_path / 'r4'}"])
    assert_clean_error(res, "data.eval_count=0")
