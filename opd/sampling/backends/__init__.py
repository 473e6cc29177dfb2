"""Generation backends: one Protocol; Hugging Face `generate` (the reference) and a lean
static-cache decode loop for Llama-family models (vLLM can plug in later)."""

from opd.sampling.backends.base import GenerationBackend, GenerationParams
from opd.sampling.backends.fast import BACKENDS, FastBackend, make_backend
from opd.sampling.backends.hf import HFBackend

__all__ = ["BACKENDS", "FastBackend", "GenerationBackend", "GenerationParams", "HFBackend",
           "make_backend"]
