"""opd: on-policy distillation for language models.

`opd.Distiller(method, teacher=..., student=..., tokenizer=..., train=[...]).train()` is the
library's entry point (docs/python-api.md); `opd.distill(cfg, ...)` runs a `RunConfig`.
Both are imported on first use, so `import opd` stays light.
"""

__version__ = "0.1.0"

__all__ = ["Distiller", "Method", "distill"]


def __getattr__(name: str):
    if name == "Distiller":
        from opd.api import Distiller

        return Distiller
    if name == "distill":
        from opd.train import distill

        return distill
    if name == "Method":
        from opd.method import Method

        return Method
    raise AttributeError(f"module 'opd' has no attribute {name!r}")
