"""An offline teacher cache: a teacher's top-k (+ tail) log-probabilities of a dataset's
completions, computed once (`opd cache-teacher`) and read back by `CachedTeacher`.

For every row of the dataset the prompt and its reference completion are encoded exactly as
the `dataset` prefix source does (`opd.sampling.sources.DatasetPrefixes`: completion truncated
to `sampling.max_new_tokens`), scored by the local teacher with
`LocalTeacher.logprobs(rollout, k, τ, V)` and stored per counted completion token t:

    topk_ids_NK       (N, k + 1) int64    the k most likely ids under p_τ, then TAIL_ID (−1)
    topk_logprobs_NK  (N, k + 1) float32  their log p_τ, then log(1 − Σ_k p_τ) (the tail)
    token_logprobs_N  (N,)       float32  log p_τ(y_t) of the written token

Layout of DIR: `manifest.json` (format, teacher, tokenizer fingerprint, k, τ, V, data spec,
max_new_tokens, rows, tokens, and per shard its file, rows, tokens and sha256) and shards
`shard-00000.safetensors`, ... each holding, for R rows and N tokens, the tensors above plus
`prompt_ids` / `completion_ids` (all rows' ids, concatenated), `prompt_offsets_R1`,
`completion_offsets_R1` (R + 1 offsets into them) and `token_offsets_R1` (R + 1 offsets into
the N token rows). safetensors only, never pickle. The whole folder is written under a
temporary name beside DIR and renamed at the end, so DIR is either complete or absent.

Lookup. A rollout row is found by the exact ids of its prompt (unpadded) and its counted
completion tokens: key = blake2b(prompt ids, −1, completion ids). A row not in the cache is a
`ConfigError` naming the cache (the prefixes must be the cached dataset's completions), unless
a `fallback` teacher is given: then a batch with any uncached row is scored by the fallback
(used by mixed recipes such as GKD, whose batches are either all dataset or all student rows).
Top-k for k' < k cached is the first k' columns with the tail recomputed (`with_tail`), which
is what the live teacher returns for k'; k' > k or another τ or V is refused.
Shards are verified against the manifest's sha256 when the cache is opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from opd.errors import ConfigError
from opd.sampling.sources import make_rollout
from opd.teachers.base import LocalTeacher
from opd.teachers.fingerprint import tokenizer_fingerprint
from opd.teachers.topk import TAIL_ID, with_tail
from opd.types import Rollout, TeacherScores

FORMAT = "opd-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
PREFIX = "cache:"
"""`model.teacher=cache:DIR` names a teacher cache."""


def is_cache(spec: str) -> bool:
    """True when a `model.teacher` value names a teacher cache (cache:DIR)."""
    return spec.strip().startswith(PREFIX)


def row_key(prompt_ids, completion_ids) -> bytes:
    """The lookup key of one row: a hash of its exact prompt and completion ids."""
    ids = np.asarray([*prompt_ids, -1, *completion_ids], dtype=np.int64)
    return hashlib.blake2b(ids.tobytes(), digest_size=16).digest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _offsets(lengths) -> torch.Tensor:
    return torch.tensor([0, *np.cumsum(lengths, dtype=np.int64).tolist()], dtype=torch.long)


def _shard_tensors(rows: list) -> dict:
    """One shard's tensors from [(prompt, completion, ids_NK, logprobs_NK, token_N)]."""
    cat = torch.cat
    return {
        "prompt_ids": torch.tensor([t for r in rows for t in r[0]], dtype=torch.long),
        "completion_ids": torch.tensor([t for r in rows for t in r[1]], dtype=torch.long),
        "prompt_offsets_R1": _offsets([len(r[0]) for r in rows]),
        "completion_offsets_R1": _offsets([len(r[1]) for r in rows]),
        "token_offsets_R1": _offsets([len(r[4]) for r in rows]),
        "topk_ids_NK": cat([r[2] for r in rows]).to(torch.long).contiguous(),
        "topk_logprobs_NK": cat([r[3] for r in rows]).float().contiguous(),
        "token_logprobs_N": cat([r[4] for r in rows]).float().contiguous(),
    }


