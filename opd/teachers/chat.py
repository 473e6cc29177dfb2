"""A black-box text teacher behind an OpenAI-compatible chat endpoint (`/v1/chat/completions`).

    model.teacher=http://HOST:PORT/v1  model.teacher_api=openai-chat  model.teacher_model=NAME

`ChatTeacher.provides == {"text"}`: it writes, it never scores. Each request is

    POST {base}/chat/completions  {"model": NAME, "messages": [...], "max_tokens": M,
                                   "temperature": τ, "n": n, ["top_p"], ["top_k"], ["seed"]}
    -> choices[i] = {"index": i, "message": {"content": TEXT}, "finish_reason": "stop"|...}

where {base} is the URL as given when its path ends in /v1, else URL + /v1. The transport is
the served teacher's (`opd.teachers.served.client_transport` → `opd.teachers.http.Transport`):
`model.teacher_concurrency` requests in flight, `model.teacher_timeout`,
`model.teacher_retries` with backoff, 5xx / malformed bodies / timeouts retried and counted
(`teacher_errors`, `teacher_retries`, `teacher_timeouts`, per step in metrics.jsonl), 4xx a
one-line `TeacherRejected`, a spent budget `TeacherUnreachable` (the loop rewinds the step,
checkpoints and exits 2). The bearer token comes from the environment variable named by
`model.teacher_token_env` and is never logged or saved.

Messages: a chat row's own turns (system included, before the student's chat template); a
plain prompt as one user turn; a prompt cut by `data.max_prompt_tokens` (its raw text is gone)
as the decoded kept ids, one user turn. Consecutive rows with the same prompt (`Grouped`)
share one request with n = their count.

Teacher-written prefixes (`write`): each choice's text is re-tokenised with the student's
tokenizer (no special tokens added), cut after its first stop id, and, when the endpoint says
finish_reason "stop" (the teacher ended its turn), ended with the student's end id (the
end-of-turn token for a chat-templated prompt, else eos), all within `max_new_tokens`. So the
rows look like the student's own completions (`GenerationBackend`'s contract).

Sampling: the run's `sampling.temperature`, `top_p` and `top_k` (sent only when not 1 / 0;
OpenAI's own API has no top_k). At τ > 0 each request carries a `seed` drawn from torch's
global RNG, which the loop rewinds on a failed step and a checkpoint restores, so a server
that honours `seed` (vLLM, `opd serve-teacher`) writes the same text again on a retry or a
resume. The judge (`judge`) asks greedily (τ = 0, n = 1) for a few tokens.

Deviations: `max_tokens` counts the endpoint's tokens, not the student's (the text is cut to
`max_new_tokens` student tokens after re-tokenising); an endpoint that ignores `seed` makes a
resumed run differ from an uninterrupted one; `content: null` (a refusal) is an empty text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from urllib.parse import urlsplit

import torch

from opd.errors import ConfigError
from opd.teachers import wire
from opd.teachers.served import client_transport

API = "openai-chat"
MAX_SEED = 2**31 - 1


@dataclass(frozen=True)
class Choice:
    """One written completion: the text and why it ended ("stop", "length", ...)."""

    text: str
    finish_reason: str | None


def parse_choices(body, n: int) -> list[Choice]:
    """The n choices of a chat-completion body, by index (`wire.MalformedResponse` if not)."""
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or len(choices) != n:
        got = len(choices) if isinstance(choices, list) else "no"
        raise wire.MalformedResponse(f"chat completion: expected {n} choices, got {got}")
    out: list[Choice | None] = [None] * n
    for pos, choice in enumerate(choices):
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            raise wire.MalformedResponse(f"chat completion: choice {pos} has no 'message'")
        text = message.get("content")
        if text is not None and not isinstance(text, str):
            raise wire.MalformedResponse(f"chat completion: choice {pos} content is not text")
        index = choice.get("index", pos)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
            raise wire.MalformedResponse(f"chat completion: choice {pos} has index {index!r}")
        if out[index] is not None:
            raise wire.MalformedResponse(f"chat completion: index {index} given twice")
        out[index] = Choice(text or "", choice.get("finish_reason"))
    return out  # type: ignore[return-value]


def example_messages(example, tokenizer) -> list[dict]:
    """The chat messages that ask the teacher for `example`'s completion (module doc)."""
    raw = getattr(example, "raw_prompt", None)
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if raw:  # chat turns as ((key, value), ...) pairs
        return [dict(turn) for turn in raw]
    text = tokenizer.decode(list(example.prompt_ids), skip_special_tokens=True)
    return [{"role": "user", "content": text}]


