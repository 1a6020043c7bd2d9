"""Gymnasium ids, as a list of ``register`` calls (Gymnasium's own style)."""

from __future__ import annotations

import gymnasium

ENV_IDS: list[str] = []


def _register(env_id: str, entry_point: str, vector_entry_point: str, **kwargs) -> None:
    if env_id not in gymnasium.registry:
        gymnasium.register(
            id=env_id,
            entry_point=entry_point,
            vector_entry_point=vector_entry_point,
            disable_env_checker=True,
            kwargs=kwargs,
        )
    ENV_IDS.append(env_id)


def register_envs() -> None:
    if ENV_IDS:
        return
    _register(
        "rlhf_env/TextGen-v0",
        entry_point="rlhf_env.default:make_default_env",
        vector_entry_point="rlhf_env.default:make_default_vector_env",
    )
