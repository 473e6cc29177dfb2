"""Models named by Hugging Face Hub id (``org/name``, optionally ``org/name@revision``).

The id is resolved through the local Hugging Face cache first, with the layout
``huggingface_hub`` writes::

    <cache>/models--<org>--<name>/refs/<revision>          (a commit hash, one line)
    <cache>/models--<org>--<name>/snapshots/<commit>/...   (config.json, weights, tokenizer)

``<cache>`` is ``$HF_HUB_CACHE``, else ``$HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``, else
``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub`` (``huggingface_hub``'s
own order), read when the model is loaded, not when opd is imported. A revision that is a
40-character commit hash names its snapshot directly.

Nothing is downloaded unless the caller allows it (``model.allow_download=true``). Then
``huggingface_hub.snapshot_download`` fetches only safetensors weights, JSON files and
tokenizer files into the same cache; pickle checkpoints (``*.bin``, ``*.pt``) are never fetched,
and a repository without safetensors weights is refused. The opd CLI sets ``HF_HUB_OFFLINE=1``
to keep libraries off the network; an allowed download lifts that for its own call only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from opd.errors import ModelError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
DOWNLOAD_PATTERNS = (
    "*.json",
    "*.safetensors",
    "*.model",  # sentencepiece tokenizers
    "*.txt",  # merges.txt, vocab.txt
    "*.tiktoken",
    "*.jinja",  # chat templates saved beside the tokenizer
)


def looks_like_hub_id(spec: str) -> bool:
    """``org/name`` or ``org/name@revision``: one slash, no path prefix, not a file name."""
    text = str(spec)
    return bool(_HUB_ID.match(text)) and not text.startswith(".") and not text.endswith(".gguf")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, from the environment as it is now."""
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base.expanduser() / "huggingface" / "hub"


def split_hub_id(spec: str) -> tuple[str, str]:
    repo_id, _, revision = str(spec).partition("@")
    return repo_id, revision or "main"


def repo_cache_dir(repo_id: str, cache: Path | None = None) -> Path:
    """``<cache>/models--org--name``."""
    return (cache or hub_cache_dir()) / ("models--" + repo_id.replace("/", "--"))


def cached_snapshot(repo_id: str, revision: str = "main", cache: Path | None = None):
    """The cached snapshot folder of ``repo_id`` at ``revision``, or None (complete or not)."""
    storage = repo_cache_dir(repo_id, cache)
    commit = revision
    if not _COMMIT.match(revision):
        ref = storage / "refs" / revision
        try:
            commit = ref.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ModelError(
                f"cannot read '{ref}' in the Hugging Face cache: {e.strerror or e}"
            ) from None
    snapshot = storage / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def resolve_hub_model(spec: str, allow_download: bool = False) -> Path:
    """The local folder holding hub model ``spec``: the cached snapshot, or a fresh download.

    Raises:
      ModelError: not cached and downloads are not allowed; or the download failed; or the
        repository holds no safetensors weights.
    """
    repo_id, revision = split_hub_id(spec)
    cache = hub_cache_dir()
    snapshot = cached_snapshot(repo_id, revision, cache)
    if snapshot is not None and (snapshot / "config.json").exists():
        return snapshot
    if snapshot is not None and not allow_download:
        raise ModelError(
            f"Hub model {repo_id} is only partly in the Hugging Face cache: '{snapshot}' has no "
            f"config.json (an interrupted download?); set model.allow_download=true to complete it"
        )
    if not allow_download:
        at = "" if revision == "main" else f" at revision {revision}"
        raise ModelError(
            f"model '{spec}' is not a local path and Hub model {repo_id}{at} is not in the "
            f"Hugging Face cache at '{repo_cache_dir(repo_id, cache)}'; set "
            f"model.allow_download=true to download it (HF_HUB_CACHE or HF_HOME choose the "
            f"cache), or pass a local model folder"
        )
    folder = _download(repo_id, revision, cache)
    if not any(folder.glob("*.safetensors")):
        raise ModelError(
            f"Hub model {repo_id} has no safetensors weights; opd does not download pickle "
            f"checkpoints (*.bin), which can run code when loaded"
        )
    return folder


def _download(repo_id: str, revision: str, cache: Path) -> Path:
    import huggingface_hub
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False  # the user allowed this download explicitly
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=str(cache),
            allow_patterns=list(DOWNLOAD_PATTERNS),
        )
    except Exception as e:  # noqa: BLE001 - network, auth and hub errors come in many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"cannot download Hub model {repo_id} (revision {revision}) into '{cache}': {first}"
        ) from e
    finally:
        constants.HF_HUB_OFFLINE = offline
    return Path(folder)
