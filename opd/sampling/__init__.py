"""Prefix sources (who writes the completions) and generation backends."""

from opd.sampling.adaswitch import AdaSwitch, adaswitch
from opd.sampling.backends import (
    FastBackend,
    GenerationBackend,
    GenerationParams,
    HFBackend,
    make_backend,
)
from opd.sampling.prefix import Prefix, prefix
from opd.sampling.replay import Replay, replay
from opd.sampling.sources import (
    DatasetPrefixes,
    Mix,
    PrefixSource,
    StudentPrefixes,
    TeacherPrefixes,
    dataset,
    make_rollout,
    mix,
    student,
    teacher,
)
from opd.sampling.token_level import Speculative, TokenMix, speculative, token_mix

__all__ = [
    "GenerationBackend",
    "GenerationParams",
    "HFBackend",
    "FastBackend",
    "make_backend",
    "PrefixSource",
    "DatasetPrefixes",
    "TeacherPrefixes",
    "StudentPrefixes",
    "Mix",
    "dataset",
    "teacher",
    "student",
    "mix",
    "make_rollout",
    "TokenMix",
    "Speculative",
    "AdaSwitch",
    "Prefix",
    "Replay",
    "token_mix",
    "speculative",
    "adaswitch",
    "prefix",
    "replay",
]
