"""What ``TextGenEnv`` and ``VectorTextGenEnv`` share around their ``EpisodeBatch`` (``rlhf_env.episodes``):
the loading step of their factories and their public attributes."""

from __future__ import annotations

import os

import torch
from transformers import PreTrainedModel

from rlhf_env.errors import EnvStateError, SettingError
from rlhf_env.models import default_device, load_causal_lm, load_tokenizer
from rlhf_env.rewards import RewardModel


def load_parts(
    tokenizer, ref_model, reward, *, reward_tokenizer=None, device=None, dtype=None, trust_remote_code: bool = False
):
    """The env factories' loading step: paths become objects, models move to ``device``/``dtype``.

    Returns ``(tokenizer, ref_model or None, reward callable, torch.device)``, what
    ``EpisodeBatch`` takes. A ``PreTrainedModel`` or a path as ``reward`` becomes a
    ``RewardModel`` scored with ``reward_tokenizer`` (default the policy's tokenizer).
    """
    device = torch.device(device) if device is not None else default_device()
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer, trust_remote_code)
    if ref_model is not None:
        ref_model = load_causal_lm(ref_model, device, dtype, trust_remote_code)
    if isinstance(reward, PreTrainedModel) or (reward is not None and isinstance(reward, (str, os.PathLike))):
        reward = RewardModel(reward, reward_tokenizer or tokenizer, device, dtype, trust_remote_code)
    return tokenizer, ref_model, reward, device


class EnvProperties:
    """The envs' public attributes (both envs; ``core`` is private).

    Through Gymnasium wrappers read them with ``rlhf_env.rollout.env_attr(env, name)``
    (``get_wrapper_attr`` where the wrapper has it) and set ``beta`` with ``set_env_attr``.
    """

    core: object  # the env's rlhf_env.episodes.EpisodeBatch
    _closed = False

    def close(self, **kwargs) -> None:
        """Close the env: a later ``reset``, ``step`` or ``step_chunk`` raises ``EnvStateError``."""
        self._closed = True
        super().close(**kwargs)

    def _check_open(self, call: str) -> None:
        # A closed env would go on silently, so a use-after-close bug would look like training.
        if self._closed:
            raise EnvStateError(f"{call}() called after close(); make a new env")

    def _reset_options(self, options: dict | None, known: tuple[str, ...]) -> dict:
        """``options``, refusing keys this env does not read (a typo would otherwise be ignored)."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise SettingError(f"reset() got unknown option(s) {unknown}; this env knows {list(known)}")
        return options

    @property
    def tokenizer(self):
        """The policy's tokenizer."""
        return self.core.tokenizer

    @property
    def ref_model(self):
        """The reference model π_ref (None without one)."""
        return self.core.ref_model

    @property
    def max_new_tokens(self) -> int:
        """Completion length limit (``truncated`` when reached)."""
        return self.core.max_new_tokens

    @property
    def max_prompt_tokens(self) -> int:
        return self.core.max_prompt_tokens

    @property
    def pad_token_id(self) -> int:
        """The id in padding slots of observations."""
        return self.core.pad_token_id

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's EOS (one of ``stop_token_ids``)."""
        return self.core.eos_token_id

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Every id that ends an episode (``terminated``): the EOS, each id of the reference's
        ``generation_config.eos_token_id``, the chat template's end of turn and the env's
        ``stop_token_ids=``. Samplers stop on these (``rlhf_env.rollout.collect`` passes them)."""
        return self.core.stop_token_ids

    @property
    def prompt_format(self):
        """The env's ``rlhf_env.prompt_format.PromptFormat``: how prompts become ids (chat template or
        raw text) and what ends a completion; offline data encoded with it matches the env's ids."""
        return self.core.format

    @property
    def chat_template(self) -> str:
        """``"auto"`` or ``"none"``, as given; ``prompt_format.uses_template`` says whether it applies."""
        return self.core.format.mode

    @property
    def vocab_size(self) -> int:
        """The tokenizer's ids: actions are in [0, vocab_size)."""
        return self.core.vocab_size

    @property
    def device(self) -> torch.device:
        """Where the reference and reward models run."""
        return self.core.device

    @property
    def beta(self) -> float:
        """KL coefficient β of the token reward; settable (adaptive KL changes it between rollouts)."""
        return self.core.beta

    @beta.setter
    def beta(self, value: float) -> None:
        if not value >= 0:
            raise SettingError(f"beta (the KL coefficient) must be >= 0, got {value}")
        if value > 0 and self.core.ref is None:
            raise SettingError(f"beta={value} > 0 needs a reference model (ref_model=None)")
        self.core.beta = float(value)