@torch.no_grad()
def write_cache(
    model,
    examples,
    out_dir,
    *,
    k: int,
    temperature: float,
    vocab_size: int,
    pad_id: int,
    max_new_tokens: int,
    tokenizer,
    shard_rows: int = 1024,
    batch_size: int = 16,
    meta: dict | None = None,
) -> dict:
    """Score `examples` (`opd.data.Example`s with completions) with the local teacher `model`
    and write the cache folder `out_dir` (layout in the module docstring). Returns the manifest.

    Raises:
      ConfigError: `out_dir` exists, or a row has no completion.
    """
    out = Path(out_dir)
    if out.exists():
        raise ConfigError(f"--out {out}: already exists; give a new folder (nothing was written)")
    missing = [ex for ex in examples if ex.completion_ids is None]
    if missing:
        raise ConfigError(
            f"{missing[0].source}: a teacher cache is for rows WITH completions (the 'dataset' "
            "prefix source); this row has no 'completion' field or final assistant message"
        )
    teacher = LocalTeacher(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        rows, shards, tokens = [], [], 0
        for start in range(0, len(examples), batch_size):
            exs = examples[start : start + batch_size]
            prompts = [list(ex.prompt_ids) for ex in exs]
            comps = [list(ex.completion_ids[:max_new_tokens]) for ex in exs]
            ro = make_rollout(prompts, comps, pad_id, "dataset")
            scores = teacher.logprobs(ro, k, temperature, vocab_size)
            at = 0
            for p, c in zip(prompts, comps):
                n = len(c)
                sl = slice(at, at + n)
                rows.append(
                    (p, c, scores.topk_ids_NK[sl].cpu(), scores.topk_logprobs_NK[sl].cpu(),
                     scores.token_logprobs_N[sl].cpu())
                )  # fmt: skip
                at += n
            tokens += at
            while len(rows) >= shard_rows:
                shards.append(_write_shard(tmp, len(shards), rows[:shard_rows]))
                rows = rows[shard_rows:]
        if rows or not shards:
            shards.append(_write_shard(tmp, len(shards), rows))
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            **(meta or {}),
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "k": k,
            "temperature": temperature,
            "vocab_size": vocab_size,
            "max_new_tokens": max_new_tokens,
            "rows": len(examples),
            "tokens": tokens,
            "shards": shards,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write_shard(folder: Path, index: int, rows: list) -> dict:
    name = f"shard-{index:05d}.safetensors"
    tensors = _shard_tensors(rows) if rows else _empty_shard()
    part = folder / (name + ".part")
    save_file(tensors, str(part))
    os.replace(part, folder / name)
    n = int(tensors["token_offsets_R1"][-1])
    return {"file": name, "rows": len(rows), "tokens": n, "sha256": _sha256(folder / name)}


def _empty_shard() -> dict:
    z = torch.zeros(0, dtype=torch.long)
    one = torch.zeros(1, dtype=torch.long)
    return {
        "prompt_ids": z, "completion_ids": z, "prompt_offsets_R1": one,
        "completion_offsets_R1": one, "token_offsets_R1": one,
        "topk_ids_NK": torch.zeros((0, 1), dtype=torch.long),
        "topk_logprobs_NK": torch.zeros((0, 1)), "token_logprobs_N": torch.zeros(0),
    }  # fmt: skip


class CachedTeacher:
    """A teacher read from a cache folder: top-k (+ tail) and token log-probs of its rows.

    Args:
      folder: the cache (written by `write_cache` / `opd cache-teacher`).
      fallback: optional `Teacher` for batches with rows the cache does not hold.
    """

    provides = frozenset({"topk_logprobs", "token_logprobs"})

    def __init__(self, folder, fallback=None):
        self.folder = Path(folder)
        self.fallback = fallback
        self.manifest = _read_manifest(self.folder)
        m = self.manifest
        self.k, self.temperature = int(m["k"]), float(m["temperature"])
        self.vocab_size = int(m["vocab_size"])
        self.index: dict[bytes, tuple[int, int]] = {}
        self.shards = []
        for s, entry in enumerate(m["shards"]):
            shard = _read_shard(self.folder, entry)
            self.shards.append(shard)
            po, co = shard["prompt_offsets_R1"].tolist(), shard["completion_offsets_R1"].tolist()
            pids, cids = shard["prompt_ids"].tolist(), shard["completion_ids"].tolist()
            for r in range(len(po) - 1):
                key = row_key(pids[po[r] : po[r + 1]], cids[co[r] : co[r + 1]])
                self.index.setdefault(key, (s, r))

    def describe(self) -> str:
        return (
            f"teacher cache {self.folder} (top-{self.k}, temperature {self.temperature}, "
            f"{self.manifest['rows']} rows of {self.manifest.get('data', '?')})"
        )

    def check_tokenizer(self, tokenizer) -> None:
        """Refuse a tokenizer whose fingerprint is not the one the cache was written with."""
        mine = tokenizer_fingerprint(tokenizer)
        theirs = self.manifest["tokenizer_fingerprint"]
        if mine != theirs:
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ConfigError(
                f"teacher cache {self.folder}: written with tokenizer fingerprint {theirs[:16]}..."
                f" (teacher {self.manifest.get('teacher', '?')}), but the student's tokenizer "
                f"'{name}' has {mine[:16]}...; token ids would not mean the same tokens"
            )

    def check_k(self, k: int) -> None:
        if k > self.k:
            raise ConfigError(
                f"teacher cache {self.folder} holds top-{self.k} log-probs, the method asks for "
                f"k={k}: use k <= {self.k} or rebuild the cache with opd cache-teacher --k {k}"
            )

    def _check(self, k: int, temperature: float, vocab_size: int) -> None:
        self.check_k(k)
        if abs(temperature - self.temperature) > 1e-12:
            raise ConfigError(
                f"teacher cache {self.folder} was written at temperature {self.temperature}, the "
                f"method asks for {temperature}: match it or rebuild the cache with "
                f"opd cache-teacher --temperature {temperature}"
            )
        if vocab_size != self.vocab_size:
            raise ConfigError(
                f"teacher cache {self.folder} was written over a vocabulary of "
                f"{self.vocab_size} tokens, this run shares {vocab_size} with its student"
            )

    def logprobs(
        self, rollout: Rollout, k: int, temperature: float, vocab_size: int
    ) -> TeacherScores:
        self._check(k, temperature, vocab_size)
        P = rollout.prompt_len
        ids_BL, att_BL = rollout.input_ids_BL.cpu(), rollout.attention_mask_BL.cpu().bool()
        cmask_BT = rollout.completion_mask_BT.cpu().bool()
        found = []
        for b in range(ids_BL.shape[0]):
            prompt = ids_BL[b, :P][att_BL[b, :P]].tolist()
            comp = ids_BL[b, P:][cmask_BT[b]].tolist()
            hit = self.index.get(row_key(prompt, comp))
            if hit is None:
                if self.fallback is not None:
                    return self.fallback.logprobs(rollout, k, temperature, vocab_size)
                raise ConfigError(
                    f"teacher cache {self.folder}: row {b} of this batch (prompt of {len(prompt)} "
                    f"tokens, completion of {len(comp)}) is not in the cache; its prefixes must "
                    f"be the cached dataset's completions ({self.manifest.get('data', '?')}, "
                    "same data.* settings and sampling.max_new_tokens), not sampled ones"
                )
            found.append(hit)
        parts = [self._row(s, r) for s, r in found]
        token_N = torch.cat([p[2] for p in parts])
        if not k:
            return TeacherScores(token_logprobs_N=token_N)
        ids_NK = torch.cat([p[0] for p in parts])
        lps_NK = torch.cat([p[1] for p in parts])
        if k < self.k:  # the first k columns, with their own tail bucket
            ids_NK = torch.cat([ids_NK[:, :k], torch.full_like(ids_NK[:, :1], TAIL_ID)], dim=-1)
            lps_NK = with_tail(lps_NK[:, :k])
        return TeacherScores(topk_ids_NK=ids_NK, topk_logprobs_NK=lps_NK, token_logprobs_N=token_N)

    def _row(self, s: int, r: int):
        shard = self.shards[s]
        a, b = shard["token_offsets_R1"][r : r + 2].tolist()
        return (
            shard["topk_ids_NK"][a:b],
            shard["topk_logprobs_NK"][a:b],
            shard["token_logprobs_N"][a:b],
        )


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise ConfigError(
            f"teacher cache {folder}: no {MANIFEST} (write one with `opd cache-teacher`)"
        )
    try:
        m = json.loads(path.read_text())
        ok = m.get("format") == FORMAT and isinstance(m.get("shards"), list)
        keys = ("k", "temperature", "vocab_size", "tokenizer_fingerprint", "rows")
        ok = ok and all(key in m for key in keys)
    except (ValueError, UnicodeDecodeError, AttributeError):
        ok = False
    if not ok:
        raise ConfigError(
            f"teacher cache {path}: not a valid {FORMAT} manifest (corrupted or edited; "
            "rebuild it with `opd cache-teacher`)"
        )
    if m.get("version") != VERSION:
        raise ConfigError(f"teacher cache {path}: version {m.get('version')}, expected {VERSION}")
    return m


def _read_shard(folder: Path, entry: dict) -> dict:
    path = folder / str(entry.get("file", "?"))
    if not path.is_file():
        raise ConfigError(f"teacher cache {folder}: shard {path.name} is missing")
    if _sha256(path) != entry.get("sha256"):
        raise ConfigError(
            f"teacher cache shard {path}: sha256 differs from {MANIFEST} (corrupted or "
            "changed after writing); rebuild the cache with `opd cache-teacher`"
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"teacher cache shard {path}: unreadable ({err})") from None


NO_STUDENT = (
    "model.student: required with a teacher cache (model.teacher=cache:DIR): a student cannot "
    "be pruned from a cache; give a folder, .gguf file or Hub id"
)


def cached_models(cfg, student_and_tok):
    """`Models` for `model.teacher=cache:DIR`: the cache as teacher, the given student.

    Held-out evaluation scores the student's own greedy completions, which no cache holds, so
    `data.eval_count` must be 0; the tokenizer must be the one the cache was written with.
    """
    from opd.build import finish_models

    student, tok = student_and_tok
    folder = cfg.model.teacher.strip()[len(PREFIX) :]
    if cfg.data.eval_count:
        raise ConfigError(
            f"model.teacher=cache:{folder}: set data.eval_count=0 (held-out evaluation scores "
            "the student's own completions, which a teacher cache does not hold)"
        )
    teacher = CachedTeacher(folder)
    teacher.check_tokenizer(tok)
    return finish_models(teacher, student, tok)
