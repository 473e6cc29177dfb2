"""A multi-teacher ensemble: p = Σ_k w_k · p_k (survey eq. 31).

`TeacherEnsemble` bundles K frozen teacher models and their weights. Full-logit access
(`FullLogits`) scores every member and the divergence is taken to the mixture, chunk by
chunk (`opd.losses.mixture`), so every full-logit recipe works with several teachers. Set it
from the command line with `model.teacher=PATH_A,PATH_B model.teacher_weights=0.7,0.3`.
Generation by an ensemble teacher (the `teacher` prefix source) is not supported.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from opd.errors import ConfigError
from opd.losses.mixture import check_weights


class TeacherEnsemble(torch.nn.Module):
    """K teacher models with mixture weights (normalised to sum to 1)."""

    def __init__(self, members: Sequence[torch.nn.Module], weights: Sequence[float] | None = None):
        super().__init__()
        if len(members) < 2:
            raise ConfigError(f"a teacher ensemble needs at least 2 teachers, got {len(members)}")
        weights = [1.0] * len(members) if weights is None else weights
        try:
            self.weights = check_weights(weights, len(members))
        except ValueError as err:
            raise ConfigError(f"model.teacher_weights: {err}") from None
        self.members = torch.nn.ModuleList(members)

    @property
    def config(self):
        return self.members[0].config

    def generate(self, *args, **kwargs):
        raise ConfigError(
            "a teacher ensemble cannot write completions; use a recipe whose prefixes are "
            "written by the student or the dataset"
        )
