"""Name -> flavour -> builder. Importing a model module registers its flavours (timm style)."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

_BUILDERS: dict[str, dict[str, Callable[..., nn.Module]]] = {}


class ModelError(ValueError):
    """A model request a user can get wrong (unknown name or flavour, missing weights file)."""


def register(name: str, flavour: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _BUILDERS.setdefault(name, {})[flavour] = fn
        return fn

    return wrap


def names() -> list[str]:
    return sorted(_BUILDERS)


def flavours(name: str) -> list[str]:
    if name not in _BUILDERS:
        raise ModelError(f"unknown model '{name}' (valid: {', '.join(names())})")
    return sorted(_BUILDERS[name])


def build(name: str, flavour: str = "tiny", **overrides) -> nn.Module:
    """Build model `name` in `flavour`; keyword overrides replace the flavour's defaults."""
    if flavour not in flavours(name):
        raise ModelError(f"model '{name}' has no flavour '{flavour}' (valid: {', '.join(flavours(name))})")
    return _BUILDERS[name][flavour](**overrides)
