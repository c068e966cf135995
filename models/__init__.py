"""Architectures only: no ray, no deepspeed. `build(name, flavour, **overrides)` makes one."""

from models import autonomous, recsys, retinopathy  # noqa: F401  (importing registers the flavours)
from models.registry import ModelError, build, flavours, names, register

__all__ = ["ModelError", "build", "flavours", "names", "register"]
