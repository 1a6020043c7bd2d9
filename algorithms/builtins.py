"""Built-in algorithms, registered through the same hook as any third-party plugin."""

from __future__ import annotations

from rlhf_env.plugins import hookimpl


@hookimpl
def rlhf_register_algorithms(register):
    from rlhf_env.algorithms.base import AlgorithmSpec
    from rlhf_env.algorithms.zoo import dpo, grpo, kto, online_dpo, ppo, reinforce, reward_model, sft

    register(
        "ppo",
        AlgorithmSpec(ppo.Config, ppo.Trainer, "PPO: value head on the trunk, GAE, clipped ratio, KL-shaped rewards"),
    )
    register("reinforce", AlgorithmSpec(reinforce.Config, reinforce.Trainer, "REINFORCE with a mean baseline"))
    register(
        "grpo",
        AlgorithmSpec(grpo.Config, grpo.Trainer, "GRPO: group-relative advantages, clipped ratio, k3 KL in the loss"),
    )
    register(
        "dr_grpo",
        AlgorithmSpec(grpo.DrConfig, grpo.DrTrainer, "Dr. GRPO: GRPO without std scaling or length normalisation"),
    )
    register(
        "dpo",
        AlgorithmSpec(dpo.Config, dpo.Trainer, "DPO: preference pairs against the frozen reference, no reward model"),
    )
    register(
        "ipo",
        AlgorithmSpec(dpo.IPOConfig, dpo.IPOTrainer, "IPO: squared loss pulling the pair's log-ratio margin to 1/(2τ)"),
    )
    register(
        "simpo",
        AlgorithmSpec(
            dpo.SimPOConfig,
            dpo.SimPOTrainer,
            "SimPO: reference-free, length-normalised log-likelihood margin with a target γ, plus the chosen NLL",
        ),
    )
    register(
        "kto",
        AlgorithmSpec(
            kto.Config, kto.Trainer, "KTO: unpaired desirable/undesirable examples against a KL reference point"
        ),
    )
    register(
        "online_dpo",
        AlgorithmSpec(
            online_dpo.Config,
            online_dpo.Trainer,
            "Online DPO: pairs sampled from the current policy, ranked by the task's reward",
        ),
    )
    register("sft", AlgorithmSpec(sft.Config, sft.Trainer, "Supervised fine-tuning on the task's demonstrations"))
    register(
        "reward_model",
        AlgorithmSpec(
            reward_model.Config,
            reward_model.Trainer,
            "Bradley-Terry reward model from preference pairs (exportable as an env reward)",
            trains_policy=False,
        ),
    )
    register_online_zoo(register)


def register_online_zoo(register):
    """The 2025 online zoo (issue 15): RLOO, REINFORCE++, GSPO, CISPO, DAPO."""
    from rlhf_env.algorithms.base import AlgorithmSpec
    from rlhf_env.algorithms.zoo import cispo, dapo, gspo, reinforce_pp, rloo

    register(
        "rloo", AlgorithmSpec(rloo.Config, rloo.Trainer, "RLOO: k samples a prompt, leave-one-out baseline, REINFORCE")
    )
    register(
        "reinforce_pp",
        AlgorithmSpec(
            reinforce_pp.Config,
            reinforce_pp.Trainer,
            "REINFORCE++: token KL in the reward, batch-whitened returns, clipped ratio",
        ),
    )
    register(
        "reinforce_pp_baseline",
        AlgorithmSpec(
            reinforce_pp.BaselineConfig,
            reinforce_pp.BaselineTrainer,
            "REINFORCE++-baseline: REINFORCE++ with a group-mean score baseline",
        ),
    )
    register(
        "gspo",
        AlgorithmSpec(
            gspo.Config, gspo.Trainer, "GSPO: GRPO with length-normalised sequence ratios, clipped per sequence"
        ),
    )
    register(
        "cispo",
        AlgorithmSpec(
            cispo.Config, cispo.Trainer, "CISPO: GRPO advantages, clipped stop-gradient IS weights on a REINFORCE loss"
        ),
    )
    register(
        "dapo",
        AlgorithmSpec(
            dapo.Config, dapo.Trainer, "DAPO: clip-higher, token-level loss, dynamic sampling, overlong reward shaping"
        ),
    )


@hookimpl
def rlhf_register_commands(register):
    from rlhf_env.algorithms.commands import EXPORT_LORA, TRAIN

    register("train", TRAIN)
    register("export-lora", EXPORT_LORA)
