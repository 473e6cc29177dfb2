"""Generation backends: one Protocol, a Hugging Face implementation (vLLM can plug in later)."""

from opd.sampling.backends.base import GenerationBackend, GenerationParams
from opd.sampling.backends.hf import HFBackend

__all__ = ["GenerationBackend", "GenerationParams", "HFBackend"]
