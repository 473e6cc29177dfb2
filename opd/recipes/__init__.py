"""Published methods as recipes: `RECIPES = {"gkd": ..., ...}`, a plain dict.

Each recipe is a short file with its citation and deviations from the paper.
"""

from opd.recipes import gkd, on_policy_rkl, seqkd, supervised_kd  # noqa: F401  (registers)
from opd.recipes.registry import RECIPES, RecipeInfo, get_recipe, recipe

__all__ = ["RECIPES", "RecipeInfo", "get_recipe", "recipe"]
