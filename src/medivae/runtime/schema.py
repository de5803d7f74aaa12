"""Typed construction of the frozen config dataclasses: the one path by which a JSON object, a ``--config``
file, command-line flags or ``--model-arg`` values become a config.

Each value is checked against its field's annotation before the dataclass's own ``__post_init__`` checks
ranges, so a bad value ends as one line naming the field, the value and what is allowed, never as a
``TypeError`` from a comparison deep inside torch. Strict on purpose: ``true`` is not the number 1, ``"3"``
is not a number, ``12.5`` is not a whole number, and NaN or infinity (JSON's ``1e400``) is no setting at all.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any

from medivae.runtime.errors import UserError

_NAMES = {bool: "true or false", int: "a whole number", float: "a finite number", str: "text",
          type(None): "null (none)"}


def _describe(annotation) -> str:
    if annotation in _NAMES:
        return _NAMES[annotation]
    if typing.get_origin(annotation) is tuple:
        return "a list of " + {str: "text", int: "whole numbers", float: "numbers"}.get(
            (typing.get_args(annotation) or (Any,))[0], "values")
    if _is_union(annotation):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation))


def _is_union(annotation) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def convert(where: str, value, annotation):
    """``value`` as a field annotated ``annotation`` takes it (an int for a float field becomes a float, a
    list for a tuple field a tuple); a UserError naming ``where``, the value and what is allowed otherwise."""
    ok, out = _try(value, annotation)
    if not ok:
        raise UserError(f"{where} = {_show(value)} is not allowed; expected {_describe(annotation)}")
    return out


def _try(value, annotation) -> tuple[bool, Any]:
    if annotation is Any or isinstance(annotation, str | typing.TypeVar):  # unresolved or free: not checked
        return True, value
    if _is_union(annotation):
        for a in typing.get_args(annotation):
            ok, out = _try(value, a)
            if ok:
                return True, out
        return False, None
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        return (True, float(value)) if number and math.isfinite(value) else (False, None)
    if annotation is str:
        return isinstance(value, str), value
    if annotation is type(None):
        return value is None, None
    if typing.get_origin(annotation) is tuple:
        return _try_tuple(value, typing.get_args(annotation))
    if isinstance(annotation, type):
        return isinstance(value, annotation), value
    return True, value  # an annotation this checker does not know (Callable, Literal...): the class checks it


def _try_tuple(value, args: tuple) -> tuple[bool, Any]:
    if not isinstance(value, list | tuple):
        return False, None
    item = args[0] if args else Any
    out = []
    for v in value:
        ok, c = _try(v, item)
        if not ok:
            return False, None
        out.append(c)
    return True, tuple(out)


@functools.lru_cache(maxsize=None)
def field_types(klass) -> dict[str, Any]:
    """{field name: resolved annotation} of a dataclass (a name that cannot be resolved stays unchecked)."""
    try:
        hints = typing.get_type_hints(klass)
    except (NameError, TypeError):
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(klass)}


def check_fields(obj, where: str) -> None:
    """Check (and normalise in place) every field of a frozen dataclass instance: the first line of a config's
    ``__post_init__``, so a config built directly in Python is held to the same types as one read from JSON."""
    for name, annotation in field_types(type(obj)).items():
        value = getattr(obj, name)
        out = convert(f"{where}.{name}", value, annotation)
        if out is not value:
            object.__setattr__(obj, name, out)


def build(klass, values, where: str, unknown_message=None):
    """``klass(**values)`` after checking that ``values`` is an object, that every key is a field (else a
    UserError listing the valid ones, or ``unknown_message(unknown, valid)``) and that every value has its
    field's type. Ranges are the class's own ``__post_init__``'s to check."""
    if not isinstance(values, dict):
        raise UserError(f"{where}: expected an object of settings, not {_show(values)}")
    types_ = field_types(klass)
    unknown = sorted(str(k) for k in set(values) - set(types_))
    if unknown:
        valid = sorted(set(types_) - {"name"})
        if unknown_message is not None:
            raise UserError(unknown_message(unknown, valid))
        raise UserError(f"{where}: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    clean = {k: convert(f"{where}.{k}", v, types_[k]) for k, v in values.items()}
    try:
        return klass(**clean)
    except TypeError as e:
        raise UserError(f"{where}: {e}") from None


def _bounds(low, high, low_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"<= {high:g}")
    return " and ".join(parts)


def whole_number(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """``value`` if it is an int (not a bool) in [low, high]; else a UserError naming ``name`` and the range."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserError(f"{name} must be a whole number, not {_show(value)}".lstrip())
    if (low is not None and value < low) or (high is not None and value > high):
        raise UserError(f"{name} must be {_bounds(low, high, False)}, not {value}".lstrip())
    return value


def finite_number(name: str, value, low: float | None = None, high: float | None = None,
                  low_open: bool = False) -> float:
    """``value`` as a float if it is a finite number (not a bool) in [low, high] (``low_open``: above ``low``)."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, not {_show(value)}".lstrip())
    below = low is not None and (value <= low if low_open else value < low)
    if below or (high is not None and value > high):
        raise UserError(f"{name} must be {_bounds(low, high, low_open)}, not {value:g}".lstrip())
    return float(value)


def one_of(name: str, value, allowed: tuple[str, ...]):
    """``value`` if it is one of ``allowed``; else a UserError naming ``name`` and the choices."""
    if value not in allowed:
        raise UserError(f"{name} must be {' or '.join(allowed)}, not {_show(value)}".lstrip())
    return value
