"""Errors a user can cause. The CLI prints their message as one line and exits 1."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user asked for (not a bug): one line, naming the thing."""


def user_errors() -> tuple[type[BaseException], ...]:
    from data_loaders.errors import DataError
    from jobs.config import ConfigError
    from models.registry import ModelError

    return (UserError, ConfigError, DataError, ModelError, ConnectionError, FileNotFoundError)
