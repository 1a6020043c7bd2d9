"""Multi-turn bookkeeping for ``EpisodeBatch``: where a policy turn ends, what is injected after it.

Each row holds its ``Interaction`` state, the position its current policy turn began at and its
turn count. After every policy token, ``end_of_turn`` says whether the turn just ended (a stop id,
or the turn's text ending with one of the interaction's ``stop_strings``); ``respond`` then calls
the interaction (``interaction.safe_respond``: an exception or a timeout becomes an injected error
message) and returns the reply's ids, tokenised once (``encode_injection``), cut to
``max_injection_tokens`` (the reply's own tokens) with ``CUT_MARKER``; a reply that leaves no room
for another policy token ends the episode (truncated).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlhf_env.errors import SettingError
from rlhf_env.interaction import CUT_MARKER, Interaction, safe_respond

# Per-token source of the env's sequence: the ``source`` observation and ``Episode.source``.
PROMPT, POLICY, INJECTED = 0, 1, 2


@dataclass
class TurnEnd:
    """What ``respond`` decided for a row whose policy turn ended.

    ids: the tokens to inject now ([] for none). reward: the turn's reward. done: the episode ends
    (``terminated``). truncated: it ends at a limit (``max_turns``, no room left). error: the
    interaction's failure, injected as text (None when it answered).
    """

    ids: list[int]
    reward: float
    done: bool
    truncated: bool
    error: str | None


class Turns:
    """The turn state of ``batch_size`` rows (see the module docstring).

    Args:
        interaction: what answers a turn (``rlhf_env.interaction.Interaction``).
        tokenizer: the env's tokenizer: turn texts are decoded with it, injections encoded once.
        batch_size: rows.
        max_turns: policy turns per episode; the episode is truncated after the last one.
        max_injection_tokens: longest injection; a longer one is cut and ends with ``CUT_MARKER``.
        encode: ``(text, after_end_of_turn) -> ids`` of an injection (``PromptFormat.encode_injection``:
            a user turn of the chat template after an end of turn, else plain text).
    """

    def __init__(
        self, interaction: Interaction, tokenizer, batch_size: int, max_turns: int, max_injection_tokens: int, encode
    ):
        if not isinstance(interaction, Interaction):
            raise TypeError(f"interaction must be an rlhf_env.Interaction, got {type(interaction).__name__}")
        if max_turns < 1 or max_injection_tokens < 1:
            raise SettingError(
                f"max_turns and max_injection_tokens must be >= 1, got {max_turns} and {max_injection_tokens}"
            )
        self.interaction, self.tokenizer, self.encode = interaction, tokenizer, encode
        self.max_turns, self.max_injection_tokens = int(max_turns), int(max_injection_tokens)
        self.stop_strings = tuple(s for s in interaction.stop_strings if s)
        self.states: list[Any] = [None] * batch_size
        self.turn_start = [0] * batch_size  # where the row's current policy turn began in its ids
        self.turns = [0] * batch_size  # policy turns ended so far in the row's episode
        self.errors = [0] * batch_size  # interaction failures in the row's episode
        self.turn_return = [0.0] * batch_size  # Σ of the episode's turn rewards so far
        self._cut = tokenizer(CUT_MARKER, add_special_tokens=False)["input_ids"]

    def start(self, row: int, prompt: str, length: int) -> None:
        """A new episode of ``row`` on ``prompt``, its first policy token at position ``length``."""
        self.states[row] = self.interaction.start(prompt)
        self.turn_start[row], self.turns[row], self.errors[row], self.turn_return[row] = length, 0, 0, 0.0

    def returns(self, rows: list[int]) -> torch.Tensor:
        """(len(rows),) float32: Σ of each row's turn rewards in its episode so far."""
        return torch.tensor([self.turn_return[r] for r in rows], dtype=torch.float32)

    def turn_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def end_of_turn(self, turn_ids: list[int], by_stop_id: bool) -> bool:
        """Whether a policy turn (its ids so far) just ended: at a stop id, a stop string or the
        interaction's ``max_turn_tokens``."""
        limit = self.interaction.max_turn_tokens
        if by_stop_id or (limit is not None and len(turn_ids) >= limit):
            return True
        if not self.stop_strings:
            return False
        text = self.turn_text(turn_ids)
        return text.endswith(self.stop_strings)

    def respond(self, row: int, turn_ids: list[int], by_stop_id: bool, room: int) -> TurnEnd:
        """The interaction's answer to the turn that just ended; ``room``: tokens the episode has left."""
        self.turns[row] += 1
        text = self.turn_text(turn_ids[:-1] if by_stop_id else turn_ids)  # the stop id is not text
        reply, error = safe_respond(self.interaction, self.states[row], text)
        self.errors[row] += error is not None
        reward = float(reply.reward)
        self.turn_return[row] += reward
        if reply.done or (by_stop_id and not reply.text):  # over, or the policy ended with nothing to answer
            return TurnEnd([], reward, True, False, error)
        if self.turns[row] >= self.max_turns:
            return TurnEnd([], reward, False, True, error)
        text = reply.text or ""
        content = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(content) > self.max_injection_tokens:  # cut the reply's own tokens, not a template's wrapper
            keep = max(self.max_injection_tokens - len(self._cut), 0)
            text = self.tokenizer.decode(content[:keep]) + CUT_MARKER
        ids = self.encode(text, by_stop_id) if text else []
        if len(ids) >= room:  # no room for the policy's next token after it: the episode ends here
            return TurnEnd([], reward, False, True, error)
        return TurnEnd(ids, reward, False, False, error)


