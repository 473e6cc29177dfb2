"""Recoverable tasks (correction markers), error injection with the wrong values' loss masked,
recovery accuracy on stand-in models, teachers trained on corrupted prefixes, and the
plateau rule of the quality benchmark's warm-up."""

from __future__ import annotations

import hashlib
import json
import random
import re

import pytest

from opd.bench import quality
from opd.bench.warmup import plateau_reached
from opd.errors import ConfigError
from opd.tasks import get_task
from opd.tasks import teacher as teacher_mod
from opd.tasks.recoverable import (
    apply_chain_corrections,
    apply_sort_corrections,
    count_corrections,
    inject_errors,
)
from opd.tasks.recovery import (
    corrupt_rows,
    corrupted_prefixes,
    masked_labels,
    recovery_accuracy,
    recovery_task,
)
from opd.tasks.teacher import TeacherPreset, encode_sft_batch, train_task_teacher
from opd.tasks.variants import VARIANTS, Variant, task_spec
from opd.tiny import char_tokenizer, tiny_llama

ROW = {"prompt": "chain: 3+4*2-1\n", "completion": "3+4=7;7*2=14;14-1=13 => 13", "answer": "13"}
SORT_ROW = {"prompt": "sort: 9 1 5 3\n", "completion": "1 3 5 9", "answer": "1 3 5 9"}


def test_chain_fix_verifier_applies_corrections():
    chain_fix = get_task("chain_fix")
    corrected = "3+4=8!7;7*2=14;14-1=13 => 13"
    uncorrected = "3+4=8;8*2=16;16-1=15 => 15"
    assert chain_fix.verify(corrected, "13") and chain_fix.extract_answer(corrected) == "13"
    assert not chain_fix.verify(uncorrected, "13")
    # Several corrections, one value corrected twice, and the final answer corrected.
    assert chain_fix.verify("3+4=8!9!7;7*2=15!14;14-1=13 => 12!13", "13")
    assert chain_fix.extract_answer("3+4=7;7*2=14;14-1=13 => 13!12") == "12"
    assert count_corrections("3+4=8!9!7;7*2=15!14;14-1=13 => 12!13") == 4
    # Malformed markers: no answer at all (marker spam never verifies).
    for bad in ("3+4=8!;7*2=14 => 13", "!3+4=7 => 13", "3+4=8!!7 => 13", "3+4=7 => !13",
                "3+4=7 => 13!", "!!!!!"):  # fmt: skip
        assert chain_fix.extract_answer(bad) is None, bad
    assert count_corrections("!!!!!\n!!") == 5  # the first line only
    assert apply_chain_corrections("1+2=3 => 3") == "1+2=3 => 3"
    # The plain chain task does not know the marker: a corrected answer is unreadable there.
    assert get_task("chain").extract_answer("3+4=7 => 6!7") is None


def test_chain_errors_are_counted_against_the_completions_own_values():
    count = get_task("chain_fix").count_errors
    p = ROW["prompt"]
    cases = {
        "3+4=7;7*2=14;14-1=13 => 13": 0,
        "3+4=8;8*2=16;16-1=15 => 15": 1,  # consistent after the first error
        "3+4=8!7;7*2=15;15-1=14 => 14": 2,
        "3+4=8!7;7*2=14;14-1=13 => 13": 1,  # a corrected error is still an error made
        "3+4=7;7*2=14;14-1=13 => 12!13": 1,
        "3+4=7;8*2=16;16-1=15 => 15": 1,  # copied the previous value wrong
        "3+4=7;7+2=9;9-1=8 => 8": 1,  # not the prompt's operation: counting stops
        "3+4=7;7*2=14": 1,  # no answer
        "": 1,
    }
    assert {text: count(p, text) for text in cases} == cases


def test_sort_fix_verifier_applies_retractions():
    sort_fix = get_task("sort_fix")
    assert sort_fix.verify("1 3 7 < 5 9", "1 3 5 9")
    assert not sort_fix.verify("1 3 7 5 9", "1 3 5 9")
    assert sort_fix.verify("1 8 9 < < 3 5 < 5 9", "1 3 5 9")  # consecutive and repeated
    assert apply_sort_corrections("1 8 9 < < 3") == "1 3"
    assert count_corrections("1 8 9 < < 3 5 < 5 9") == 3 and count_corrections("1 3 5") == 0
    for bad in ("< 1 3 5 9", "1 < < 3 5 9", "1 3 7< 5 9", "1 3 x 5 9", "<", "1 \u00b2 < 3"):
        assert sort_fix.extract_answer(bad) is None, bad
    assert not get_task("sort").verify("1 3 7 < 5 9", "1 3 5 9")


