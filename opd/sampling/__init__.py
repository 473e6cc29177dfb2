"""Prefix sources (who writes the completions) and generation backends."""

from opd.sampling.backends import GenerationBackend, GenerationParams, HFBackend
from opd.sampling.sources import (
    DatasetPrefixes,
    Mix,
    PrefixSource,
    RolloutContext,
    StudentPrefixes,
    TeacherPrefixes,
    dataset,
    make_rollout,
    mix,
    student,
    teacher,
)

__all__ = [
    "GenerationBackend",
    "GenerationParams",
    "HFBackend",
    "PrefixSource",
    "RolloutContext",
    "DatasetPrefixes",
    "TeacherPrefixes",
    "StudentPrefixes",
    "Mix",
    "dataset",
    "teacher",
    "student",
    "mix",
    "make_rollout",
]
