"""Deterministic, resumable batching of encoded examples, and held-out splits.

`PromptStream` yields batches forever; epoch e is ordered by
`numpy.random.default_rng([seed, e]).permutation(n)`, and `state_dict()` (epoch, index) lets
a resumed run continue with exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from opd.errors import ConfigError, DataError

if TYPE_CHECKING:
    from opd.data import Example

T = TypeVar("T")


class PromptStream:
    """An endless, deterministic, resumable stream of prompt batches.

    Epoch `e` visits the examples in the order `numpy.random.default_rng([seed, e])
    .permutation(n)` (file order when `shuffle=False`). Batches are consecutive slices of
    that sequence of epochs, so a batch may straddle an epoch boundary. The position is
    (epoch, index into that epoch's order); `state_dict` / `load_state_dict` resume exactly.

    Args:
      examples: the encoded prompts (at least one).
      batch_size: examples per batch, >= 1.
      seed: a non-negative integer seeding the per-epoch shuffles.
      shuffle: False visits the examples in order every epoch.
    """

    def __init__(
        self, examples: Sequence[Example], batch_size: int, seed: int, shuffle: bool = True
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
        if len(examples) == 0:
            raise DataError("PromptStream got no examples (valid: a non-empty prompt set)")
        self.examples, self.batch_size = list(examples), batch_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = -1, np.arange(0)

    def _epoch_order(self) -> np.ndarray:
        """The visiting order of the current epoch, computed once per epoch."""
        if self._order_epoch != self.epoch:
            n = len(self.examples)
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order = rng.permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self) -> PromptStream:
        return self

    def __next__(self) -> list[Example]:
        n = len(self.examples)
        batch: list[Example] = []
        while len(batch) < self.batch_size:
            take = min(self.batch_size - len(batch), n - self.index)
            batch += [self.examples[i] for i in self._epoch_order()[self.index : self.index + take]]
            self.index += take
            if self.index == n:  # roll over now so that a saved index is always < n
                self.epoch, self.index = self.epoch + 1, 0
        return batch

    def fingerprint(self) -> str:
        """A short hash of the training prompts (token ids, in order), stored in checkpoints."""
        h = hashlib.sha256()
        for ex in self.examples:
            h.update(np.asarray(getattr(ex, "prompt_ids", ()), dtype=np.int64).tobytes() + b"|")
        return h.hexdigest()[:16]

    def state_dict(self) -> dict:
        """The position of the next example, and what it is a position in:
        {"epoch": int, "index": int, "examples": int, "fingerprint": str}."""
        return {
            "epoch": self.epoch,
            "index": self.index,
            "examples": len(self.examples),
            "fingerprint": self.fingerprint(),
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from a position saved by `state_dict` (same examples and seed)."""
        epoch, index = state.get("epoch"), state.get("index")
        if not isinstance(epoch, int) or not isinstance(index, int) or epoch < 0:
            raise ConfigError(
                f"PromptStream state must be {{'epoch': int, 'index': int}}, got {state}"
            )
        saved_n, saved_fp = state.get("examples"), state.get("fingerprint")
        if saved_n is not None and (saved_n, saved_fp) != (len(self.examples), self.fingerprint()):
            raise ConfigError(
                f"data.train: the training prompts changed since the checkpoint was written "
                f"(it holds a position in {saved_n} prompts, fingerprint {saved_fp}; data.train "
                f"now gives {len(self.examples)}, fingerprint {self.fingerprint()}); resume with "
                "the same data.train file and settings, or start a new run"
            )
        if not 0 <= index < len(self.examples):
            raise ConfigError(
                f"data.train: the checkpoint's position {index} does not fit the "
                f"{len(self.examples)} training prompts data.train gives now; resume with the "
                "same data.train file and settings, or start a new run"
            )
        self.epoch, self.index = epoch, index


# ---------------------------------------------------------------------------- splitting


def split_rows(
    rows: Sequence[T],
    *,
    eval_fraction: float | None = None,
    eval_count: int | None = None,
    seed: int = 0,
) -> tuple[list[T], list[T]]:
    """Split rows (or examples) into train and held-out eval sets, deterministically.

    Args:
      rows: the items to split.
      eval_fraction: the share held out, in (0, 1); rounded, at least one item.
      eval_count: the number held out. Give exactly one of the two.
      seed: a non-negative integer choosing which items are held out.

    Returns:
      (train, eval), each in the original order.
    """
    if (eval_fraction is None) == (eval_count is None):
        raise ConfigError("give exactly one of eval_fraction and eval_count")
    n = len(rows)
    if eval_fraction is not None and not 0.0 < eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
    if eval_count is not None and (not isinstance(eval_count, int) or eval_count < 1):
        raise ConfigError(f"eval_count must be an integer >= 1, got {eval_count!r}")
    k = eval_count if eval_fraction is None else max(1, round(n * eval_fraction))
    if k >= n:
        raise ConfigError(
            f"holding out {k} of {n} rows leaves none to train on "
            "(valid: a smaller eval_fraction or eval_count)"
        )
    held = set(np.random.default_rng(seed).permutation(n)[:k].tolist())
    train = [r for i, r in enumerate(rows) if i not in held]
    return train, [r for i, r in enumerate(rows) if i in held]
