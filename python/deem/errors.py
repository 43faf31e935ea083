"""Errors the user causes and can fix: a missing or unreadable file, an unknown key, a bad value, data or a
checkpoint that is not what a command expects.

Every layer raises a subclass of `UserError` for these (the data layer's `DataError`, the loaders'
`CheckpointError`, the eval engine's `EvalError`, `ConfigError` here), with a message that names the file, key
or value and what was expected. The `deem` command (python/deem/cli.py) prints such an error as one line,
`deem VERB: error: MESSAGE`, and exits with status 2; any other exception is a bug and keeps its traceback.
This module imports nothing, so every layer, the lowest included, can use it.
"""

from __future__ import annotations


class UserError(Exception):
    """An error in the user's input (config, command line, files, data, checkpoint), not in deem."""


class ConfigError(UserError, ValueError):
    """A config (file, key or value) that cannot work: names the key and the problem."""


class UsageError(UserError):
    """A command line whose options do not fit together (a required option missing, two that exclude each
    other), beyond what argparse itself checks."""
