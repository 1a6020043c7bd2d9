"""The MDP mechanics shared by ``TextGenEnv`` and ``VectorTextGenEnv``.

``EpisodeBatch`` holds ``B`` rows of prompt ∘ completion token ids and a KV-cached
reference model. ``advance`` appends one token to each acting row, computes the KL-shaped
token reward of docs/maths.md §2,

    r_t = -β (log π_θ(y_t|s_t) - log π_ref(y_t|s_t))      (+ r_φ(x, y) on the last token),

scores every row that ended in one batch, and starts new prompts in the rows that ask,
all with **one** reference forward. ``advance_chunk`` does the same for up to K tokens
per row, still with one reference forward (the chunked rollout path). Both envs are thin
wrappers around it; what they share around it, loading their parts (``load_parts``) and
their public attributes (``EnvProperties``), is in ``rlhf_env.env_common``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_env.action_checks import check_action, check_chunk
from rlhf_env.errors import SettingError
from rlhf_env.kvcache import IncrementalLM
from rlhf_env.models import check_vocab, pad_token_id
from rlhf_env.prompt_format import PromptFormat
from rlhf_env.prompts import PromptSource
from rlhf_env.rewards import RewardModel, as_scores, call_reward, reward_name
from rlhf_env.turns import POLICY, PROMPT, Turns, after_skip, end_turns, first_turn_ends

__all__ = ["ChunkOut", "EpisodeBatch", "StepOut"]


@dataclass
class StepOut:
    """Per-row results of one ``advance``; all (B,) CPU tensors (``None`` if unavailable)."""

    reward: torch.Tensor  # float32, KL-shaped token reward (+ score where ended)
    ref_logprob: torch.Tensor | None  # float32, log π_ref(y_t|s_t); None without a reference
    kl: torch.Tensor | None  # float32, log π_θ − log π_ref; None without log-prob or reference
    score: torch.Tensor  # float32, r_φ(x, y) where ``ended`` (multi-turn: + the turns' rewards), else 0
    terminated: torch.Tensor  # bool, the token was a stop id (EOS, end of turn, ...)
    truncated: torch.Tensor  # bool, max_new_tokens reached without a stop id
    acted: torch.Tensor  # bool, rows whose action was applied
    # Multi-turn (an ``interaction``): per row whose policy turn ended, the ids injected after it,
    # the turn's reward (in ``reward`` too) and the interaction's failure, if any.
    injected: dict[int, list[int]] | None = None
    turn_reward: dict[int, float] | None = None
    errors: dict[int, str] | None = None

    @property
    def ended(self) -> torch.Tensor:
        return self.terminated | self.truncated


@dataclass
class ChunkOut:
    """Per-token results of one ``advance_chunk``: (B, K) CPU tensors, position j = the row's j-th token.

    Positions a row did not apply (beyond its tokens, after its episode ended, rows that
    did not act) hold 0 / False; ``score`` and the row masks are (B,).
    """

    reward: torch.Tensor  # float32, KL-shaped token reward (+ score on the last applied token)
    ref_logprob: torch.Tensor | None  # float32
    kl: torch.Tensor | None  # float32
    terminated: torch.Tensor  # bool, the token was a stop id
    truncated: torch.Tensor  # bool, the token reached max_new_tokens without a stop id
    applied: torch.Tensor  # bool, tokens that were applied
    score: torch.Tensor  # (B,) float32, r_φ(x, y) of rows that ended, else 0
    ended: torch.Tensor  # (B,) bool, rows whose episode ended in this chunk
    injected: dict[int, list[int]] | None = None  # multi-turn: as StepOut's
    turn_reward: dict[int, float] | None = None
    errors: dict[int, str] | None = None


class EpisodeBatch:
    """State and maths for ``batch_size`` generation episodes (see module docstring).

    Takes loaded objects (``load_parts`` turns paths into them):

    Args:
        tokenizer: the policy's tokenizer.
        ref_model: reference causal LM, on ``device``; optional when ``beta == 0``.
        reward: ``reward(prompts, completions) -> scores`` or a ``RewardModel``.
        prompts: the prompt source (a non-empty sequence of strings).
        beta: KL coefficient β ≥ 0.
        max_new_tokens: episode length limit (``truncated`` when reached).
        max_prompt_tokens: prompt length limit, in tokens as encoded (chat template included);
            default the longest prompt of ``prompts``.
        device: where the reference model runs.
        chat_template: ``"auto"`` (the tokenizer's template when it has one) or ``"none"``
            (``rlhf_env.prompt_format.PromptFormat``).
        stop_token_ids: ids that end an episode besides the EOS, every id of the reference's
            ``generation_config.eos_token_id`` and the template's end of turn.
        interaction: multi-turn episodes (``rlhf_env.interaction``; None: one policy turn). A stop id
            or one of its ``stop_strings`` ends a policy turn; its reply is injected and the policy
            goes on, until the interaction is done, ``max_turns`` turns or ``max_new_tokens`` tokens
            (policy and injected) in all. ``max_injection_tokens``: the longest injection (cut with
            a marker beyond).
    """

    def __init__(
        self,
        tokenizer,
        ref_model,
        reward,
        prompts,
        *,
        beta: float,
        max_new_tokens: int,
        max_prompt_tokens: int | None,
        batch_size: int,
        device: torch.device,
        chat_template: str = "auto",
        stop_token_ids=(),
        interaction=None,
        max_turns: int = 8,
        max_injection_tokens: int = 64,
    ):
        if not beta >= 0:
            raise SettingError(f"beta (the KL coefficient) must be >= 0, got {beta}")
        if max_new_tokens < 1:
            raise SettingError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if beta > 0 and ref_model is None:
            raise SettingError(f"beta={beta} > 0 needs a reference model (ref_model=None)")
        self.tokenizer = tokenizer
        self.beta = float(beta)
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size)
        self.device = device
        self.vocab_size = len(tokenizer)
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = pad_token_id(tokenizer)
        generation_config = getattr(ref_model, "generation_config", None)
        self.format = PromptFormat(tokenizer, chat_template, generation_config, stop_token_ids)
        self.stop_token_ids = self.format.stop_ids
        self._stop = torch.tensor(self.stop_token_ids, dtype=torch.long)  # (S,), what ``terminated`` tests

        self.ref_model = ref_model
        if ref_model is not None:
            check_vocab(tokenizer, self.ref_model, "reference model")
        if not callable(reward):
            raise TypeError(f"reward must be callable(prompts, completions) or a reward model, got {reward!r}")
        self.reward = reward
        self._score_ids = isinstance(reward, RewardModel) and reward.shares_vocab_with(tokenizer)

        self.prompts = PromptSource(prompts)
        self._prompt_ids: dict[str, list[int]] = {}
        longest = max(len(self._encode(p, limit=None)) for p in self.prompts.prompts)
        self.max_prompt_tokens = int(max_prompt_tokens or longest)
        if longest > self.max_prompt_tokens:
            raise SettingError(
                f"a prompt has {longest} tokens{self._as_encoded()}, more than max_prompt_tokens={self.max_prompt_tokens}"
            )
        self.max_len = self.max_prompt_tokens + self.max_new_tokens
        limit = getattr(getattr(self.ref_model, "config", None), "max_position_embeddings", None)
        if limit is not None and self.max_len > limit:
            raise SettingError(
                f"max_prompt_tokens + max_new_tokens = {self.max_len} exceeds the reference model's {limit} positions"
            )

        B, L = self.batch_size, self.max_len
        self.ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)  # CPU; obs are views of it
        self.length = torch.zeros(B, dtype=torch.long)
        self.prompt_length = torch.zeros(B, dtype=torch.long)
        self.prompt_text = [""] * B
        self.source = torch.zeros((B, L), dtype=torch.int8)  # turns.PROMPT / POLICY / INJECTED per token
        self.fed = torch.zeros(B, dtype=torch.long)  # tokens of each row the reference has consumed
        self.turns = None
        if interaction is not None:
            encode = self.format.encode_injection
            self.turns = Turns(interaction, tokenizer, B, max_turns, max_injection_tokens, encode)
        self.ref = None
        if self.ref_model is not None:
            # Log-probs over the tokenizer's ids only, as the sampler's (the model may pad its vocabulary).
            self.ref = IncrementalLM(self.ref_model, B, self.pad_token_id, vocab_size=self.vocab_size)

    # -- prompts -------------------------------------------------------------------------
    def _encode(self, prompt: str, limit: int | None) -> list[int]:
        ids = self._prompt_ids.get(prompt)
        if ids is None:
            if not isinstance(prompt, str):
                raise TypeError(f"a prompt must be a string, got {type(prompt).__name__}")
            ids = self.format.encode_prompt(prompt)
            if not ids:
                raise SettingError(f"prompt {prompt!r} is empty after tokenization")
            self._prompt_ids[prompt] = ids
        if limit is not None and len(ids) > limit:
            raise SettingError(
                f"prompt {prompt!r} has {len(ids)} tokens{self._as_encoded()}, more than max_prompt_tokens={limit}"
            )
        return ids

    def _as_encoded(self) -> str:
        return " in its chat template" if self.format.uses_template else ""

    def completion_ids(self, row: int) -> list[int]:
        return self.ids[row, self.prompt_length[row] : self.length[row]].tolist()

    def completion_text(self, row: int) -> str:
        """The row's assistant text: its completion without the stop id, special tokens skipped."""
        return self.format.completion_text(self.completion_ids(row))

    # -- one step for the whole batch ------------------------------------------------------
    def advance(
        self,
        tokens: torch.Tensor,
        logprobs: torch.Tensor | None,
        acting: torch.Tensor,
        restarts: dict[int, str] | None = None,
    ) -> StepOut:
        """Apply ``tokens`` to the ``acting`` rows and start ``restarts`` (row -> prompt).

        Args:
            tokens: (B,) int64 token ids (ignored where not ``acting``).
            logprobs: (B,) float32 log π_θ of those tokens, or None (only when β = 0).
            acting: (B,) bool rows whose token is applied.
            restarts: rows (not acting) that begin a new episode with the given prompt.
        """
        B = self.batch_size
        restarts = restarts or {}
        rows = acting.nonzero().flatten()
        tokens = tokens.to(torch.long).cpu()
        check_action(self, tokens, logprobs, rows)

        reward = torch.zeros(B, dtype=torch.float32)
        score = torch.zeros(B, dtype=torch.float32)
        terminated = torch.zeros(B, dtype=torch.bool)
        truncated = torch.zeros(B, dtype=torch.bool)
        ref_lp = kl = None
        turn = {}
        if len(rows):
            tok = tokens[rows]
            if self.ref is not None:
                ref_lp = torch.zeros(B, dtype=torch.float32)
                ref_lp[rows] = self.ref.next_logprobs[rows.to(self.device), tok.to(self.device)].cpu()
                if logprobs is not None:
                    kl = torch.zeros(B, dtype=torch.float32)
                    kl[rows] = logprobs[rows] - ref_lp[rows]
                    reward -= self.beta * kl
            self.ids[rows, self.length[rows]] = tok
            self.source[rows, self.length[rows]] = POLICY
            self.length[rows] += 1
            terminated[rows] = torch.isin(tok, self._stop)
            turn = end_turns(self, rows, terminated, truncated, reward) if self.turns is not None else {}
            full = (self.length - self.prompt_length) >= self.max_new_tokens
            truncated[rows] = (truncated[rows] | full[rows]) & ~terminated[rows]
            ended = (terminated | truncated).nonzero().flatten().tolist()
            if ended:
                score[ended] = self._score(ended, terminated)
                reward += score
                if self.turns is not None:  # the score is the episode's task reward in all: turns' too
                    score[ended] += self.turns.returns(ended)
        out = StepOut(reward, ref_lp, kl, score, terminated, truncated, acting.clone(), **turn)
        self._feed_reference(out.acted & ~out.ended, restarts)
        return out

    def advance_chunk(
        self,
        tokens: torch.Tensor,
        logprobs: torch.Tensor | None,
        counts: torch.Tensor,
        acting: torch.Tensor,
        restarts: dict[int, str] | None = None,
    ) -> ChunkOut:
        """Apply up to K tokens per ``acting`` row at once; the same results as K ``advance`` calls.

        A row's tokens are applied in order until its count, a stop id (which ends the episode:
        the tokens after it are ignored) or ``max_new_tokens`` (truncation). The reference
        scores the applied tokens in one forward through its KV cache (``IncrementalLM.score``),
        the rows that ended are scored in one batch, then ``restarts`` begin.

        Args:
            tokens: (B, K) int64 token ids.
            logprobs: (B, K) float32 log π_θ of those tokens, or None (only when β = 0).
            counts: (B,) int64 tokens offered per row (1..K; the rest of the row is ignored).
            acting: (B,) bool rows whose tokens are applied.
            restarts: rows (not acting) that begin a new episode with the given prompt.
        """
        multi = self.turns is not None
        B, K = tokens.shape
        tokens = tokens.to(torch.long).cpu()
        j = torch.arange(K)
        offered = torch.where(acting, counts.to(torch.long).clamp(max=K), 0)
        is_eos = (j[None, :] < offered[:, None]) & torch.isin(tokens, self._stop)
        first_eos = torch.where(is_eos.any(1), is_eos.to(torch.int8).argmax(1), K)
        if multi:  # where a policy turn ends: a stop id, a stop string, max_turn_tokens (the rest is ignored)
            first_eos = first_turn_ends(self, tokens, offered, first_eos)
        room = self.max_new_tokens - (self.length - self.prompt_length)
        count = torch.minimum(torch.minimum(first_eos + 1, offered), room).clamp(min=0)
        applied = j[None, :] < count[:, None]
        term_row = acting & (first_eos < count)  # multi-turn: the turn ended; the interaction decides below
        trunc_row = acting & ~term_row & (self.length - self.prompt_length + count >= self.max_new_tokens)
        ended = term_row | trunc_row
        safe = torch.where(applied, tokens, self.pad_token_id)
        check_chunk(self, tokens, logprobs, applied)

        reward = torch.zeros(B, K, dtype=torch.float32)
        score = torch.zeros(B, dtype=torch.float32)
        ref_lp = kl = None
        if self.ref is not None and bool(applied.any()):
            n_feed = count if multi else torch.where(ended, count - 1, count)  # a turn's end may go on
            if multi:  # the last injection goes in with the turn: one reference forward a turn
                skip = torch.where(acting, self.length - self.fed, 0)
                ref_lp = self.ref.score(after_skip(self, skip, safe), count, n_feed, skip=skip).cpu()
            else:
                ref_lp = self.ref.score(safe.to(self.device), count, n_feed).cpu()
            if logprobs is not None:
                kl = torch.where(applied, logprobs.to(torch.float32) - ref_lp, 0.0)
                reward -= self.beta * kl
        elif self.ref is not None:
            ref_lp = torch.zeros(B, K, dtype=torch.float32)
        r_idx, j_idx = applied.nonzero(as_tuple=True)
        self.ids[r_idx, self.length[r_idx] + j_idx] = tokens[r_idx, j_idx]
        self.source[r_idx, self.length[r_idx] + j_idx] = POLICY
        self.length += count
        self.fed = self.length.clone()  # the reference scored every applied token (rows that ended restart)
        last = (count - 1).clamp(min=0)
        rows = torch.arange(B)
        turn = {}
        if multi:  # the interaction answers the turns that ended: inject, or end the episode
            term_row = term_row & torch.isin(tokens[rows, last], self._stop)  # ended by a stop id
            turn_reward = torch.zeros(B, dtype=torch.float32)
            turn = end_turns(self, (acting & (first_eos < count)).nonzero().flatten(), term_row, trunc_row, turn_reward)
            full = (self.length - self.prompt_length) >= self.max_new_tokens
            trunc_row = acting & ~term_row & (trunc_row | full)
            ended = term_row | trunc_row
            reward[rows, last] += turn_reward
        terminated, truncated = torch.zeros(B, K, dtype=torch.bool), torch.zeros(B, K, dtype=torch.bool)
        terminated[rows, last] = term_row
        truncated[rows, last] = trunc_row
        done = ended.nonzero().flatten().tolist()
        if done:
            score[done] = self._score(done, term_row)
            reward[rows, last] += score
            if multi:
                score[done] += self.turns.returns(done)
        # A multi-turn row's injection waits for its next turn's forward (``IncrementalLM.score(skip=)``).
        self._feed_reference(torch.zeros_like(acting) if multi else acting & ~ended, restarts or {})
        return ChunkOut(reward, ref_lp, kl, terminated, truncated, applied, score, ended, **turn)

    def _score(self, rows: list[int], terminated: torch.Tensor) -> torch.Tensor:
        """r_φ(x, y) for the rows that just ended, in one batch."""
        if self._score_ids:
            # Same vocabulary: hand the ids over instead of decoding and re-tokenising.
            seqs = [self.ids[r, : self.length[r] - int(terminated[r])].tolist() for r in rows]
            return as_scores(self.reward.score_ids(seqs), len(rows), reward_name(self.reward))
        prompts = [self.prompt_text[r] for r in rows]
        completions = [self.completion_text(r) for r in rows]
        return as_scores(call_reward(self.reward, prompts, completions), len(rows), reward_name(self.reward))

    def _feed_reference(self, going_on: torch.Tensor, restarts: dict[int, str]) -> None:
        """One reference forward: what the ``going_on`` rows added since the reference last saw them (the
        new token, and a multi-turn row's injection after it; after a chunk, which the reference scored,
        only an injection), the prompt of new ones."""
        new_ids = {r: self._encode(p, self.max_prompt_tokens) for r, p in restarts.items()}
        for r, ids in new_ids.items():
            self.ids[r] = self.pad_token_id
            self.ids[r, : len(ids)] = torch.as_tensor(ids)
            self.source[r] = PROMPT
            self.length[r] = self.prompt_length[r] = len(ids)
            self.prompt_text[r] = restarts[r]
            if self.turns is not None:
                self.turns.start(r, restarts[r], len(ids))
        if self.ref is None:
            return
        B = self.batch_size
        lengths = torch.where(going_on, self.length - self.fed, 0)
        width = max([1, int(lengths.max())] + [len(ids) for ids in new_ids.values()])
        cols = (self.fed[:, None] + torch.arange(width)).clamp(max=self.ids.shape[1] - 1)
        chunk = torch.where(torch.arange(width) < lengths[:, None], self.ids.gather(1, cols), self.pad_token_id)
        restart = torch.zeros(B, dtype=torch.bool)
        for r, ids in new_ids.items():
            chunk[r] = self.pad_token_id
            chunk[r, : len(ids)] = torch.as_tensor(ids)
            lengths[r] = len(ids)
            restart[r] = True
        if bool(lengths.any()):
            self.ref.feed(chunk, lengths, restart)
            self.fed = torch.where(lengths > 0, self.length, self.fed)
