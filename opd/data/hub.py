"""Prompt rows from Hugging Face `datasets`: a folder saved with `save_to_disk`, or a Hub name.

  data.train=DIR            a folder written by `Dataset.save_to_disk`, or by
                            `DatasetDict.save_to_disk` when it holds one split
  data.train=DIR:SPLIT      one split of a saved `DatasetDict`
  data.train=hf:ORG/NAME:SPLIT
                            a dataset on the Hugging Face Hub, loaded with `datasets.load_dataset`
                            (the split is required); only with `data.allow_download=true` (or
                            `model.allow_download=true`): opd never reaches the network unasked.

Rows go through the same checks as file rows (`opd.data.rows`), named "DIR:row 7" or
"hf:org/name:train:row 7". `datasets` is imported only here, only when such a source is used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from opd.errors import DataError

HUB_PREFIX = "hf:"
_INSTALL = "pip install datasets (or pip install 'opd[datasets]')"


def _datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{what}: reading a Hugging Face dataset needs {_INSTALL}") from None
    datasets.disable_progress_bars()
    return datasets


@contextlib.contextmanager
def _online(datasets):
    """Lift the Hub offline mode (`HF_HUB_OFFLINE`, which the CLI sets by default) for one
    call that the user allowed; both libraries read it once, at import."""
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _records(dataset: Any, label: str) -> Iterator[tuple[str, Any]]:
    for i, record in enumerate(dataset, start=1):
        yield f"{label}:row {i}", record


def read_saved_dataset(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    """(source, record) pairs of a `save_to_disk` folder (one split of a `DatasetDict`)."""
    datasets = _datasets(str(path))
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises several types for a damaged folder
        raise DataError(f"{path}: unreadable saved dataset ({type(e).__name__}: {e})") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in loaded:
            valid = ", ".join(f"{path}:{s}" for s in splits)
            got = "no split given" if split is None else f"no split {split!r}"
            raise DataError(f"{path}: saved DatasetDict has {got} (valid: {valid})")
        return _records(loaded[split], f"{path.name}:{split}")
    if split is not None:
        raise DataError(f"{path}: a saved Dataset has no splits; drop ':{split}'")
    return _records(loaded, path.name)


def read_hub_dataset(spec: str, allow_download: bool, key: str) -> Iterator[tuple[str, Any]]:
    """(source, record) pairs of `hf:ORG/NAME:SPLIT`, downloaded only when allowed.

    Args:
      spec: the config value, `hf:` prefix included.
      allow_download: the user's permission to reach the Hugging Face Hub.
      key: the config key being read (`data.train` or `data.eval`), for the error messages.
    """
    body = spec[len(HUB_PREFIX) :]
    name, _, split = body.rpartition(":")
    if not name.strip() or not split.strip():
        raise DataError(
            f"{key}={spec!r}: a Hub dataset needs a name and a split "
            "(valid: hf:ORG/NAME:SPLIT, e.g. hf:trl-lib/tldr:train)"
        )
    if not allow_download:
        raise DataError(
            f"{key}={spec!r} is a Hugging Face Hub dataset and downloads are off "
            "(valid: set data.allow_download=true to fetch it, or save it with "
            "datasets' save_to_disk and give that folder)"
        )
    datasets = _datasets(f"{key}={spec!r}")
    try:
        with _online(datasets):
            loaded = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, missing dataset, unknown split, offline mode
        raise DataError(
            f"{key}={spec!r}: could not load the Hub dataset ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}) (valid: an existing ORG/NAME and "
            "split, and network access)"
        ) from None
    return _records(loaded, f"{spec}")
