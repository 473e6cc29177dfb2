"""User-facing errors.

`OpdError` is raised for anything the user can fix: a bad config value, a bad data row, a
missing model path. Its message is one line that names the file, row, field or option and
what would be valid. The CLI prints it to stderr and exits with code 2, without a traceback
(unless `--debug`). Anything else is a bug and keeps its traceback.
"""


class OpdError(Exception):
    """An error the user can fix; the message is one self-contained line."""


class ConfigError(OpdError):
    """A configuration value is missing, malformed or out of range."""


class DataError(OpdError):
    """A prompt file or one of its rows is unreadable or malformed."""


class ModelError(OpdError):
    """A model path is missing or a model/tokenizer pair is unusable."""


class TeacherUnreachable(OpdError):
    """A served teacher did not answer within its retry budget (the message names the URL and
    the last failure). The training loop writes a checkpoint first; `--resume` continues."""
