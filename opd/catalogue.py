"""The catalogue of method parts, read from the package itself (it writes `docs/parts.md`).

    python -m opd.catalogue > docs/parts.md

A part is a public class defined in a module under `opd` (the benchmarks excepted) that has
`describe()` and the method of one stage of the loop; a class is listed under every stage
whose method it has (`ByProgress` is both a signal and a prefix source):

    stage            Method field   the class has
    prompt selector  prompts        select(stream, ctx)
    prefix source    prefixes       rollout(examples, ctx)
    teacher access   teacher        score(teacher, rollout, vocab_size)
    signal           signal         __call__(student, teacher, ctx)
    token weight     weights        __call__(values_N, student, teacher, rollout, ctx)
    schedule         a parameter    at(progress)

Protocols (the interfaces themselves) are left out. Each part is shown with the shortest
public module that exports it, the functions anywhere under `opd` annotated to return it
("built by"), what the teacher must return for it (`requires`) or what a teacher access
returns (`provides`), and the first line of its docstring. The registered divergences
(`opd.losses.DIVERGENCES`, each usable as `Divergence(name, params)`) follow, with their
parameters. Nothing here is maintained by hand, so the listing cannot fall behind the code:
`tests/test_docs.py` checks that `docs/parts.md` equals `render()`.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from dataclasses import dataclass
from types import ModuleType

import opd

SKIPPED_PACKAGES = ("opd.bench", "opd.catalogue")
"""Not scanned: the benchmarks (not parts of a method) and this module."""


@dataclass(frozen=True)
class Stage:
    title: str
    field: str
    interface: str


STAGES = {
    "prompts": Stage("Prompt selectors", "`prompts`", "`select(stream, ctx) -> examples`"),
    "prefixes": Stage("Prefix sources", "`prefixes`", "`rollout(examples, ctx) -> Rollout`"),
    "teacher": Stage(
        "Teacher access", "`teacher`", "`score(teacher, rollout, vocab_size) -> TeacherScores`"
    ),
    "teacher object": Stage(
        "Teachers",
        "`model.teacher` (the object an access mode asks)",
        "`logprobs(rollout, k, temperature, vocab_size) -> TeacherScores`; `provides`",
    ),
    "signal": Stage("Signals", "`signal`", "`__call__(student, teacher, ctx) -> values_N`"),
    "weights": Stage(
        "Token weights",
        "`weights`",
        "`__call__(values_N, student, teacher, rollout, ctx) -> w_N`",
    ),
    "schedule": Stage(
        "Schedules",
        "a parameter of a part",
        "`at(progress) -> value`, progress = step / total steps in [0, 1]",
    ),
}


@dataclass(frozen=True)
class Part:
    name: str
    module: str  # the shortest public module that exports it
    stages: tuple[str, ...]
    built_by: tuple[str, ...]
    access: str  # what it needs from the teacher, or what a teacher access provides
    summary: str


def _modules() -> list[ModuleType]:
    names = ["opd"] + [
        m.name
        for m in pkgutil.walk_packages(opd.__path__, "opd.")
        if not m.name.startswith(SKIPPED_PACKAGES) and not m.name.endswith("__main__")
    ]
    return [importlib.import_module(n) for n in sorted(names)]


def _call_params(cls) -> list[str]:
    try:
        return [p for p in inspect.signature(cls.__call__).parameters if p != "self"]
    except (TypeError, ValueError):
        return []


def stages_of(cls) -> tuple[str, ...]:
    """The stages a class serves, by the methods it has (empty for a non-part)."""
    if getattr(cls, "_is_protocol", False):
        return ()
    if not callable(getattr(cls, "describe", None)):  # only a schedule needs no describe()
        return ("schedule",) if callable(getattr(cls, "at", None)) else ()
    found = []
    if callable(getattr(cls, "select", None)):
        found.append("prompts")
    if callable(getattr(cls, "rollout", None)):
        found.append("prefixes")
    if callable(getattr(cls, "score", None)):
        found.append("teacher")
    if callable(getattr(cls, "logprobs", None)) and hasattr(cls, "describe"):
        found.append("teacher object")
    if "__call__" in _own_attrs(cls):  # not `type.__call__`, nor torch.nn.Module's
        params = _call_params(cls)
        if params[:1] and params[0].startswith("values"):
            found.append("weights")
        elif "teacher" in params:
            found.append("signal")
    if callable(getattr(cls, "at", None)):
        found.append("schedule")
    return tuple(found)


def _own_attrs(cls) -> set[str]:
    """Attributes defined by the class or an opd base class (not by `object` or `type`)."""
    return {k for base in cls.__mro__ if base.__module__.startswith("opd") for k in vars(base)}


def _summary(cls) -> str:
    doc = inspect.getdoc(cls) or ""
    if not doc or doc.startswith(cls.__name__ + "("):  # a dataclass's generated signature
        return "(no docstring)"
    return doc.split("\n\n")[0].replace("\n", " ").strip()


def _access(cls) -> str:
    for attr in ("provides", "requires"):
        value = inspect.getattr_static(cls, attr, None)
        if value is None:
            continue
        if isinstance(value, (property, staticmethod, classmethod)) or callable(value):
            return f"{attr}: by its arguments"
        if isinstance(value, str):
            return f"{attr}: {value}"
        if isinstance(value, (set, frozenset, tuple, list)):
            return f"{attr}: {', '.join(sorted(map(str, value)))}"
    return ""


def _public_module(cls, modules: list[ModuleType]) -> str:
    """The shortest of: the defining module, and modules that export `cls` in `__all__`."""
    homes = [cls.__module__] + [
        m.__name__
        for m in modules
        if cls.__name__ in getattr(m, "__all__", ()) and getattr(m, cls.__name__, None) is cls
    ]
    return min(homes, key=lambda n: (n.count("."), len(n), n))


def _return_type(fn):
    """The object `fn`'s return annotation names (annotations may be strings), or None."""
    ret = fn.__annotations__.get("return")
    if isinstance(ret, str):
        try:
            ret = eval(ret, fn.__globals__)  # noqa: S307 - our own modules' annotations
        except Exception:  # noqa: BLE001 - e.g. `X | None` on an old Python; not a builder
            return None
    return ret


