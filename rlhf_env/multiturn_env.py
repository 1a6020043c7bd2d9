"""``MultiTurnVectorEnv``: multi-turn, tool-using episodes in which the env owns every token.

The policy samples a turn (token by token with ``step``, or the whole turn with ``step_chunk``);
at a stop (an id, or a stop string of the ``interaction``) the env asks the interaction, appends its reply as tokens (tokenised once, when
injected) and the policy goes on, from the env-extended state. Nothing is re-rendered or
re-tokenised: the ids an episode ends with are the ids the sampler and the reference saw, and
the ids training scores. The reference's KV cache continues across turns (injected tokens are
fed to it with the next policy step or turn); KL shaping applies to policy tokens only.

Observations add ``source`` (L,) int8 to the single-turn ones: 0 prompt (and padding), 1 policy
token, 2 injected token (``rlhf_env.turns``). ``info`` adds, for rows whose policy turn ended at
this step, ``injected`` (the ids appended, a list per row), ``turn_reward`` and
``interaction_error`` (the text of a failure that was injected as an error message), and for
rows whose episode ended ``turns`` (policy turns) and ``interaction_errors`` (failures), each
with its Gymnasium ``_key`` mask. ``score`` is the episode's task reward in all: the reward of
its transcript plus its turns' rewards (the token rewards carry each where it was earned: a
turn's on the turn's last policy token, the transcript's on the last). Every other key is
``VectorTextGenEnv``'s.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces as gym_spaces
from gymnasium.vector.utils import batch_space

from rlhf_env.vector_env import VectorTextGenEnv


class MultiTurnVectorEnv(VectorTextGenEnv):
    """``VectorTextGenEnv`` (same arguments) whose episodes alternate policy turns and injections.

    Args:
        interaction: an ``rlhf_env.Interaction``: its ``stop_strings`` end a policy turn (as the
            env's stop ids do), its ``respond(state, turn)`` answers it.
        max_turns: policy turns per episode; the episode is truncated after the last.
        max_injection_tokens: the longest reply, in its own tokens; longer ones are cut with a marker.
        max_new_tokens: every token after the prompt, policy and injected: the episode's budget.
        (the rest as ``VectorTextGenEnv``; ``reward(prompts, transcripts)`` scores the episode's
        whole completion text, turns and injections.)

    ``step_chunk`` applies a row's tokens up to the end of its turn (the rest is ignored, as after
    an EOS), answers the turn and injects the reply: one reference forward per turn. A sampler
    that continues its cache across calls (``generate(obs, max_tokens, turn_end=env.ends_turn)``,
    ``SamplingPolicy``'s) then samples a whole turn per call: the chunked rollout path.
    """

    def __init__(self, *args, interaction, max_turns: int = 8, max_injection_tokens: int = 64, **kwargs):
        self._turn_options = dict(
            interaction=interaction, max_turns=max_turns, max_injection_tokens=max_injection_tokens
        )
        super().__init__(*args, **kwargs)
        L = self.core.max_len
        self.single_observation_space = gym_spaces.Dict(
            {**self.single_observation_space.spaces, "source": gym_spaces.Box(0, 2, shape=(L,), dtype=np.int8)}
        )
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)

    @property
    def interaction(self):
        return self.core.turns.interaction

    @property
    def max_turns(self) -> int:
        return self.core.turns.max_turns

    def ends_turn(self, row: int, new_ids: list[int]) -> bool:
        """Whether ``new_ids``, sampled after row ``row``'s current state, end its policy turn (with their
        last token): the rule ``step``/``step_chunk`` apply, for a sampler that stops rows there."""
        core = self.core
        before = core.ids[row, core.turns.turn_start[row] : core.length[row]].tolist()
        return core.turns.end_of_turn(before + list(new_ids), int(new_ids[-1]) in core.stop_token_ids)

    def _core_options(self) -> dict[str, Any]:
        return self._turn_options

    def _obs(self) -> dict[str, np.ndarray]:
        return {**super()._obs(), "source": self.core.source.numpy().copy()}

    def _step_info(self, info: dict[str, Any], out) -> None:
        B = self.num_envs
        if out.injected or out.turn_reward:
            injected = np.empty(B, dtype=object)
            injected[:] = [[] for _ in range(B)]
            turn_reward, ended_turn = np.zeros(B, dtype=np.float32), np.zeros(B, dtype=bool)
            for r, value in out.turn_reward.items():
                turn_reward[r], ended_turn[r] = value, True
            for r, ids in out.injected.items():
                injected[r] = list(ids)
            info["injected"], info["_injected"] = injected, np.array([bool(x) for x in injected])
            info["turn_reward"], info["_turn_reward"] = turn_reward, ended_turn
        if out.errors:
            error = np.full(B, "", dtype=object)
            for r, text in out.errors.items():
                error[r] = text
            info["interaction_error"], info["_interaction_error"] = error, error != ""
        if self._autoreset.any():
            ended = self._autoreset.copy()
            turns = self.core.turns
            info["turns"] = np.array(turns.turns, dtype=np.int64) * ended
            info["interaction_errors"] = np.array(turns.errors, dtype=np.int64) * ended
            info["_turns"], info["_interaction_errors"] = ended, ended.copy()