def test_fix_tasks_keep_the_base_tasks_rows():
    for fix, base in (("chain_fix", "chain"), ("sort_fix", "sort")):
        assert get_task(fix).generate(30, 7, **({"steps": 5} if base == "chain" else {})) == (
            get_task(base).generate(30, 7, **({"steps": 5} if base == "chain" else {}))
        )
        assert recovery_task(base).name == fix and recovery_task(fix).name == fix
    assert recovery_task("reverse") is None


def test_inject_errors_is_exact_on_a_seeded_case():
    chain_fix, sort_fix = get_task("chain_fix"), get_task("sort_fix")
    bad = inject_errors(chain_fix, ROW, random.Random(5), 2)
    assert bad.text == "3+4=7;7*2=14;14-1=12!13 => 24!13"
    assert bad.spans == [(18, 20), (27, 29)] and bad.n_errors == 2
    assert [bad.text[a:b] for a, b in bad.spans] == ["12", "24"]
    assert chain_fix.verify(bad.text, "13") and count_corrections(bad.text) == 2
    prefix = inject_errors(chain_fix, ROW, random.Random(5), 2, prefix_only=True)
    assert prefix.text == "3+4=7;7*2=14;14-1=12!13 => 24"
    assert not chain_fix.verify(prefix.text, "13")
    bad = inject_errors(sort_fix, SORT_ROW, random.Random(0), 1)
    assert bad.text == "1 3 5 10 < 9" and bad.spans == [(6, 8)]
    assert inject_errors(sort_fix, SORT_ROW, random.Random(0), 9).n_errors == 4  # capped
    # Every wrong value differs from the right one and is not a prefix of it.
    for i, row in enumerate(chain_fix.generate(200, 1)):
        bad = inject_errors(chain_fix, row, random.Random(i), 3)
        assert chain_fix.verify(bad.text, row["answer"]) and count_corrections(bad.text) == 3
        for a, b in bad.spans:
            wrong, right = bad.text[a:b], re.match(r"!(\d+)", bad.text[b:]).group(1)
            assert wrong.isdigit() and not right.startswith(wrong)


def test_wrong_values_loss_is_masked():
    tok = char_tokenizer()
    chain_fix = get_task("chain_fix")
    rows = corrupt_rows(chain_fix, [ROW, ROW], random.Random(3), fraction=0.5, max_errors=2)
    clean, bad = (rows[1], rows[0]) if "masked" in rows[0] else (rows[0], rows[1])
    assert clean == ROW and bad["masked"]
    _, _, labels_BT = encode_sft_batch(tok, rows)
    masked_BT = masked_labels(tok, rows, labels_BT, [len(ROW["prompt"])] * 2)
    i = rows.index(bad)
    start = len(ROW["prompt"])  # one token per character
    wrong_positions = {start + t for a, b in bad["masked"] for t in range(a, b)}
    changed = {t for t in range(labels_BT.shape[1]) if masked_BT[i, t] != labels_BT[i, t]}
    assert changed == wrong_positions and all(masked_BT[i, t] == -100 for t in changed)
    assert (masked_BT[1 - i] == labels_BT[1 - i]).all()  # the clean row is untouched
    # The marker right after each wrong value is still trained on.
    marker = tok.convert_tokens_to_ids("!")
    assert all(masked_BT[i, start + b] == marker for _, b in bad["masked"])


def _stand_in(task, rows, fixes_with_marks_before: int = 99, only=None):
    """A text 'model' that recovers (marker, right value, rest of the reference) when the
    prefix has fewer than `fixes_with_marks_before` earlier markers and its row is in `only`;
    otherwise it goes on as if the wrong value were right (sort: the reference's rest; chain: a
    final answer off by one, as the clean teacher's consistent continuation usually is)."""
    by_prompt = {r["prompt"]: r for r in rows}

    def complete(prompts):
        out = []
        for text in prompts:
            prompt, prefix = text.split("\n", 1)
            row = by_prompt[prompt + "\n"]
            slots = task.slots(row)
            wrong_at = len(task.slots({"completion": task.apply_corrections(prefix)})) - 1
            slot = slots[wrong_at]
            rest = row["completion"][slot.end :]
            recover = count_corrections(prefix) < fixes_with_marks_before
            if recover and (only is None or row["prompt"] in only):
                marker, right = task.fix("", slot.right)
                out.append(marker + right + rest)
            elif task.name == "chain_fix":
                out.append(f" => {int(row['answer']) + 1}")
            else:
                out.append(rest)
        return out

    return complete


