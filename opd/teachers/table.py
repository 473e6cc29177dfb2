"""Which recipes each kind of teacher serves, computed from the recipes themselves.

A recipe needs some teacher outputs (`opd.teachers.base.method_needs`: its access mode's
`needs`, plus "text" when its prefix source makes the teacher write); a kind of teacher serves
it when it provides them all. `python -m opd.teachers.table` prints the markdown table that
README.md carries between `<!-- teacher-table -->` markers (a test keeps the two equal).
"""

from __future__ import annotations

from opd.recipes import RECIPES
from opd.teachers.base import OUTPUTS, method_needs

KINDS = {
    "local model": frozenset(OUTPUTS),
    "local ensemble (A,B)": frozenset({"full_logits"}),
    "served (vLLM, SGLang, opd serve-teacher)": frozenset({"topk_logprobs", "token_logprobs"}),
}
"""Each kind of teacher and what it provides (`LocalTeacher`, `TeacherEnsemble`, `ServedTeacher`)."""


def serves(kind: str, method) -> bool:
    needs = set(method_needs(method))
    if getattr(method.teacher, "ensemble", False) and kind == "local model":
        return False  # the recipe distills from several teachers
    return needs <= KINDS[kind]


def rows() -> list[tuple[str, str, list[bool]]]:
    """(recipe, what it needs, [serves(kind) for each kind]) for every registered recipe."""
    out = []
    for name in sorted(RECIPES):
        method = RECIPES[name].build()
        needs = ", ".join(o for o in OUTPUTS if o in method_needs(method))
        needs = needs or "nothing (self-teacher or rewards only)"  # self-distillation, grpo
        out.append((name, needs, [serves(kind, method) for kind in KINDS]))
    return out


def render() -> str:
    lines = [
        "| recipe | needs from the teacher | " + " | ".join(KINDS) + " |",
        "|---|---|" + "---|" * len(KINDS),
    ]
    for name, needs, ok in rows():
        marks = " | ".join("yes" if x else "—" for x in ok)
        lines.append(f"| `{name}` | {needs} | {marks} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
