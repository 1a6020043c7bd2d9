"""The ``rlhf`` entry point: a parser whose subcommands are plugins.

Every subcommand, the built-in ones included, arrives through the ``rlhf_register_commands``
hook as a ``Command``: ``list``, ``rollout`` and ``base-model`` from the env layer, ``train``
from the algorithms layer, ``bench`` from the benchmarks layer. This module sits at the
bottom (it imports nothing of the layers above), so a third-party package adds a command
exactly as the built-ins do.

``main`` is also the one place where exceptions become messages: a user's mistake, or a
failure the user can act on, is one line ``rlhf <command>: error: ...`` with exit code 1;
Ctrl-C prints the command's own resume hint (exit code 130); ``--debug`` lets the traceback
through instead.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rlhf_env.plugins.errors import UserError

__all__ = ["Command", "CommandWarning", "UserError", "build_parser", "main"]


class CommandWarning(UserWarning):
    """A warning the CLI prints as ``rlhf <command>: warning: ...`` (a repaired run folder, say)."""


@dataclass(frozen=True)
class Command:
    """What a plugin registers with ``register(name, Command(...))``.

    Attributes:
        help: one line for ``rlhf --help``.
        add_arguments: ``add_arguments(parser)`` adds the command's flags to its argparse parser.
        run: ``run(args) -> exit code``; raise a ``UserError`` (its message is shown) to fail; any other
            exception is reported as an internal error.
        interrupted: ``interrupted(args) -> str``, what Ctrl-C says (how to pick up again).
    """

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    interrupted: Callable[[argparse.Namespace], str] | None = None


def build_parser(host=None) -> argparse.ArgumentParser:
    """The ``rlhf`` parser with one subcommand per registered ``Command``."""
    from rlhf_env.plugins.manager import get_host

    host = host or get_host()
    parser = argparse.ArgumentParser(prog="rlhf", description="RLHF as a Gymnasium environment.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="on an error, show the traceback")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for entry in host.commands:
        command = entry.obj
        p = sub.add_parser(entry.name, parents=[common], help=command.help)
        command.add_arguments(p)
        p.set_defaults(_command=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (argparse exits with 2 on bad usage)."""
    args = build_parser().parse_args(argv)
    command: Command = args._command
    with warnings.catch_warnings():
        _show_command_warnings(args.command)
        try:
            return int(command.run(args))
        except KeyboardInterrupt:
            if args.debug:
                raise
            hint = command.interrupted(args) if command.interrupted else "interrupted"
            print(f"rlhf {args.command}: {hint}", file=sys.stderr)
            return 130
        except Exception as exc:
            if args.debug:
                raise
            print(f"rlhf {args.command}: error: {describe_error(exc)}", file=sys.stderr)
            return 1


def describe_error(exc: BaseException) -> str:
    """One line for an exception: the message of the library's own errors, else an internal error.

    An OS error on a named file (a missing or unwritable path the user gave) is the user's to fix
    too, and is told as ``PATH: reason``; a torch ``RuntimeError`` or a bare ``ValueError`` is not.
    """
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"  # not "[Errno 2] ..."
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, UserError) and text:
        return text
    return f"{type(exc).__name__}: {text} (an internal error; --debug shows the traceback)"


def _show_command_warnings(command: str) -> None:
    """Print ``CommandWarning``s as ``rlhf <command>: warning: ...`` lines, every time."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CommandWarning):
            print(f"rlhf {command}: warning: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.simplefilter("always", CommandWarning)
    warnings.showwarning = show


if __name__ == "__main__":
    sys.exit(main())
