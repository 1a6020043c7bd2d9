"""rlhf_env: RL from human feedback on language models as a Gymnasium environment.

Importing the package registers the Gymnasium ids (``rlhf_env/TextGen-v0``); plugins are
loaded only when first asked for (``rlhf_env.plugins.get_host()``), never as an import side effect.
"""

from rlhf_env.env import TextGenEnv
from rlhf_env.errors import EpisodeEndedError, InvalidActionError, RewardError, VocabMismatchError
from rlhf_env.interaction import Interaction, Reply
from rlhf_env.kvcache import IncrementalLM
from rlhf_env.multiturn_env import MultiTurnVectorEnv
from rlhf_env.plugins import hookimpl
from rlhf_env.registration import ENV_IDS, register_envs
from rlhf_env.rewards import RewardModel
from rlhf_env.tiny import build_char_tokenizer, build_tiny_model, save_tiny
from rlhf_env.vector_env import VectorTextGenEnv

register_envs()

__version__ = "0.1.0"
__all__ = [
    "ENV_IDS",
    "EpisodeEndedError",
    "IncrementalLM",
    "Interaction",
    "InvalidActionError",
    "MultiTurnVectorEnv",
    "RewardError",
    "Reply",
    "RewardModel",
    "TextGenEnv",
    "VectorTextGenEnv",
    "VocabMismatchError",
    "build_char_tokenizer",
    "build_tiny_model",
    "hookimpl",
    "save_tiny",
]
