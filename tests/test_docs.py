"""The docs stand alone and keep up with the code.

- `docs/parts.md` is exactly `opd.catalogue.render()` (regenerate with
  `python -m opd.catalogue > docs/parts.md`), and every public part class of the part
  modules, every registered divergence, is named in it;
- the catalogue sorts classes into stages by their methods;
- `docs/writing-a-recipe.md`'s worked example and its test run as written, and the files and
  tests it points to exist.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

from opd import catalogue

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
REGENERATE = "python -m opd.catalogue > docs/parts.md"
# Modules whose public classes with describe() (or at(), for schedules) are method parts.
# `opd.signals` may become a package (its submodules are scanned too); modules that a move
# removed are skipped, but `opd.signals` must exist.
PART_MODULES = (
    "opd.sampling",
    "opd.teachers",
    "opd.weights",
    "opd.signals",
    "opd.sequence_signals",
    "opd.topk_signals",
    "opd.curriculum",
)


@pytest.fixture(scope="module")
def rendered() -> str:
    return catalogue.render()


@pytest.fixture(scope="module")
def parts_md() -> str:
    return (DOCS / "parts.md").read_text()


def test_parts_md_is_the_generated_catalogue(rendered, parts_md):
    assert parts_md == rendered, f"docs/parts.md is stale; regenerate it: {REGENERATE}"


def _part_modules():
    for name in PART_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError:
            assert name != "opd.signals", "opd.signals is gone"
            continue
        yield mod
        if hasattr(mod, "__path__"):
            for info in pkgutil.walk_packages(mod.__path__, name + "."):
                yield importlib.import_module(info.name)


def test_every_public_part_class_is_in_parts_md(parts_md):
    names = set()
    for mod in _part_modules():
        for name, obj in vars(mod).items():
            if (
                inspect.isclass(obj)
                and not name.startswith("_")
                and obj.__module__.startswith("opd.")
                and not getattr(obj, "_is_protocol", False)
                and (callable(getattr(obj, "describe", None)) or callable(getattr(obj, "at", None)))
            ):
                names.add(name)
    # The parts the hand-written table used to miss are among them.
    assert {"TopK", "SampledLogprobs", "TokenMix", "Speculative", "AdaSwitch", "Linear"} <= names
    assert {"SampledRKL", "GOPD", "MiniLLMPolicyGradient", "TopKDivergence"} <= names
    missing = sorted(n for n in names if f"| `{n}` |" not in parts_md)
    assert not missing, f"not in docs/parts.md: {missing}; regenerate it: {REGENERATE}"


def test_every_registered_divergence_is_in_parts_md(parts_md):
    from opd.losses import DIVERGENCES

    missing = sorted(n for n in DIVERGENCES if f"| `{n}` |" not in parts_md)
    assert len(DIVERGENCES) >= 12 and not missing, missing


def test_catalogue_sorts_parts_into_stages(rendered):
    stages = {p.name: set(p.stages) for p in catalogue.parts()}
    assert stages["TopK"] == stages["SampledLogprobs"] == stages["FullLogits"] == {"teacher"}
    for name in ("TokenMix", "Speculative", "AdaSwitch", "Mix", "Replay", "Prefix"):
        assert stages[name] == {"prefixes"}, name
    for name in ("Divergence", "TopKDivergence", "SampledRKL", "GOPD", "ByWriter"):
        assert stages[name] == {"signal"}, name
    for name in ("SelecTKD", "SelecTKDVerify", "AdaKD", "EntropyBand", "SpecialTokenMask"):
        assert stages[name] == {"weights"}, name
    assert stages["ByProgress"] == {"signal", "prefixes"}
    assert stages["Paced"] == {"prompts"} and stages["Linear"] == {"schedule"}
    # The interfaces themselves are not parts.
    assert not {"PrefixSource", "TeacherAccess", "StepContext", "LogsMetrics"} & set(stages)
    parts = {p.name: p for p in catalogue.parts()}
    assert parts["TokenMix"].module == "opd.sampling"
    assert parts["TokenMix"].built_by == ("token_mix(alpha, clip)",)
    assert parts["TopK"].access.startswith("provides: ") and "topk_logprobs" in parts["TopK"].access
    assert "## Teacher access" in rendered and "| `TopK` | `opd.teachers` |" in rendered


def test_catalogue_recognises_a_part_by_its_methods():
    class Source:
        def rollout(self, examples, ctx): ...
        def describe(self): ...

    class Signal:
        def __call__(self, student, teacher, ctx): ...
        def describe(self): ...

    class Weight:
        def __call__(self, values_N, student, teacher, rollout, ctx): ...
        def describe(self): ...

    class Schedule:
        def at(self, progress): ...

    class NotAPart:
        def __call__(self, x): ...

    for cls in (Source, Signal, Weight, Schedule, NotAPart):
        cls.__module__ = "opd.example"  # as if defined in the package
    assert catalogue.stages_of(Source) == ("prefixes",)
    assert catalogue.stages_of(Signal) == ("signal",)
    assert catalogue.stages_of(Weight) == ("weights",)
    assert catalogue.stages_of(Schedule) == ("schedule",)
    assert catalogue.stages_of(NotAPart) == ()


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.slow
def test_writing_a_recipe_example_runs_as_written(tmp_path):
    """The worked recipe, the 'from Python' snippet and the recipe's test, in a fresh process
    (the recipe registers itself; this keeps it out of the other tests' registry)."""
    recipe, snippet, tests = _python_blocks((DOCS / "writing-a-recipe.md").read_text())
    assert "@recipe(" in recipe and "def test_" in tests
    (tmp_path / "verified_akl_doc.py").write_text(recipe)
    (tmp_path / "doc_tests.py").write_text(tests)
    tmp = str(tmp_path)
    script = "\n".join(
        [
            "import sys",
            f"sys.path[:0] = [{tmp!r}, {str(ROOT)!r}]",
            "import verified_akl_doc  # registers the recipe",
            snippet,
            "import doc_tests",
            "from pathlib import Path",
            "from opd.tiny import char_tokenizer",
            "from tests.helpers import write_prompts",
            "doc_tests.test_verified_akl_composition()",
            f"tmp = Path({tmp!r})",
            "doc_tests.test_verified_akl_runs_two_steps(",
            "    tmp, write_prompts(tmp / 'prompts.jsonl'), char_tokenizer()",
            ")",
            "print('DOC EXAMPLE OK')",
        ]
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "DOC EXAMPLE OK" in out.stdout and "prefixes:" in out.stdout  # describe() printed


def test_writing_a_recipe_points_only_at_what_exists():
    text = (DOCS / "writing-a-recipe.md").read_text()
    assert "METHODS.md" not in text and "tests.test_train" not in text
    assert "(parts.md)" in text and (DOCS / "parts.md").is_file()
    to_be_written = {"opd/recipes/verified_akl.py", "tests/test_verified_akl.py"}
    paths = set(re.findall(r"`((?:opd|tests|docs|benchmarks)/[\w/.-]+)", text)) - to_be_written
    assert {"tests/conftest.py", "tests/helpers.py"} <= paths
    assert not [p for p in paths if not (ROOT / p.split("::")[0]).exists()]
    for path, test in re.findall(r"`(tests/[\w/.-]+\.py)::(\w+)`", text):
        assert f"def {test}(" in (ROOT / path).read_text(), f"{path}::{test}"


@pytest.mark.parametrize("doc", ["writing-a-recipe.md", "parts.md"])
def test_docs_hold_no_stale_text(doc):
    text = (DOCS / doc).read_text()
    for stale in ("METHODS.md", "being built in parallel", "use the full-logits path"):
        assert stale not in text, (doc, stale)
