"""Typed values: ``--set key=value`` text, ``--task NAME:KEY=VALUE`` knobs and suite values -> the field's type.

One converter for every source (the env layer's task knobs and the algorithms layer's ``--set``). Text from the command line is parsed: ``true``/``false`` (also
``yes``/``no``, ``1``/``0``), numbers, ``none`` for an optional field, ``a,b`` or ``[a, b]`` for a
tuple or list. Values that already have a type (TOML, JSON, Python) are checked, never
reinterpreted: a string where a number or a list belongs is an error (not a list of letters), an
int where a float belongs is widened. Floats must be finite: a NaN or infinite learning rate,
coefficient or clip range only poisons the run.
"""

from __future__ import annotations

import collections.abc
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from typing import Any, Literal, Union

from rlhf_env.errors import SettingError

TRUE, FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}
NONE = {"none", "null"}


class ConfigError(SettingError):
    """An override with an unknown key or a value of the wrong type; the message names the key."""


def split_assignments(pairs: Sequence[str], flag: str = "--set") -> dict[str, str]:
    """``["lr=1e-4", "baseline=false"]`` -> ``{"lr": "1e-4", "baseline": "false"}`` (texts, not yet typed)."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{flag} expects KEY=VALUE, got {pair!r}")
        if key in out:
            raise ConfigError(f"{flag} {key} is given twice ({out[key]!r} and {value!r})")
        out[key] = value
    return out


def config_types(config_cls: type) -> dict[str, Any]:
    """``{field name: annotation}`` of a config dataclass (``Any`` where a hint cannot be resolved)."""
    try:
        hints = typing.get_type_hints(config_cls)
    except (NameError, TypeError):  # a plugin's forward reference we cannot resolve: leave its values unchecked
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in fields(config_cls) if f.init}


def signature_types(fn: Callable) -> dict[str, Any] | None:
    """``{parameter: annotation}`` of a factory's keyword parameters; None if it takes ``**kwargs``."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    try:
        hints = typing.get_type_hints(fn)
    except (NameError, TypeError):
        hints = {}
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: hints.get(p.name, Any) for p in params if p.kind in keyword}


def typed_values(
    types_: Mapping[str, Any],
    values: Mapping[str, Any],
    *,
    from_text: bool = False,
    where: str = "",
    what: str = "config keys",
) -> dict[str, Any]:
    """Each value converted to its key's type; unknown keys list the known ones.

    ``from_text``: the values are command-line text to parse; else they are typed values to check.
    ``where`` says where they come from in every message (a flag; a file and its table).
    """
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ConfigError(f"{where + ': ' if where else ''}unknown {what} {unknown}; known: {sorted(types_)}")
    return {k: convert(v, types_[k], f"{where} {k}".strip(), from_text) for k, v in values.items()}


def typed_overrides(config_cls: type, values: Mapping[str, Any], **kw: Any) -> dict[str, Any]:
    """``typed_values`` against a config dataclass's fields."""
    return typed_values(config_types(config_cls), values, **kw)


def convert(value: Any, tp: Any, key: str, from_text: bool = False) -> Any:
    """``value`` as type ``tp``; a ``ConfigError`` naming ``key`` and the expected type if it is not one."""

    def fail(expected: str):
        got = repr(value) if from_text else f"{type(value).__name__} {value!r}"
        return ConfigError(f"{key}: expected {expected}, got {got}")

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if value is None and len(members) < len(args):
            return None
        nullable = len(members) < len(args)
        if nullable and isinstance(value, str) and value.strip().lower() in NONE and (from_text or str not in members):
            return None
        for member in members:
            try:
                return convert(value, member, key, from_text)
            except ConfigError:
                pass
        raise fail(" or ".join([_describe(m) for m in members] + (["none"] if nullable else [])))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and value.strip().lower() in TRUE | FALSE:
            return value.strip().lower() in TRUE
        raise fail("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text and isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise fail("an integer")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif from_text and isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                pass
        if number is None:
            raise fail("a number")
        if not math.isfinite(number):
            raise fail("a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail("a string")
    if origin is Literal:
        for choice in args:
            if value == choice or (from_text and isinstance(value, str) and value.strip() == str(choice)):
                return choice
        raise fail("one of " + ", ".join(map(repr, args)))
    if origin in (tuple, list, collections.abc.Sequence):
        items = _split_list(value) if from_text and isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise fail(_describe(tp))
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise fail(_describe(tp))
            item_types = list(args)
        else:
            item_types = [args[0] if args else Any] * len(items)
        out = [convert(v, t, f"{key}[{i}]", from_text) for i, (v, t) in enumerate(zip(items, item_types))]
        return tuple(out) if origin is tuple else out
    return value  # Any, or a type we do not know how to check: the config's __post_init__ judges it


def _split_list(text: str) -> list[str]:
    """``"1,2"``, ``"[1, 2]"`` or ``"(1, 2)"`` -> ``["1", "2"]``; ``""`` or ``"[]"`` -> ``[]``."""
    text = text.strip()
    if text[:1] + text[-1:] in ("[]", "()"):
        text = text[1:-1]
    return [part.strip() for part in text.split(",")] if text.strip() else []


def _describe(tp: Any) -> str:
    """A type as the error messages say it: ``a number``, ``a tuple of 2 integers``, ..."""
    simple = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if tp in simple:
        return simple[tp]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (tuple, list, collections.abc.Sequence):
        name = "a tuple" if origin is tuple else "a list"
        if not args:
            return name
        if origin is tuple and args[-1] is not Ellipsis:
            return f"{name} of {len(args)} values ({', '.join(_describe(a) for a in args)})"
        return f"{name} of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    return getattr(tp, "__name__", str(tp))
