"""Shared fixtures: tiny random models and prompt files built in code (CPU, seconds)."""

from __future__ import annotations

import pytest
import torch

from opd.tiny import char_tokenizer, tiny_llama
from tests.helpers import write_prompts

# One thread: tiny models gain nothing from more, and a busy 2-core machine thrashes with 2.
torch.set_num_threads(1)


@pytest.fixture
def tok():
    return char_tokenizer()


@pytest.fixture
def tiny_models(tok):
    """(teacher, student, tokenizer): 3-layer teacher, 2-layer student, char vocabulary."""
    teacher = tiny_llama(len(tok), hidden=64, layers=3, seed=11)
    student = tiny_llama(len(tok), hidden=48, layers=2, seed=12)
    return teacher, student, tok


@pytest.fixture
def prompt_file(tmp_path):
    return write_prompts(tmp_path / "prompts.jsonl")
