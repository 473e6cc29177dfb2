"""Published methods as recipes: `RECIPES = {"gkd": ..., ...}`, a plain dict.

Each recipe is a short file in this folder with its citation and deviations from the paper;
every module here is imported once so its `@recipe` functions register themselves.
"""

import importlib
import pkgutil

from opd.recipes.registry import RECIPES, RecipeInfo, get_recipe, recipe

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod != "registry":
        importlib.import_module(f"{__name__}.{_mod}")

__all__ = ["RECIPES", "RecipeInfo", "get_recipe", "recipe"]
