"""Reading and writing config files safely.

Reading (`read_yaml_file`, `yaml_value`) uses a restricted YAML loader:
  - YAML tags beyond the safe ones are refused (PyYAML's SafeLoader);
  - anchors and aliases (`&a`, `*a`) are refused: a few lines of nested aliases expand to
    gigabytes (an "alias bomb"), and config files never need them;
  - duplicate keys in one mapping are refused instead of silently keeping the last;
  - scientific notation without a dot (`1e-3`, `1E-5`, `5e+2`) is a float. PyYAML follows
    YAML 1.1, where such a plain scalar is a string; YAML 1.2 and every TRL/HF config read it
    as a number, and so does opd;
  - files over `MAX_CONFIG_BYTES`, non-UTF-8 bytes, unreadable paths and too deeply nested
    documents are `ConfigError`s naming the file, in one line.

`parse_override` splits one `key=value` override and reads its value with the same loader.
`unique_run_dir` claims a new, timestamped run folder.

Writing (`atomic_write_text`) goes through a temporary file in the same folder, fsync and
`os.replace`, so a crash leaves either the old file or the new one, never a truncated one.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from pathlib import Path

import yaml

from opd.errors import ConfigError

MAX_CONFIG_BYTES = 1 << 20  # 1 MiB; a real run config is about 2 KB


class YamlRefused(ValueError):
    """A YAML construct opd refuses (alias, anchor, duplicate key); `str` is one line."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader without anchors/aliases or duplicate keys, with YAML 1.2 exponent floats."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise YamlRefused(
                f"line {event.start_mark.line + 1}: YAML aliases and anchors are not allowed "
                f"in config files (*{event.anchor}); write the value out"
            )
        if getattr(event, "anchor", None) is not None:
            raise YamlRefused(
                f"line {event.start_mark.line + 1}: YAML aliases and anchors are not allowed "
                f"in config files (&{event.anchor}); write the value out"
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key; the base class reports it
                continue
            if duplicate:
                raise YamlRefused(
                    f"line {key_node.start_mark.line + 1}: duplicate key {key!r} "
                    "(each key may appear once per mapping)"
                )
        return super().construct_mapping(node, deep=deep)


_EXP_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789."))


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _yaml_problem(err: yaml.YAMLError) -> str:
    """`line N: problem` from a PyYAML error, on one line."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    if problem is None:  # e.g. ReaderError (control characters)
        return _one_line(err)
    where = f"line {mark.line + 1}: " if mark is not None else ""
    hint = " (indent with spaces, not tabs)" if "\\t" in problem or "\t" in problem else ""
    return f"{where}{_one_line(problem)}{hint}"


def parse_yaml(text: str, origin: str):
    """Parse YAML text with the strict loader; errors are ConfigErrors starting with `origin`."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except YamlRefused as err:
        raise ConfigError(f"{origin}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{origin}: not valid YAML ({_yaml_problem(err)})") from None
    except RecursionError:
        raise ConfigError(f"{origin}: YAML nested too deeply") from None


def yaml_value(text: str, origin: str):
    """The value of one `key=value` override: YAML if it parses, else the raw text.

    Aliases and anchors are refused here as in files (a ConfigError naming `origin`).
    """
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except YamlRefused as err:
        raise ConfigError(f"{origin}: {err}") from None
    except (yaml.YAMLError, RecursionError):
        return text


def read_yaml_file(path: Path, what: str = "config file"):
    """The parsed YAML document in `path` (None when the file holds no document).

    Every way reading can fail (missing, a folder, no permission, too large, not UTF-8, not
    YAML, refused construct) is a one-line ConfigError naming the file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if path.is_dir():
            raise ConfigError(f"{what} '{path}' is a folder, not a YAML file")
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"{what} '{path}' is {size} bytes; config files are limited to "
                f"{MAX_CONFIG_BYTES} bytes"
            )
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} '{path}' does not exist") from None
    except PermissionError:
        raise ConfigError(f"{what} '{path}' is not readable (permission denied)") from None
    except OSError as err:
        raise ConfigError(
            f"{what} '{path}' cannot be read ({_one_line(err.strerror or err)})"
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{what} '{path}' is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset "
            f"{err.start}); save it as UTF-8"
        ) from None
    return parse_yaml(text.removeprefix("\ufeff"), str(path))


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically: temp file in the same folder, fsync, os.replace."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable where the OS allows it
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def parse_override(text: str) -> tuple[str, object]:
    """Split `key=value`; the value is parsed as YAML (numbers, booleans, lists, strings)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must have the form key=value (e.g. train.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    value = yaml_value(raw, f"override {text!r}") if raw.strip() else ""
    # A string that Python reads as a float ('1e-4', '1_000.5') is one.
    if isinstance(value, str):
        try:
            value = (
                float(value)
                if any(c in value for c in ".eE") and value[0] in "+-.0123456789"
                else value
            )
        except ValueError:
            pass
    return key, value


def unique_run_dir(name: str, root: str | Path = "runs") -> Path:
    """Claim `root/name-YYYYmmdd-HHMMSS` (or `...-2`, `-3`, ... when taken) by creating it.

    `os.mkdir` is atomic, so two runs started in the same second, even in two processes,
    never share a folder.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    base = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    for i in range(1, 10_000):
        candidate = root / (base if i == 1 else f"{base}-{i}")
        try:
            os.mkdir(candidate)
        except FileExistsError:
            continue
        return candidate
    raise ConfigError(f"no free run folder name '{root / base}-N'; set output_dir")
