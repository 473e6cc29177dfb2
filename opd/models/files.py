"""Checking model files before a library parses them: readable, whole, and of the right kind.

``safetensors`` and ``gguf`` fail on a truncated or corrupt file with messages that do not name
the file ("invalid header length", "cannot reshape array of size 7660 into shape (64,128)"),
and a permission problem surfaces as "no config.json" or "does not exist". The checks here read
only headers (a few kilobytes, plus the GGUF metadata) and raise one-line `ModelError`s that
name the file and what is wrong.

Layouts checked:

- safetensors: ``u64 N`` (little endian), N bytes of JSON ``{name: {dtype, shape,
  data_offsets: [begin, end]}, "__metadata__": {...}}``, then the tensor data; the file must
  be exactly ``8 + N + max(end)`` bytes (the ``safetensors`` library refuses anything else).
- GGUF (versions 2 and 3): magic ``GGUF``, ``u32`` version, ``u64`` tensor count, ``u64``
  metadata count, the metadata key/value pairs, the tensor infos (name, dims, ggml type,
  offset), padding to ``general.alignment`` (default 32), then the tensor data; every tensor
  must end inside the file.

Corruption inside tensor data (flipped bits) cannot be seen without a checksum; such a file
loads, and a model with non-finite weights is the training loop's finite check to catch.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

from opd.errors import ModelError

_SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit
_REDOWNLOAD = "re-save, re-download or re-convert it"
_access = os.access  # one name for the permission check (tests emulate a non-root user)


def readable(path: Path) -> bool:
    """Whether this process may read ``path`` (and list it, for a folder)."""
    mode = os.R_OK | (os.X_OK if path.is_dir() else 0)
    return _access(path, mode)


def unreadable_error(path: Path, what: str) -> ModelError:
    kind = "folder" if path.is_dir() else "file"
    return ModelError(
        f"{what} {kind} '{path}' exists but is not readable (permission denied); "
        f"give this user read access (chmod u+r{'x' if kind == 'folder' else ''})"
    )


def require_readable(path: Path, what: str = "model") -> None:
    if not readable(path):
        raise unreadable_error(path, what)


def check_safetensors(path: Path) -> None:
    """Raise ModelError if ``path`` is not a whole, readable safetensors file."""
    require_readable(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ModelError(
                    f"safetensors file '{path}' is empty or truncated ({size} bytes; it must "
                    f"start with an 8-byte header length); {_REDOWNLOAD}"
                )
            n = int.from_bytes(head, "little")
            if n > _SAFETENSORS_MAX_HEADER or 8 + n > size:
                raise ModelError(
                    f"safetensors file '{path}' is truncated or not a safetensors file: its "
                    f"header length says {n} bytes but the file holds {size} bytes; {_REDOWNLOAD}"
                )
            raw = fh.read(n)
    except PermissionError:
        raise unreadable_error(path, "model") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelError(
            f"safetensors file '{path}' is corrupt: its header is not valid JSON; {_REDOWNLOAD}"
        ) from None
    if not isinstance(header, dict):
        raise ModelError(f"safetensors file '{path}' is corrupt: its header is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
        ):
            raise ModelError(
                f"safetensors file '{path}' is corrupt: tensor {name!r} has no valid "
                f"data_offsets; {_REDOWNLOAD}"
            )
        end = max(end, offsets[1])
    need = 8 + n + end
    if need > size:
        raise ModelError(
            f"safetensors file '{path}' is truncated: its tensors need {need} bytes but the file "
            f"holds {size}; {_REDOWNLOAD}"
        )
    if need < size:
        raise ModelError(
            f"safetensors file '{path}' is corrupt: {size - need} unexpected bytes after its "
            f"tensor data ({need} expected); {_REDOWNLOAD}"
        )


def check_weight_files(folder: Path) -> None:
    """Every ``*.safetensors`` file in a model folder, and the shards its index names."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        require_readable(index)
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelError(
                f"model index '{index}' is corrupt: expected JSON with a 'weight_map' "
                f"object; {_REDOWNLOAD}"
            ) from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ModelError(
                f"model index '{index}' names {len(missing)} missing weight file(s), e.g. "
                f"'{folder / missing[0]}'; {_REDOWNLOAD}"
            )
    for path in sorted(folder.glob("*.safetensors")):
        check_safetensors(path)


