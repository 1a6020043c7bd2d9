"""Exceptions with messages that name the problem."""

from __future__ import annotations

import gymnasium

from plugins.cli import CommandWarning


class VocabMismatchError(ValueError):
    """A tokenizer produces ids that a model has no embedding (or logit) for."""


class EpisodeEndedError(gymnasium.error.ResetNeeded):
    """``step`` was called after the episode terminated or was truncated."""


class InvalidActionError(ValueError):
    """A token outside the vocabulary, a bad log-prob, or a missing log-prob when β > 0."""


class RewardError(ValueError):
    """A reward function returned the wrong number of scores or a non-finite score."""


class DataFileError(ValueError):
    """A prompt or preference data file is unsupported, unparsable, or has a missing or bad field."""


class UnsupportedModelError(ValueError):
    """A model whose attention the env's KV cache cannot reproduce exactly (named in the message)."""


class ModelLoadError(ValueError):
    """A model folder that cannot be loaded: no causal LM, remote code needed, a tokenizer that does not fit,
    pickle-only weights, a damaged or incomplete weights file."""


class DeviceError(ValueError):
    """A device name torch does not know, or a device this machine does not have."""


class RunWarning(CommandWarning):
    """Something in a run folder was repaired: a torn metrics line dropped, an interrupted checkpoint restored."""


class DataWarning(CommandWarning):
    """Rows of a user's data file were left out (a preference pair whose chosen equals its rejected)."""
