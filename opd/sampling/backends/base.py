"""The generation-backend Protocol shared by every engine (Hugging Face now, vLLM later)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch


@dataclass(frozen=True)
class GenerationParams:
    """How completions are sampled.

    Attributes:
      max_new_tokens: the most tokens a completion may have.
      temperature: sampling temperature; 0 means greedy decoding.
      top_p: nucleus sampling mass (1.0 = off).
      top_k: keep only the k most likely tokens (0 = off).
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class GenerationBackend(Protocol):
    """Writes completions for a batch of tokenized prompts."""

    def generate(
        self,
        model: torch.nn.Module,
        prompts: Sequence[Sequence[int]],
        params: GenerationParams,
        *,
        pad_id: int,
        stop_ids: Sequence[int],
    ) -> list[list[int]]:
        """Return one completion (token ids) per prompt.

        Each completion ends at and includes its first stop token, or has exactly
        `params.max_new_tokens` tokens if none was produced. No padding is returned.
        """
        ...