# --- GGUF ---------------------------------------------------------------------------------

_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _Truncated(Exception):
    pass


class _Reader:
    """Little-endian reads from a buffer; running past its end raises `_Truncated(what)`."""

    def __init__(self, buf) -> None:
        self.buf, self.pos = buf, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise _Truncated(what)
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.take(8, what))[0]

    def string(self, what: str) -> bytes:
        return self.take(self.u64(what), what)

    def skip_value(self, vtype: int, what: str) -> object:
        """Read one metadata value; return it for scalars and strings, None for arrays."""
        if vtype == _GGUF_STRING:
            return self.string(what)
        if vtype == _GGUF_ARRAY:
            item_type, count = self.u32(what), self.u64(what)
            if item_type in _GGUF_SCALAR_SIZES:
                self.take(count * _GGUF_SCALAR_SIZES[item_type], what)
            else:
                for _ in range(count):
                    self.skip_value(item_type, what)
            return None
        if vtype not in _GGUF_SCALAR_SIZES:
            raise ValueError(f"{what} has unknown value type {vtype}")
        raw = self.take(_GGUF_SCALAR_SIZES[vtype], what)
        return int.from_bytes(raw, "little") if vtype in (4, 10) else None


def check_gguf(path: Path) -> None:
    """Raise ModelError if ``path`` is not a whole, readable GGUF file."""
    require_readable(path)
    size = path.stat().st_size
    if size < 4:
        raise ModelError(f"GGUF file '{path}' is empty or truncated ({size} bytes); {_REDOWNLOAD}")
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            _check_gguf_layout(path, buf, size)
    except PermissionError:
        raise unreadable_error(path, "model") from None


def _check_gguf_layout(path: Path, buf, size: int) -> None:
    from gguf import GGML_QUANT_SIZES

    r = _Reader(buf)
    if bytes(r.take(4, "magic")) != b"GGUF":
        raise ModelError(f"'{path}' is not a GGUF file: it does not start with the bytes 'GGUF'")
    try:
        version = r.u32("the header")
        if version not in (2, 3):
            raise ModelError(
                f"GGUF file '{path}' has version {version}; versions 2 and 3 are supported"
            )
        n_tensors, n_kv = r.u64("the header"), r.u64("the header")
        alignment = 32
        for i in range(n_kv):
            what = f"metadata entry {i + 1} of {n_kv}"
            key = r.string(what)
            value = r.skip_value(r.u32(what), what)
            if key == b"general.alignment" and isinstance(value, int) and value > 0:
                alignment = value
        tensors = []
        for i in range(n_tensors):
            what = f"tensor info {i + 1} of {n_tensors}"
            name = r.string(what).decode("utf-8", "replace")
            n_dims = r.u32(what)
            if n_dims > 8:  # ggml has at most 4
                raise ValueError(f"tensor {name!r} claims {n_dims} dimensions")
            dims = [r.u64(what) for _ in range(n_dims)]
            ggml_type, offset = r.u32(what), r.u64(what)
            if ggml_type not in GGML_QUANT_SIZES:
                raise ValueError(f"tensor {name!r} has unknown ggml type {ggml_type}")
            block, type_size = GGML_QUANT_SIZES[ggml_type]
            count = 1
            for d in dims:
                count *= d
            tensors.append((name, offset + count // block * type_size))
    except _Truncated as t:
        raise ModelError(
            f"GGUF file '{path}' is truncated: {t} runs past the end of the file ({size} bytes); "
            f"{_REDOWNLOAD}"
        ) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"GGUF file '{path}' is corrupt: {e}; {_REDOWNLOAD}") from None
    data_start = -(-r.pos // alignment) * alignment
    for name, end in tensors:
        if data_start + end > size:
            raise ModelError(
                f"GGUF file '{path}' is truncated: tensor {name!r} ends at byte "
                f"{data_start + end} but the file holds {size} bytes; {_REDOWNLOAD}"
            )