# -- what EpisodeBatch does at a turn's end (``batch``: the EpisodeBatch) ----------------------------


def end_turns(batch, rows, terminated, truncated, reward) -> dict:
    """Multi-turn: for each acting row whose policy turn just ended, ask the interaction, add the
    turn's reward, inject its reply (ids and ``INJECTED`` source) or end the episode; StepOut's fields."""
    injected, turn_reward, errors = {}, {}, {}
    for r in rows.tolist():
        start, end = batch.turns.turn_start[r], int(batch.length[r])
        turn_ids = batch.ids[r, start:end].tolist()
        if not batch.turns.end_of_turn(turn_ids, bool(terminated[r])):
            continue
        room = batch.max_new_tokens - (end - int(batch.prompt_length[r]))
        got = batch.turns.respond(r, turn_ids, bool(terminated[r]), room)
        reward[r] += got.reward
        turn_reward[r] = got.reward
        if got.error is not None:
            errors[r] = got.error
        terminated[r], truncated[r] = got.done, got.truncated
        if got.ids:
            n = len(got.ids)
            batch.ids[r, end : end + n] = torch.as_tensor(got.ids)
            batch.source[r, end : end + n] = INJECTED
            batch.length[r] = end + n
            injected[r] = got.ids
        batch.turns.turn_start[r] = int(batch.length[r])
    return {"injected": injected, "turn_reward": turn_reward, "errors": errors}


def first_turn_ends(batch, tokens: torch.Tensor, offered: torch.Tensor, first_stop: torch.Tensor) -> torch.Tensor:
    """(B,) the position of the token that ends each row's policy turn in a chunk (K: none)."""
    out = first_stop.clone()
    for r in offered.nonzero().flatten().tolist():
        before = batch.ids[r, batch.turns.turn_start[r] : batch.length[r]].tolist()
        upto = min(int(offered[r]), int(first_stop[r]) + 1)
        row = tokens[r, :upto].tolist()
        for j in range(upto):
            if batch.turns.end_of_turn(before + row[: j + 1], j == int(first_stop[r])):
                out[r] = j
                break
    return out


def after_skip(batch, skip: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
    """(B, S + K): each row's ``skip`` ids since the reference's last feed, then its chunk."""
    B, K = chunk.shape
    S = int(skip.max())
    out = torch.full((B, S + K), batch.pad_token_id, dtype=torch.long)
    for r in skip.nonzero().flatten().tolist():
        n = int(skip[r])
        out[r, :n] = batch.ids[r, int(batch.fed[r]) : int(batch.fed[r]) + n]
    rows = torch.arange(B)[:, None]
    out[rows, skip[:, None] + torch.arange(K)[None, :]] = chunk
    return out