@pytest.mark.parametrize("name", ["chain_fix", "sort_fix"])
def test_recovery_accuracy_of_stand_in_models(name):
    task = get_task(name)
    rows = task.generate(40, 11)
    assert recovery_accuracy(_stand_in(task, rows), None, task, rows, 1) == 1.0
    assert recovery_accuracy(_stand_in(task, rows), None, name, rows, 3) == 1.0
    assert recovery_accuracy(_stand_in(task, rows, 0), None, task, rows, 1) == 0.0
    # Fixes single errors only: a prefix with one corrected error already is a new state.
    single = _stand_in(task, rows, fixes_with_marks_before=1)
    assert recovery_accuracy(single, None, task, rows, 1) == 1.0
    assert recovery_accuracy(single, None, task, rows, 2) == 0.0
    half = {r["prompt"] for r in rows[::2]}
    assert recovery_accuracy(_stand_in(task, rows, only=half), None, task, rows, 2) == 0.5
    assert recovery_accuracy(_stand_in(task, rows), None, task, [], 1) == 0.0
    # The prefixes are the same for every model (seeded), and different for another seed.
    assert corrupted_prefixes(task, rows, 2) == corrupted_prefixes(task, rows, 2)
    assert corrupted_prefixes(task, rows, 2) != corrupted_prefixes(task, rows, 2, seed=1)


def test_recovery_accuracy_runs_a_real_model_and_rejects_plain_tasks():
    tok = char_tokenizer()
    model = tiny_llama(len(tok), hidden=32, layers=1, heads=2, seed=0)
    rows = get_task("chain").generate(6, 0)
    assert 0.0 <= recovery_accuracy(model, tok, "chain_fix", rows, 1, max_new_tokens=4) <= 1.0
    with pytest.raises(ConfigError, match="chain_fix"):
        recovery_accuracy(model, tok, "chain", rows, 1)


def test_corrupted_teacher_trains_and_reports_recovery(tmp_path, monkeypatch):
    preset = TeacherPreset(hidden=32, layers=1, heads=2, steps=2, batch_size=8, warmup=1,
                           corrupt_fraction=1.0, max_errors=2)  # fmt: skip
    seen = []
    real = teacher_mod.masked_labels
    monkeypatch.setattr(teacher_mod, "masked_labels",
                        lambda tok, rows, *a: seen.append(rows) or real(tok, rows, *a))  # fmt: skip
    _, _, info = train_task_teacher("chain_fix", cache_dir=tmp_path, preset=preset, eval_rows=4,
                                    progress=False)  # fmt: skip
    assert len(seen) == 2 and all("masked" in r for rows in seen for r in rows)
    assert info["corrupt_fraction"] == 1.0 and info["max_errors"] == 2
    assert set(info["recovery_accuracy"]) == {"1", "2", "3"}
    clean = TeacherPreset(hidden=32, layers=1, heads=2, steps=1, batch_size=8, warmup=1)
    _, _, info = train_task_teacher("chain", cache_dir=tmp_path, preset=clean, eval_rows=4,
                                    progress=False)  # fmt: skip
    assert set(info["recovery_accuracy"]) == {"1", "2", "3"}  # clean teachers are scored too
    assert "corrupt_fraction" not in info
    with pytest.raises(ConfigError, match="no correction marker"):
        train_task_teacher("reverse", cache_dir=tmp_path, preset=preset, progress=False)
    with pytest.raises(ConfigError, match="corrupt_fraction"):
        bad = TeacherPreset(corrupt_fraction=1.5)
        train_task_teacher("sort_fix", cache_dir=tmp_path, preset=bad, progress=False)


def test_clean_teachers_keep_their_cache_keys(tmp_path, monkeypatch):
    """The corruption fields are left out of a clean teacher's key: old caches stay valid."""
    saved = []
    monkeypatch.setattr(teacher_mod, "_train", lambda *a: (None, None, {}))
    monkeypatch.setattr(
        teacher_mod, "_save_atomic", lambda m, t, i, root, path, p: saved.append(path)
    )
    train_task_teacher("chain", cache_dir=tmp_path, progress=False)
    old = {"format": 1, "task": "chain", "knobs": {"steps": 3, "max_operand": 9, "max_value": 30},
           "seed": 0, "eval_rows": 200, "hidden": 128, "layers": 2, "heads": 4, "steps": 1000,
           "batch_size": 64, "lr": 3e-3, "warmup": 100, "weight_decay": 0.01}  # fmt: skip
    digest = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:12]
    assert saved == [tmp_path / f"chain-{digest}"]


