"""Method strings of the quality benchmark: 'recipe' or 'recipe:arg=value,arg=value'.

    parse_method("gkd:lmbda=1.0,beta=0.5")  ->  ("gkd", {"lmbda": 1.0, "beta": 0.5})
    label("gkd:lmbda=1.0,beta=0.0")         ->  "gkd λ=1 β=0: KL(p_teacher ‖ q_student)"
    slug("gkd:lmbda=1.0,beta=0.5")          ->  "gkd_lmbda1.0_beta0.5"   (a folder name)

Values are read as YAML, as `key=value` overrides are (`opd.config.parse_override`).
"""

from __future__ import annotations

from opd.config import parse_override
from opd.recipes import get_recipe

_BETA_NAMES = {0.0: "KL(p_teacher ‖ q_student)", 0.5: "JSD", 1.0: "KL(q_student ‖ p_teacher)"}


def parse_method(text: str) -> tuple[str, dict]:
    """'gkd:lmbda=1.0,beta=0.5' -> ('gkd', {'lmbda': 1.0, 'beta': 0.5}); values read as YAML."""
    recipe, _, rest = text.partition(":")
    return recipe.strip(), dict(parse_override(kv) for kv in rest.split(",") if kv.strip())


def prefixes_of(method: str):
    """The prefix source of a method string's recipe, built with its arguments."""
    recipe, args = parse_method(method)
    return get_recipe(recipe).build(**args).prefixes


def label(method: str) -> str:
    """A readable name: 'gkd:lmbda=1.0,beta=0.0' -> 'gkd λ=1 β=0: KL(p_teacher ‖ q_student)'."""
    recipe, args = parse_method(method)
    if recipe != "gkd" or not args:
        return method
    text = f"gkd λ={args.get('lmbda', 0.5):g} β={args.get('beta', 0.5):g}"
    name = _BETA_NAMES.get(float(args.get("beta", 0.5)))
    return f"{text}: {name}" if name else text


def slug(method: str) -> str:
    """A folder name for a method string: ':' and ',' become '_', '=' is dropped."""
    return method.replace(":", "_").replace(",", "_").replace("=", "")
