"""Exceptions with messages that name the problem."""

from __future__ import annotations

import gymnasium

from rlhf_env.plugins.cli import CommandWarning, UserError

__all__ = ["UserError"]  # the base of every error below; re-exported for the layers above


class VocabMismatchError(UserError, ValueError):
    """A tokenizer produces ids that a model has no embedding (or logit) for."""


class EpisodeEndedError(UserError, gymnasium.error.ResetNeeded):
    """``step`` was called after the episode terminated or was truncated."""


class InvalidActionError(UserError, ValueError):
    """A token outside the vocabulary, a bad log-prob, or a missing log-prob when β > 0."""


class RewardError(UserError, ValueError):
    """A reward function returned the wrong number of scores or a non-finite score."""


class DataFileError(UserError, ValueError):
    """A prompt or preference data file is unsupported, unparsable, or has a missing or bad field."""


class UnsupportedModelError(UserError, ValueError):
    """A model whose attention the env's KV cache cannot reproduce exactly (named in the message)."""


class ModelLoadError(UserError, ValueError):
    """A model folder that cannot be loaded: no causal LM, remote code needed, a tokenizer that does not fit,
    pickle-only weights, a damaged or incomplete weights file."""


class DeviceError(UserError, ValueError):
    """A device name torch does not know, or a device this machine does not have."""


class SettingError(UserError, ValueError):
    """An argument, option, task knob or hyperparameter outside what it accepts; the message names it."""


class EnvStateError(UserError, RuntimeError):
    """``step`` or ``step_chunk`` on an env before ``reset()`` or after ``close()``."""


class MissingFileError(UserError, FileNotFoundError):
    """A path the user gave (a model folder, a data file) that is not there."""


class MissingExtraError(UserError, ImportError):
    """A feature needs an optional dependency that is not installed; the message says which extra."""


class TrainingStoppedError(UserError, RuntimeError):
    """A run, a bench stage or a step could not go on (a failed write, a reward that raised); the message says why."""


class RunWarning(CommandWarning):
    """Something in a run folder was repaired: a torn metrics line dropped, an interrupted checkpoint restored."""


class DataWarning(CommandWarning):
    """Rows of a user's data file were left out (a preference pair whose chosen equals its rejected)."""
