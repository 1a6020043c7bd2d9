"""One metric vocabulary: every name a trainer, the loop, ``result.json`` or the report uses.

``metrics.jsonl`` records, TensorBoard scalars (the loop writes each record's keys as its
tags), the runner's ``result.json`` and the report's tables all use these names; nothing
else spells them. Each name is declared once with its meaning and unit, and
``docs/architecture.md`` carries the same table (``markdown_table()``; a test keeps them
equal). The formulas behind the names are in ``docs/maths.md``.

Namespaces: ``reward/`` rewards, ``objective/`` what the KL-regularised objective is made
of, ``loss/`` the losses minimised, ``policy/`` and ``optim/`` update diagnostics,
``dpo/`` and ``rm/`` algorithm-specific ones, ``rollout/`` the sampler's agreement with
the trainer, ``perf/`` throughput and memory, ``memory/`` peak tensor memory against its
analytic estimate, ``time/`` clocks and counts, ``model/`` the model's size, ``episode/`` and
``tool/`` what multi-turn episodes did. A third-party algorithm may log
names of its own; the built-ins log only these.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    meaning: str
    unit: str


VOCABULARY: dict[str, Metric] = {}


def _metric(name: str, meaning: str, unit: str) -> str:
    if name in VOCABULARY:
        raise ValueError(f"metric {name!r} is declared twice")
    VOCABULARY[name] = Metric(name, meaning, unit)
    return name


# -- rewards and the objective ------------------------------------------------------------------
REWARD_GOLD = _metric(
    "reward/gold",
    "mean gold reward of policy samples (T = 1) on held-out prompts (loop evaluations, `result.json`)",
    "task reward",
)
REWARD_GOLD_SE = _metric(
    "reward/gold_se",
    "standard error of `reward/gold` over its held-out prompts (std / √n of the per-prompt gold)",
    "task reward",
)
REWARD_SCORE = _metric("reward/score", "mean end-of-episode score of the step's training rollouts", "task reward")
REWARD_GROUP_STD = _metric(
    "reward/group_std", "mean over groups of the sample std of the G scores (GRPO)", "task reward"
)
OBJECTIVE_KL = _metric(
    "objective/kl", "mean over the rollouts of Σ_t (log π_old − log π_ref), docs/maths.md §3", "nats per completion"
)
OBJECTIVE_KL_EVAL = _metric(
    "objective/kl_eval", "the same KL on the evaluation samples of `reward/gold`", "nats per completion"
)
OBJECTIVE_KL_COEF = _metric("objective/kl_coef", "β of the KL-shaped env reward for this rollout (PPO)", "1/nat")
OBJECTIVE_RETURN = _metric("objective/return", "mean KL-shaped episode return Σ_t r_t, docs/maths.md §2", "task reward")

# -- losses (the values minimised; means over the step's optimizer updates) ----------------------
LOSS_TOTAL = _metric("loss/total", "the whole loss minimised (PPO: policy + α·value; GRPO: policy + kl)", "loss")
LOSS_POLICY = _metric("loss/policy", "the policy-gradient part of the loss (PPO, GRPO, REINFORCE, DPO)", "loss")
LOSS_VALUE = _metric("loss/value", "½ mean (V − R̂)², clipped when configured (PPO)", "loss")
LOSS_KL = _metric("loss/kl", "β × the aggregated k3 penalty (GRPO, Dr. GRPO)", "loss")
LOSS_SFT = _metric("loss/sft", "mean NLL of completion + EOS tokens (SFT)", "nats per token")
LOSS_REWARD_MODEL = _metric("loss/reward_model", "Bradley-Terry NLL −mean log σ(r+ − r−)", "nats per pair")

# -- update diagnostics ------------------------------------------------------------------------
POLICY_CLIPFRAC = _metric(
    "policy/clipfrac",
    "share of completion tokens where clipping changed the objective: "
    "ρ > 1+ε with Â > 0, or ρ < 1−ε with Â < 0 (PPO, GRPO; as TRL and verl count it)",
    "fraction",
)
POLICY_APPROX_KL = _metric(
    "policy/approx_kl", "k3 estimate of KL(π_old ‖ π_θ) per token, mean over updates (PPO)", "nats per token"
)
OPTIM_GRAD_NORM = _metric(
    "optim/grad_norm", "global L2 norm of the gradient before clipping, mean over updates", "norm"
)

# -- algorithm-specific ------------------------------------------------------------------------
DPO_REWARD_ACCURACY = _metric(
    "dpo/reward_accuracy", "share of pairs whose implicit reward ranks chosen above rejected", "fraction"
)
DPO_REWARD_MARGIN = _metric("dpo/reward_margin", "mean implicit reward of chosen minus rejected", "nats")
DPO_CHOSEN_REWARD = _metric(
    "dpo/chosen_reward", "mean implicit reward β (log π_θ − log π_ref) of the chosen completions", "nats"
)
DPO_REJECTED_REWARD = _metric(
    "dpo/rejected_reward", "mean implicit reward β (log π_θ − log π_ref) of the rejected completions", "nats"
)
SIMPO_CHOSEN_REWARD = _metric(
    "dpo/simpo_chosen_reward", "mean SimPO reward β log π_θ / length of the chosen completions", "nats per token"
)
SIMPO_REJECTED_REWARD = _metric(
    "dpo/simpo_rejected_reward", "mean SimPO reward β log π_θ / length of the rejected completions", "nats per token"
)
KTO_REFERENCE_POINT = _metric(
    "dpo/kto_reference_point",
    "z₀ = max(0, mean log π_θ/π_ref) over the step's mismatched pairs: KTO's KL estimate, docs/maths.md §21",
    "nats per completion",
)
KTO_DESIRABLE_REWARD = _metric(
    "dpo/kto_desirable_reward", "mean log π_θ − log π_ref of the step's desirable examples", "nats"
)
KTO_UNDESIRABLE_REWARD = _metric(
    "dpo/kto_undesirable_reward", "mean log π_θ − log π_ref of the step's undesirable examples", "nats"
)
ONLINE_DPO_PAIR_FRACTION = _metric(
    "dpo/online_pair_fraction",
    "share of the step's prompts whose two policy samples differ in reward (online DPO)",
    "fraction",
)
RM_ACCURACY = _metric("rm/accuracy", "share of the step's training pairs with r_φ(y+) > r_φ(y−)", "fraction")
RM_MARGIN = _metric("rm/margin", "mean r_φ(y+) − r_φ(y−) on the step's training pairs", "reward")
RM_HELDOUT_ACCURACY = _metric(
    "rm/heldout_accuracy", "agreement with the annotators' labels on held-out pairs", "fraction"
)
RM_HELDOUT_GOLD_ACCURACY = _metric(
    "rm/heldout_gold_accuracy", "agreement with the gold order on held-out pairs whose gold rewards differ", "fraction"
)

# -- throughput, memory, clocks ----------------------------------------------------------------
PERF_TOKENS = _metric(
    "perf/tokens", "training tokens of the step: completion tokens the update is computed on", "tokens"
)
PERF_TOKENS_TOTAL = _metric("perf/tokens_total", "training tokens since the run started", "tokens")
PERF_TOKENS_PER_S = _metric("perf/tokens_per_s", "`perf/tokens` over `perf/step_time_s`", "tokens/s")
PERF_STEP_TIME_S = _metric("perf/step_time_s", "wall time of the step (rollout and updates)", "s")
PERF_MEAN_TOKENS_PER_S = _metric(
    "perf/mean_tokens_per_s", "`perf/tokens_total` over `time/elapsed_s`, set-up included (`result.json`)", "tokens/s"
)
PERF_STEPS_PER_S = _metric(
    "perf/steps_per_s", "`time/steps` over `time/elapsed_s` (TRL baseline `result.json`)", "steps/s"
)
PERF_PEAK_MEM_MB = _metric("perf/peak_mem_mb", "peak resident set (CPU) or peak allocated GPU memory of the run", "MiB")
TIME_ELAPSED_S = _metric(
    "time/elapsed_s", "training time: the trainer's set-up plus its steps, evaluation and checkpoints excluded", "s"
)
TIME_WALL_S = _metric("time/wall_s", "wall time of a whole `rlhf bench` cell or base-model job (`result.json`)", "s")
TIME_STEPS = _metric("time/steps", "training iterations done (`result.json`)", "steps")
MODEL_PARAMS = _metric("model/params", "parameters of the base model (base `result.json`)", "count")


def markdown_table() -> str:
    """The vocabulary as the Markdown table in ``docs/architecture.md``."""
    rows = ["| name | meaning | unit |", "|---|---|---|"]
    rows += [f"| `{m.name}` | {m.meaning} | {m.unit} |" for m in VOCABULARY.values()]
    return "\n".join(rows)


# -- the 2025 online zoo (issue 15) ------------------------------------------------------------
REWARD_GROUPS_KEPT = _metric(
    "reward/groups_kept",
    "share of the step's sampled groups whose rewards were not all equal, kept for the update (DAPO)",
    "fraction",
)


# -- learned rewards and the RLHF pipeline (issue 12) ------------------------------------------
REWARD_PROXY = _metric(
    "reward/proxy",
    "mean optimised (proxy) reward, e.g. a learned r_φ, of the evaluation samples of `reward/gold` "
    "(runs whose reward is not the gold; `rlhf bench` cells of a learned-reward task)",
    "proxy reward",
)
OBJECTIVE_KL_BEST_OF_N = _metric(
    "objective/kl_best_of_n", "KL of best-of-n sampling to the base model, log n − (n−1)/n, docs/maths.md §23", "nats"
)

# -- rollouts from a generator without exact log-probs (issue 13) -------------------------------
ROLLOUT_LOGPROB_DIFF = _metric(
    "rollout/logprob_diff",
    "mean absolute difference of log π_sampler and log π_θold over the rollout's completion tokens, for a generator that cannot "
    "guarantee the training forward's log-probs (e.g. `hf_generate`); the update then corrects with "
    "truncated importance sampling",
    "nats per token",
)

# -- peak memory against the analytic estimate (issue 13) --------------------------------------
MEMORY_PEAK_MB = _metric(
    "memory/peak_mb",
    "peak tensor memory of the first two training steps: CUDA max allocated, or on CPU the live tensors at "
    "the start plus the allocator's peak inside (`rlhf_env.algorithms.run.memory`); in the second step's record",
    "MiB",
)
MEMORY_ESTIMATE_MB = _metric(
    "memory/estimate_mb",
    "analytic peak of one training step: weights, gradients, Adam moments, reference, reward model and the "
    "larger of the update's and the rollout's activations, docs/maths.md §24",
    "MiB",
)


# -- multi-turn episodes (issue 23) ------------------------------------------------------------
EPISODE_TURNS = _metric(
    "episode/turns",
    "mean policy turns per episode of the evaluation samples of `reward/gold` (multi-turn tasks)",
    "turns",
)
TOOL_CALL_RATE = _metric(
    "tool/call_rate", "share of the evaluation episodes that called a tool at least once (tool tasks)", "fraction"
)
TOOL_CALL_ACCURACY = _metric(
    "tool/call_accuracy",
    "share of the evaluation episodes' tool calls that asked the right question (the calculator: the prompt's product)",
    "fraction",
)
# what a task's ``transcript_metrics`` returns, by key -> the name it is recorded under
TRANSCRIPT_METRICS = {"call_rate": TOOL_CALL_RATE, "call_accuracy": TOOL_CALL_ACCURACY}
