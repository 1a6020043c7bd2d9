"""Every ``rlhf <command> --flag`` the README and docs/*.md show names a real command and flag.

The commands and their flags come from the real ``rlhf`` parser, built as ``rlhf_env.plugins.cli``
builds it (one subparser per registered ``Command``, the built-ins only: an installed third-party
plugin neither adds to nor hides what the docs may name). The docs are read in fenced code blocks
and in inline code, as ``rlhf <command> ...`` and ``python -m rlhf_env <command> ...`` (torchrun).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]

# ``rlhf`` (not ``rlhf_env``, not a path ending in rlhf) or ``-m rlhf_env``, then the command
# and its arguments up to the end of the shell command (a separator, a comment, a redirection).
_INVOCATION = re.compile(r"(?:(?<![\w./-])rlhf|-m\s+rlhf_env)[ \t]+([^\n&|;#>`]*)")
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", flags=re.S | re.M)
_INLINE = re.compile(r"`([^`\n]+(?:\n[^`\n]+)?)`")  # inline code may wrap onto a second line


def _parser_options() -> tuple[set[str], dict[str, set[str]]]:
    """(the top-level flags, {command: its flags}) of the real ``rlhf`` parser."""
    from rlhf_env.plugins import PluginHost
    from rlhf_env.plugins.cli import build_parser

    parser = build_parser(PluginHost(autoload=False).load())
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = {name: set(p._option_string_actions) for name, p in sub.choices.items()}
    return set(parser._option_string_actions), commands


def _code_spans(text: str) -> list[str]:
    """The fenced blocks (each line its own span) and the inline code outside them."""
    lines = [line for block in _FENCE.findall(text) for line in block.splitlines()]
    spans = [re.sub(r"(^|\s)#.*", "", line) for line in lines]  # a shell comment is prose
    prose = _FENCE.sub("", text)
    spans += [span.replace("\n", " ") for span in _INLINE.findall(prose)]
    return spans


def invocations(text: str) -> list[tuple[str, list[str]]]:
    """(command, [flags]) for every ``rlhf`` invocation in the code of a markdown text."""
    found = []
    for span in _code_spans(text):
        for match in _INVOCATION.finditer(span):
            words = match.group(1).split()
            if not words:
                continue
            if words[0].startswith("-"):  # ``rlhf --help``: the top-level parser's flags
                command, rest = "", words
            elif re.fullmatch(r"[a-z][a-z0-9-]*", words[0]):
                command, rest = words[0], words[1:]
            else:  # ``rlhf <command>: error: ...``, a message format, not an invocation
                continue
            flags = [w.split("=", 1)[0] for w in rest if re.match(r"--?[A-Za-z]", w)]
            found.append((command, flags))
    return found


def test_the_extractor_reads_blocks_inline_code_and_torchrun():
    text = (
        "```bash\nrlhf train --algo grpo --set beta=0.5 --out x  # rlhf bench --nope\n"
        "torchrun --nproc-per-node 2 -m rlhf_env train --resume\n```\n"
        "Prose `rlhf bench --suite quick` and `rlhf train --out runs/x\n--resume`, "
        "`rlhf train: error: ...`, `rlhf_env.plugins`, `pip install -e . && rlhf bench`.\n"
    )
    assert invocations(text) == [
        ("train", ["--algo", "--set", "--out"]),
        ("train", ["--resume"]),
        ("bench", ["--suite"]),
        ("train", ["--out", "--resume"]),
        ("bench", []),
    ]


def test_every_documented_flag_exists():
    top, commands = _parser_options()
    assert {"list", "rollout", "base-model", "train", "bench"} <= set(commands)
    problems, seen = [], 0
    for path in DOC_FILES:
        for command, flags in invocations(path.read_text()):
            seen += 1
            where = path.relative_to(ROOT)
            if command and command not in commands:
                problems.append(f"{where}: `rlhf {command}`: no such command (commands: {', '.join(sorted(commands))})")
                continue
            known = commands[command] if command else top
            problems += [f"{where}: `rlhf {command}`: no flag {flag}" for flag in flags if flag not in known]
    assert seen >= 20, f"only {seen} rlhf invocations found in the docs: is the extractor reading them?"
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


# Flags of other programs that the docs name in inline code on their own.
_OTHER_PROGRAMS = {"--nproc-per-node", "--standalone", "--no-deps"}  # torchrun, pip


def test_every_flag_named_on_its_own_exists_somewhere():
    """An inline ``--flag`` outside an ``rlhf`` invocation is some command's, or a benchmark script's."""
    top, commands = _parser_options()
    scripts = {
        f
        for p in (ROOT / "benchmarks").glob("*.py")
        for f in re.findall(r"[\"'](--[a-z][a-z0-9-]*)[\"']", p.read_text())
    }
    known = top.union(*commands.values(), scripts, _OTHER_PROGRAMS)
    problems = []
    for path in DOC_FILES:
        for span in _INLINE.findall(_FENCE.sub("", path.read_text())):
            if _INVOCATION.search(span):
                continue  # test_every_documented_flag_exists reads it against its command
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", span):
                if flag not in known:
                    problems.append(f"{path.relative_to(ROOT)}: `{span}`: {flag} is no rlhf command's flag")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
