"""``PromptFormat``: the one place that turns a prompt into ids and knows what ends a completion.

A real instruct model expects its chat template around a prompt and ends its turn with an
end-of-turn token (ChatML's ``<|im_end|>``, Llama 3's ``<|eot_id|>``), which may not be the
tokenizer's EOS; Llama 3 also lists several ids in ``generation_config.eos_token_id``. The
envs (``rlhf_env.episodes``), the samplers (``policy.py``, ``fastgen.py``) and the offline
encodings of DPO, KTO, SFT and reward-model data (``scoring.encode_completion``) all read
both from here, so online and offline paths agree token for token.

Modes (``chat_template=``): ``"auto"`` (default) applies the tokenizer's template when it has
one (``tokenizer.chat_template``), as a user turn followed by the generation prompt;
``"none"`` encodes the raw text, as before templates existed. The built-in tiny tokenizers
have no template, so ``auto`` is ``none`` for them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rlhf_env.errors import SettingError

CHAT_TEMPLATE_MODES = ("auto", "none")
_MARK = "RLHFENVASSISTANTTEXT"  # plain ASCII: templates that trim or escape content keep it


def check_chat_template_mode(mode: str) -> str:
    """``mode`` if it is one of ``CHAT_TEMPLATE_MODES``, else a ``SettingError`` listing them."""
    if mode not in CHAT_TEMPLATE_MODES:
        raise SettingError(f"chat_template must be one of {list(CHAT_TEMPLATE_MODES)}, got {mode!r}")
    return mode


def generation_stop_ids(generation_config) -> tuple[int, ...]:
    """Every id of ``generation_config.eos_token_id`` (an int, a list of ints, or None)."""
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos]))


def _unique(ids: Iterable[int | None]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def _as_ids(encoded) -> list[int]:
    """``apply_chat_template(tokenize=True)``'s ids, whether it returned a list or a BatchEncoding."""
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
    return [int(i) for i in ids]


def end_of_turn_ids(tokenizer) -> tuple[int, ...]:
    """The token that the chat template writes right after an assistant message (e.g. ``<|im_end|>``).

    Found by rendering a user turn and an assistant turn and reading the first token after the
    assistant's text; kept only when it is a special or added token (a template that ends a turn
    with plain text, or cannot render an assistant turn, has none: the EOS ends completions then).
    """
    user = {"role": "user", "content": "x"}
    try:
        text = tokenizer.apply_chat_template([user, {"role": "assistant", "content": _MARK}], tokenize=False)
    except Exception:  # a template that refuses assistant turns (or this shape of them)
        return ()
    if not isinstance(text, str) or _MARK not in text:
        return ()
    after = text.split(_MARK, 1)[1]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    atomic = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return (int(ids[0]),) if ids and int(ids[0]) in atomic else ()


class PromptFormat:
    """How prompts become ids and which ids end a completion, for one tokenizer and mode.

    Args:
        tokenizer: the policy's tokenizer.
        chat_template: ``"auto"`` (the tokenizer's template when it has one) or ``"none"`` (raw text).
        generation_config: the policy's ``GenerationConfig`` (or None): every id of its
            ``eos_token_id`` (an int or a list, as Llama 3's) ends a completion too.
        extra_stop_ids: more ids that end a completion (e.g. ``stop_token_ids=`` of an env).

    Attributes:
        uses_template: whether prompts go through the chat template.
        stop_ids: every id that ends an episode, in order: the tokenizer's EOS, the generation
            config's, the template's end-of-turn, the extra ones (no repeats).
        end_id: what an offline completion ends with: the end-of-turn token under a template
            (when it has one), else the EOS; None when the tokenizer has neither.
    """

    def __init__(self, tokenizer, chat_template: str = "auto", generation_config=None, extra_stop_ids=()):
        self.tokenizer = tokenizer
        self.mode = check_chat_template_mode(chat_template)
        self.uses_template = self.mode == "auto" and bool(getattr(tokenizer, "chat_template", None))
        self.end_of_turn_ids = end_of_turn_ids(tokenizer) if self.uses_template else ()
        extra = _unique(extra_stop_ids or ())
        vocab = len(tokenizer)
        bad = [i for i in extra if not 0 <= i < vocab]
        if bad:
            raise SettingError(f"stop_token_ids {bad} are outside the vocabulary [0, {vocab})")
        eos = tokenizer.eos_token_id
        self.stop_ids = _unique([eos, *generation_stop_ids(generation_config), *self.end_of_turn_ids, *extra])
        self.end_id = self.end_of_turn_ids[0] if self.end_of_turn_ids else eos

    def __repr__(self) -> str:
        return f"PromptFormat(mode={self.mode!r}, uses_template={self.uses_template}, stop_ids={self.stop_ids})"

    def encode_prompt(self, text: str) -> list[int]:
        """The ids the policy sees before its first token: the template's user turn with the
        generation prompt (``apply_chat_template(..., add_generation_prompt=True)``), or ``tokenizer(text)``."""
        if not isinstance(text, str):
            raise TypeError(f"a prompt must be a string, got {type(text).__name__}")
        if self.uses_template:
            turn = [{"role": "user", "content": text}]
            return _as_ids(self.tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=True))
        return list(self.tokenizer(text)["input_ids"])

    def encode_prompts(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode_prompt`` of each text (raw text in one batched tokenizer call)."""
        if self.uses_template:
            return [self.encode_prompt(t) for t in texts]
        return [list(ids) for ids in self.tokenizer(list(texts))["input_ids"]]

    def encode_completion(self, prompt: str, completion: str, end: bool = True) -> tuple[list[int], int]:
        """``(ids, prompt_length)``: the prompt's ids, the completion's, then ``end_id`` when ``end``:
        the sequence the env holds when a policy completed ``prompt`` with ``completion`` and stopped."""
        if end and self.end_id is None:
            raise SettingError("the tokenizer has no EOS token, so a completion cannot be ended")
        p = self.encode_prompt(prompt)
        c = self.tokenizer(completion, add_special_tokens=False)["input_ids"]
        return p + list(c) + ([self.end_id] if end else []), len(p)

    def encode_injection(self, text: str, after_end_of_turn: bool = False) -> list[int]:
        """The ids a multi-turn env appends for ``text`` (a tool's result, a game's reply), tokenised once.

        After a policy turn that ended with the template's end of turn (``after_end_of_turn``), the
        text is a user turn as the template renders it, up to the next assistant turn's generation
        prompt: the tokens after the end-of-turn token in ``apply_chat_template`` of the same
        conversation, so the env's ids are the template's. Mid-turn (a tool call's closing tag) and
        without a template: ``tokenizer(text)`` without special tokens.
        """
        if not (self.uses_template and after_end_of_turn and self.end_of_turn_ids):
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        turns = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _MARK}]
        rendered = self.tokenizer.apply_chat_template(
            [*turns, {"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        end = self.tokenizer.decode(list(self.end_of_turn_ids))
        after = rendered.split(_MARK, 1)[1]
        if not after.startswith(end):
            raise SettingError(f"the chat template does not end an assistant turn with {end!r}: cannot inject a turn")
        return list(self.tokenizer(after[len(end) :], add_special_tokens=False)["input_ids"])

    def completion_text(self, ids: Sequence[int]) -> str:
        """The assistant's text of completion ``ids``: a final stop id dropped, special tokens skipped."""
        ids = list(ids)
        if ids and ids[-1] in self.stop_ids:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=True)


__all__ = [
    "CHAT_TEMPLATE_MODES",
    "PromptFormat",
    "check_chat_template_mode",
    "end_of_turn_ids",
    "generation_stop_ids",
]