def student_end_id(example, tokenizer) -> int | None:
    """The id that ends the student's completion of `example` (encode's own choice)."""
    from opd.data.encode import _turn_end_id

    view = getattr(example, "view", None)
    chat = view.chat if view is not None else isinstance(example.raw_prompt, tuple)
    return _turn_end_id(tokenizer) if chat else tokenizer.eos_token_id


def retokenize(
    choice: Choice, tokenizer, max_new_tokens: int, stop_ids, end_id: int | None
) -> list[int]:
    """The student's ids for a teacher's text: cut after the first stop id, ended with
    `end_id` when the teacher stopped on its own, at most `max_new_tokens` (module doc)."""
    ids = [int(i) for i in tokenizer(choice.text, add_special_tokens=False).input_ids]
    stops = set(stop_ids)
    cut = next((i + 1 for i, t in enumerate(ids) if t in stops), None)
    if cut is not None:
        ids = ids[:cut]
    elif choice.finish_reason == "stop" and end_id is not None:
        ids.append(int(end_id))
    return ids[:max_new_tokens]


class ChatTeacher:
    """A teacher that writes through an OpenAI-compatible chat endpoint (module doc)."""

    provides = frozenset({"text"})

    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        concurrency: int = 4,
        timeout_s: float = 60.0,
        retries: int = 4,
        backoff_s: float = 0.5,
        token_env: str | None = None,
        transport=None,
        sleep=time.sleep,
    ):
        self.transport = client_transport(
            url,
            concurrency=concurrency,
            timeout_s=timeout_s,
            retries=retries,
            backoff_s=backoff_s,
            token_env=token_env,
            transport=transport,
            sleep=sleep,
        )
        self.url = self.transport.url
        path = urlsplit(self.url).path.rstrip("/")
        self.path = "/chat/completions" if path.endswith("/v1") else "/v1/chat/completions"
        self._model = model or None

    # ------------------------------------------------------------------ identity

    @property
    def model_name(self) -> str:
        """`model.teacher_model`, else the first id of GET {base}/models (asked once)."""
        if self._model is None:

            def first_id(body):
                data = body.get("data") if isinstance(body, dict) else None
                if not isinstance(data, list) or not data or not isinstance(data[0], dict):
                    raise wire.MalformedResponse("GET /models has no 'data' list")
                return data[0].get("id")

            name = self.transport.call(
                "GET",
                self.path.replace("/chat/completions", "/models"),
                parse=first_id,
                missing_ok=True,
            )
            if not isinstance(name, str) or not name:
                raise ConfigError(
                    f"teacher {self.url}: GET /models names no model; set model.teacher_model"
                )
            self._model = name
        return self._model

    def describe(self) -> str:
        name = self._model or "its first model"
        return f"chat teacher {self.url} (OpenAI-compatible chat completions, {name})"

    def check_tokenizer(self, tokenizer) -> None:
        """Nothing to check: the teacher's text is re-tokenised with the student's tokenizer."""

    # ------------------------------------------------------------------ writing

    def complete(
        self,
        conversations: list[list[dict]],
        counts: list[int],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        top_k: int = 0,
        seeds: list[int] | None = None,
    ) -> list[list[Choice]]:
        """counts[i] choices for each conversation, one request each, `concurrency` at once."""
        if not max_tokens >= 1:
            raise ConfigError(f"chat teacher: max_tokens must be >= 1, got {max_tokens}")
        start = time.perf_counter()
        try:
            name = self.model_name
            bodies, parses = [], []
            for i, (messages, n) in enumerate(zip(conversations, counts)):
                body = {
                    "model": name,
                    "messages": messages,
                    "max_tokens": int(max_tokens),
                    "temperature": float(temperature),
                    "n": int(n),
                }
                if top_p < 1.0:
                    body["top_p"] = float(top_p)
                if top_k > 0:
                    body["top_k"] = int(top_k)  # vLLM's extension; OpenAI would refuse it
                if seeds is not None:
                    body["seed"] = int(seeds[i])
                bodies.append(body)
                parses.append(partial(parse_choices, n=int(n)))
            return self.transport.map(self.path, bodies, parses)
        finally:
            self.transport.count("teacher_seconds", time.perf_counter() - start)

    def write(self, examples, ctx) -> list[list[int]]:
        """The teacher's completions of `examples` as the student's token ids (module doc)."""
        tok, params = ctx.tokenizer, ctx.params
        runs: list[list] = []  # consecutive examples with the same prompt: one request
        for ex in examples:
            if runs and runs[-1][0].prompt_ids == ex.prompt_ids:
                runs[-1].append(ex)
            else:
                runs.append([ex])
        seeds = None
        if not params.greedy:  # from the global RNG: rewound on a failed step, checkpointed
            seeds = torch.randint(0, MAX_SEED, (len(runs),)).tolist()
        answers = self.complete(
            [example_messages(run[0], tok) for run in runs],
            [len(run) for run in runs],
            max_tokens=params.max_new_tokens,
            temperature=0.0 if params.greedy else params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            seeds=seeds,
        )
        out = []
        for run, choices in zip(runs, answers):
            end_id = student_end_id(run[0], tok)
            out += [
                retokenize(c, tok, params.max_new_tokens, ctx.stop_ids, end_id) for c in choices
            ]
        return out

    def judge(self, prompts: list[str], max_tokens: int) -> list[str]:
        """Greedy answers (τ = 0, one each) to `prompts`, each sent as one user turn."""
        answers = self.complete(
            [[{"role": "user", "content": p}] for p in prompts],
            [1] * len(prompts),
            max_tokens=max_tokens,
            temperature=0.0,
        )
        return [choices[0].text for choices in answers]

    # ------------------------------------------------------------------ refusals, bookkeeping

    def logprobs(self, rollout, k: int, temperature: float, vocab_size: int):
        what = f"top-{k} log-probs" if k else "token log-probs"
        raise ConfigError(
            f"{self.describe()} only writes text; it cannot give {what}: use a black-box "
            "recipe (orpo_distill, ovd) or a log-prob server (model.teacher_api=vllm, sglang, opd)"
        )

    def pop_stats(self) -> dict:
        """Counters since the last call (see `opd.teachers.http.COUNTERS`)."""
        return self.transport.pop_stats()

    def close(self) -> None:
        self.transport.close()


def text_teacher(ctx):
    """The run's text-writing teacher that is not a local model (a `ChatTeacher`), or None."""
    teacher = getattr(getattr(ctx, "models", None), "teacher", None)
    return teacher if callable(getattr(teacher, "write", None)) else None


def chat_teacher(m) -> ChatTeacher:
    """The `ChatTeacher` that `model.teacher=URL model.teacher_api=openai-chat` and the other
    `model.teacher_*` keys (`m`, the config's model section) name."""
    if "," in m.teacher:
        raise ConfigError(
            f"model.teacher={m.teacher!r}: a chat teacher cannot be part of an ensemble"
        )
    if m.teacher_tokenizer:
        raise ConfigError(
            f"model.teacher_tokenizer={m.teacher_tokenizer!r}: not used with "
            f"model.teacher_api={API} (the teacher's text is re-tokenised with the student's "
            "tokenizer); leave it empty"
        )
    return ChatTeacher(
        m.teacher.strip(),
        model=m.teacher_model or None,
        concurrency=m.teacher_concurrency,
        timeout_s=m.teacher_timeout,
        retries=m.teacher_retries,
        token_env=m.teacher_token_env or None,
    )
