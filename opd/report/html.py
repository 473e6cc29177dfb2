"""index.html of `opd report`: the figures, the per-evaluation numbers (each cell carries
its metrics.jsonl key and step as data attributes, so tests can compare them) and the
before/after sample completions beside the teacher's."""

from __future__ import annotations

from html import escape

from opd.report.summary import EVAL_COLUMNS, fmt

STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
    "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}"
    "img{max-width:540px;margin:4px}pre{white-space:pre-wrap;margin:0}"
)


def render(title: str, figures, steps, evals, samples, note: str) -> str:
    before, after, src = samples
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>",
        f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>",
        f"<p>{len(steps)} training steps, {len(evals)} evaluations logged. {escape(note)}</p>",
        "<h2>Figures</h2>",
        *(f"<img src='{p.name}' alt='{p.stem}'>" for p in figures),
        "<h2>Evaluations</h2>",
        _eval_table(evals),
    ]
    if steps:
        last = steps[-1]
        parts.append(
            f"<p id='last-step' data-step='{last['step']}' data-loss='{fmt(last.get('loss'))}'>"
            f"last step {last['step']}: loss {fmt(last.get('loss'))}, rollout "
            f"KL(q_student ‖ p_teacher) {fmt(last.get('teacher_kl'))}, "
            f"{fmt(last.get('seconds'))} s/step</p>"
        )
    parts += ["<h2>Samples: the student before and after, beside the teacher</h2>",
              f"<p>from the {escape(src)}</p>", _samples_table(before, after),
              "</body></html>"]  # fmt: skip
    return "\n".join(parts) + "\n"


def _eval_table(evals) -> str:
    if not evals:
        return "<p>no evaluation rows (data.eval empty or evaluation off)</p>"
    cols = [(k, lbl) for k, lbl in EVAL_COLUMNS if any(k in r for r in evals)]
    head = "".join(f"<th>{escape(lbl)}</th>" for _, lbl in cols)
    rows = []
    for r in evals:
        cells = "".join(
            f"<td data-step='{r['step']}' data-key='{k}'>{fmt(r.get(k))}</td>" for k, _ in cols
        )
        rows.append(f"<tr><td>{r['step']}</td>{cells}</tr>")
    return f"<table id='evals'><tr><th>step</th>{head}</tr>{''.join(rows)}</table>"


def _cell(text) -> str:
    return "<td>—</td>" if text is None else f"<td><pre>{escape(str(text))}</pre></td>"


def _samples_table(before, after) -> str:
    if not before and not after:
        return "<p>no samples</p>"
    rows = ["<tr><th>prompt</th><th>student before</th><th>student after</th>"
            "<th>teacher</th><th>answer</th></tr>"]  # fmt: skip
    for i in range(max(len(before), len(after))):
        b = before[i] if i < len(before) else {}
        a = after[i] if i < len(after) else {}
        prompt = a.get("prompt", b.get("prompt"))
        teacher = a.get("teacher", b.get("teacher"))
        rows.append(
            "<tr class='sample'>" + _cell(prompt) + _cell(b.get("student")) + _cell(a.get("student"))
            + _cell(teacher) + _cell(a.get("answer", b.get("answer"))) + "</tr>"
        )  # fmt: skip
    return f"<table id='samples'>{''.join(rows)}</table>"
