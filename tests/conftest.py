"""Shared fixtures: tiny random models and prompt files built in code (CPU, seconds)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from opd.tiny import char_tokenizer, tiny_llama

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


def write_prompts(path, n=24, seed=0, completions=True, answers=True):
    """A JSONL of short addition prompts ('3+4=' -> '7')."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            row = {"prompt": f"{a}+{b}="}
            if completions:
                row["completion"] = str(a + b)
            if answers:
                row["answer"] = str(a + b)
            fh.write(json.dumps(row) + "\n")
    return path


@pytest.fixture
def prompt_file(tmp_path):
    return write_prompts(tmp_path / "prompts.jsonl")