def test_plateau_rule_on_a_synthetic_curve():
    curve = [0.10, 0.30, 0.50, 0.62, 0.60, 0.61, 0.62, 0.70]
    stops = [i for i in range(1, len(curve) + 1) if plateau_reached(curve[:i], patience=3)]
    assert stops[0] == 7  # 0.60, 0.61, 0.62 do not beat 0.62 (the best before them)
    assert plateau_reached(curve[:5], patience=1) and not plateau_reached(curve[:4], patience=1)
    # An improvement must exceed min_delta to count.
    assert not plateau_reached([0.5, 0.52], patience=1)
    assert plateau_reached([0.5, 0.52], patience=1, min_delta=0.05)
    assert not plateau_reached([0.5] * 3, patience=3)  # too short to tell
    # A curve still at its starting noise is not a plateau (seed 0 of the 8-step chain run).
    noise = [0.08, 0.045, 0.02, 0.06]
    assert plateau_reached(noise, patience=3)
    assert not plateau_reached(noise, patience=3, min_rise=0.1)
    assert plateau_reached([0.08, 0.7, 0.75, 0.74, 0.75, 0.73], patience=3, min_rise=0.1)
    with pytest.raises(ValueError, match="patience"):
        plateau_reached([0.1, 0.1], patience=0)


@pytest.mark.slow
def test_plateau_warmup_in_a_tiny_sweep(tmp_path):
    """chain_fix end to end: the warm-up stops at the plateau, the teacher's recovery accuracy
    and the students' correction markers are recorded."""
    s = quality.Settings(
        task="chain_fix", seeds=1, methods=("supervised_kd",), steps=1, batch_size=4,
        train_rows=64, eval_rows=6, kl_rows=2, eval_points=(1.0,), student_hidden=16,
        student_layers=1, student_heads=2, threads=1, progress=False, workers=1,
        warmup="plateau", warmup_eval_every=1, warmup_patience=1, warmup_max_steps=5,
        valid_rows=5, cache_dir=str(tmp_path / "cache"),
        teacher_preset=TeacherPreset(hidden=32, layers=1, heads=2, steps=2, batch_size=8,
                                     warmup=1, corrupt_fraction=0.5),
    )  # fmt: skip
    lines = []
    result = quality.run_quality(s, tmp_path / "out", log=lines.append)
    # the run names its warm-up rule (MIN_RISE included) in its first lines
    assert (
        "warm-up: supervised_kd to the plateau (validation every 1 steps, patience 1, "
        "min delta 0, after a rise of 0.1 over the first evaluation; at most 5 steps)" in lines[1]
    )
    plateau = result["warmup"][0]["plateau"]
    # A 16-wide student stays at 0 %: the curve never rises (MIN_RISE), so no plateau is
    # declared and the warm-up runs to warmup_max_steps.
    assert [p["accuracy"] for p in plateau["valid_curve"]] == [0.0] * 5
    assert plateau["stopped_at"] == 5 and plateau["best_step"] == 1
    assert plateau["max_steps_reached"] and result["warmup"][0]["steps"] == 5
    assert (tmp_path / "out" / "runs" / "warmup-seed0" / "student" / "config.json").is_file()
    valid = [json.loads(x) for x in (tmp_path / "out" / "valid.jsonl").read_text().splitlines()]
    held_out = (tmp_path / "out" / "eval.jsonl").read_text()
    assert len(valid) == 5 and not any(r["prompt"] in held_out for r in valid)
    assert set(result["teacher"]["recovery_accuracy"]) == {"1", "2", "3"}
    final = result["runs"][0]["final"]
    assert {"corrections_mean", "with_correction", "errors_mean"} <= set(final)
    assert result["warmup"][0]["curve"][0]["step"] == 0  # the student at init comes first
    text = (tmp_path / "out" / "results.md").read_text()
    assert "| 5 |" in text and "(warm-up to the plateau, 5 steps" in text  # the warm-up's steps


def test_bad_plateau_settings_stop_before_any_teacher_training(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "train_task_teacher", lambda *a, **k: pytest.fail("trained"))
    for option, flag in (("warmup_patience", "--warmup-patience"), ("valid_rows", "--valid-rows")):
        s = quality.Settings(task="chain_fix", warmup="plateau", progress=False, **{option: 0})
        with pytest.raises(ConfigError, match=f"{flag} must be >= 1 with --warmup plateau"):
            quality.prepare_task(s, tmp_path / option)


def test_task_specs_and_variants():
    assert task_spec("chain_fix:steps=8") == Variant("chain_fix", {"steps": 8}, None)
    long = task_spec("sort_fix_long")
    assert long.task == "sort_fix" and long.knobs["length"] == 16
    assert long.preset.corrupt_fraction > 0 and task_spec("sort_long").preset.corrupt_fraction == 0
    assert task_spec("sort_long").knobs == long.knobs
    for name, v in VARIANTS.items():
        rows = get_task(v.task).generate(3, 0, **v.knobs)
        ids = char_tokenizer()([r["prompt"] + r["completion"] for r in rows])["input_ids"]
        assert max(map(len, ids)) < 256, name  # fits the teachers' positions
    with pytest.raises(ConfigError, match="knob=integer"):
        task_spec("chain:steps=many")
    with pytest.raises(ConfigError, match="valid knobs"):
        task_spec("chain:length=4")
