"""Checks a served teacher must pass before training: same tokenizer, k within the server's cap.

Tokenizer (`check_tokenizer`): token ids only mean the same thing if both sides tokenise alike.

    opd     GET /opd/tokenizer -> {"fingerprint", "vocab_size", "name"}, compared with
            `opd.teachers.fingerprint.tokenizer_fingerprint(student tokenizer)`; on a mismatch
            the probe below finds the first differing position
    vllm    POST /tokenize {"prompt": PROBE, "add_special_tokens": false} -> "tokens"
    sglang  POST /generate {"text": PROBE, max_new_tokens 0, logprobs from 0} -> the ids of
            meta_info.input_token_logprobs (a leading BOS the server adds is ignored)

and the ids must equal `tokenizer.encode(PROBE, add_special_tokens=False)`. PROBE mixes ASCII,
digits, accents, CJK and whitespace runs, where tokenizers of different families part.

k (`check_k`): opd reads `max_logprobs` from GET /v1/models; vLLM is asked for a 2-token
prompt with prompt_logprobs = k, and a 400 about log-probs means its `--max-logprobs` is lower;
SGLang documents no cap, so nothing is checked there.
"""

from __future__ import annotations

from opd.errors import ConfigError
from opd.teachers import wire
from opd.teachers.fingerprint import tokenizer_fingerprint  # the server runs the same
from opd.teachers.http import TeacherRejected

PROBE = "Probe: ASCII 0123456789 naïve café Ünïcödé 東京 中文字 \t tab  two  spaces\nnew line ~`^|"
"""The text both tokenizers must split into the same ids."""


def _tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def first_difference(a: list[int], b: list[int]) -> int:
    """The first index where the two id lists differ (the shorter length if one is a prefix)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


class ServedChecks:
    """The pre-training checks of `ServedTeacher` (mixed in; uses its transport and api)."""

    def check_tokenizer(self, tokenizer) -> None:
        """Refuse, naming both tokenizers and the first differing position, a server whose
        tokenizer is not the student's."""
        api = self.api
        mine = list(tokenizer.encode(PROBE, add_special_tokens=False))
        server_name = f"the {api} server's tokenizer"
        if api == "opd":
            info = self.transport.call("GET", "/opd/tokenizer", parse=_tokenizer_info)
            server_name = f"server tokenizer '{info.get('name') or '?'}'"
            if info["fingerprint"] == tokenizer_fingerprint(tokenizer):
                return
            theirs = self._server_ids_vllm()
        elif api == "vllm":
            theirs = self._server_ids_vllm()
        else:
            theirs = self._server_ids_sglang(tokenizer)
        if theirs == mine and api != "opd":
            return
        where = (
            f"the probe text tokenises differently from id position {first_difference(mine, theirs)} "
            f"(server {theirs[:12]}..., student {mine[:12]}...)"
            if theirs != mine
            else "the probe text tokenises alike, but the vocabularies or special tokens differ"
        )
        raise ConfigError(
            f"teacher {self.url}: {server_name} is not the student's tokenizer "
            f"'{_tokenizer_name(tokenizer)}': {where}; serve a teacher with the student's "
            "tokenizer"
        )

    def _server_ids_vllm(self) -> list[int]:
        body = {"model": self.model_name, "prompt": PROBE, "add_special_tokens": False}
        return self.transport.call("POST", "/tokenize", body, parse=_tokens)

    def _server_ids_sglang(self, tokenizer) -> list[int]:
        body = {
            "text": PROBE,
            "sampling_params": {"max_new_tokens": 0, "temperature": 1.0},
            "return_logprob": True,
            "logprob_start_len": 0,
        }

        def ids(resp):
            item = resp[0] if isinstance(resp, list) and resp else resp
            entries = item["meta_info"]["input_token_logprobs"]
            return [int(e[1]) for e in entries]

        theirs = self.transport.call("POST", "/generate", body, parse=ids)
        bos = getattr(tokenizer, "bos_token_id", None)
        if theirs and bos is not None and theirs[0] == bos:
            theirs = theirs[1:]  # SGLang tokenises text with the model's special tokens
        return theirs

    def check_k(self, k: int) -> None:
        """Refuse a top-k the server cannot return, naming the flag that raises its cap."""
        if not k:
            return
        api = self.api
        if api == "opd":
            cap = (self._first_model() or {}).get("max_logprobs")
            if isinstance(cap, int) and k > cap:
                raise ConfigError(
                    f"teacher {self.url} returns at most {cap} log-probs per position but the "
                    f"recipe asks for top-{k}: restart it with `opd serve-teacher ... "
                    f"--max-logprobs {k}` or lower k"
                )
        elif api == "vllm":
            body = wire.vllm_request(self.model_name, [[0, 0]], k, 1.0)
            try:
                self.transport.call("POST", "/v1/completions", body)
            except TeacherRejected as err:
                if "logprob" not in err.server_text.lower():
                    raise
                raise ConfigError(
                    f"teacher {self.url} refuses top-{k} prompt log-probs ({err.server_text}): "
                    f"start vLLM with --max-logprobs {k} or lower k"
                ) from None


def _tokenizer_info(body) -> dict:
    if not isinstance(body, dict) or not isinstance(body.get("fingerprint"), str):
        raise wire.MalformedResponse("GET /opd/tokenizer has no 'fingerprint'")
    return body


def _tokens(body) -> list[int]:
    tokens = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise wire.MalformedResponse("POST /tokenize has no 'tokens' list of ids")
    return tokens