def _builders(modules: list[ModuleType]) -> dict[type, set[str]]:
    """Class -> public functions annotated to return it, as `name(arg, ...)`."""
    out: dict[type, set[str]] = {}
    for m in modules:
        for fname, fn in vars(m).items():
            if fname.startswith("_") or not inspect.isfunction(fn) or fn.__module__ != m.__name__:
                continue
            ret = _return_type(fn)
            if inspect.isclass(ret):
                args = ", ".join(inspect.signature(fn).parameters)
                out.setdefault(ret, set()).add(f"{fname}({args})")
    return out


def parts() -> list[Part]:
    """Every part under `opd`, sorted by name."""
    modules = _modules()
    builders = _builders(modules)
    found = {}
    for m in modules:
        for name, cls in vars(m).items():
            if (
                name.startswith("_")
                or not inspect.isclass(cls)
                or cls.__module__ != m.__name__
                or not stages_of(cls)
            ):
                continue
            found[cls] = Part(  # keyed by class: a re-export is found once
                name=name,
                module=_public_module(cls, modules),
                stages=stages_of(cls),
                built_by=tuple(sorted(builders.get(cls, ()))),
                access=_access(cls),
                summary=_summary(cls),
            )
    return sorted(found.values(), key=lambda p: (p.name.lower(), p.module))


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def divergence_rows() -> list[tuple[str, str, str]]:
    """(name, parameters, first docstring line) of every registered divergence."""
    from opd.losses import DIVERGENCES, divergence_params

    rows = []
    for name in sorted(DIVERGENCES):
        doc = inspect.getdoc(DIVERGENCES[name]) or "(no docstring)"
        params = ", ".join(divergence_params(name)) or "—"
        rows.append((name, params, doc.split("\n\n")[0].replace("\n", " ").strip()))
    return rows


def render() -> str:
    """The markdown of `docs/parts.md`."""
    all_parts = parts()
    lines = [
        "# The parts of a method",
        "",
        "Generated from the package by `python -m opd.catalogue > docs/parts.md`; do not edit",
        "by hand (`tests/test_docs.py` fails when this file and the code disagree). How the",
        "parts are found is in the docstring of `opd/catalogue.py`; how to compose them into a",
        "recipe, and how to write a new one, is in `docs/writing-a-recipe.md`.",
        "",
        "A `Method` (`opd.method`) names one part per stage: `Method(prefixes=..., "
        "teacher=..., signal=..., weights=(...), reduction=..., prompts=...)`.",
        "",
        "| stage | `Method` field | interface | parts |",
        "|---|---|---|---:|",
    ]
    for key, stage in STAGES.items():
        n = sum(key in p.stages for p in all_parts)
        lines.append(f"| {stage.title.lower()} | {stage.field} | {stage.interface} | {n} |")
    lines += [
        '| reduction | `reduction` | `"token_mean"` or `"sequence_mean"` (`opd.losses`) | — |',
    ]
    for key, stage in STAGES.items():
        lines += [
            "",
            f"## {stage.title}",
            "",
            "| part | import from | built by | teacher | what it is |",
            "|---|---|---|---|---|",
        ]
        for p in all_parts:
            if key in p.stages:
                built = ", ".join(f"`{b}`" for b in p.built_by) or "the class"
                lines.append(
                    f"| `{p.name}` | `{p.module}` | {_cell(built)} | {_cell(p.access) or '—'} "
                    f"| {_cell(p.summary)} |"
                )
    lines += [
        "",
        "## Divergences",
        "",
        "Each registered divergence is a signal through `Divergence(name, params, temperature)`",
        "(`opd.signals`), computed chunked over the vocabulary; any parameter may be a schedule.",
        "",
        "| name | parameters | what it is |",
        "|---|---|---|",
    ]
    for name, params, doc in divergence_rows():
        lines.append(f"| `{name}` | {_cell(params)} | {_cell(doc)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
