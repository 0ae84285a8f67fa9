"""Range and name checks of a loaded config, so `trainer.max_steps=-5` or `optim.name=adamw8` stops
when the config loads, naming the key, instead of training "-5 steps" or failing deep inside.

A schema class lists its rules in a `RULES` class attribute: (glob over dotted keys, check); a
family's experiment config extends its parent's list. Every problem is reported at once.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Callable, Sequence

Check = Callable[[object], "str | None"]  # value -> what is wrong, or None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def at_least(low, integer: bool = False) -> Check:
    def check(value):
        if value is None:
            return None
        if integer and (not isinstance(value, int) or isinstance(value, bool)):
            return f"must be an integer >= {low}"
        if not _number(value) or value < low:
            return f"must be {'an integer ' if integer else ''}>= {low}"
        return None
    return check


def greater_than(low) -> Check:
    def check(value):
        if value is not None and (not _number(value) or value <= low):
            return f"must be > {low}"
        return None
    return check


def probability(upper_open: bool = True) -> Check:
    def check(value):
        if value is None:
            return None
        if not _number(value) or value < 0 or (value >= 1 if upper_open else value > 1):
            return f"must be in [0, 1{')' if upper_open else ']'}"
        return None
    return check


def one_of(*names: str) -> Check:
    def check(value):
        if value is not None and value not in names:
            return f"must be one of {', '.join(names)}"
        return None
    return check


def pair_in(low: float, high: float, ascending: bool = False, open_low: bool = False) -> Check:
    """Two numbers in [low, high) (betas) or (low, high] ascending (crop scales)."""
    def check(value):
        if value is None:
            return None
        if not isinstance(value, Sequence) or len(value) != 2 or not all(_number(v) for v in value):
            return "must be a list of two numbers"
        for v in value:
            if (v <= low if open_low else v < low) or (v > high if open_low else v >= high):
                return f"values must lie in {'(' if open_low else '['}{low}, {high}{']' if open_low else ')'}"
        if ascending and value[0] > value[1]:
            return "must be ascending"
        return None
    return check


def _leaves(obj, prefix: str = ""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, path + ".")
        else:
            yield path, value


def rules_of(cfg) -> list:
    """Rules of the config's class and every schema class above it (the parent's first)."""
    rules = []
    for cls in reversed(type(cfg).__mro__):
        rules += [r for r in cls.__dict__.get("RULES", ()) if r not in rules]
    return rules


def check_config(cfg) -> list[str]:
    """Every rule violation of `cfg`, one line each naming the key and its value."""
    problems = []
    rules = rules_of(cfg)
    for path, value in _leaves(cfg):
        for pattern, check in rules:
            if fnmatch.fnmatchcase(path, pattern):
                error = check(value)
                if error:
                    problems.append(f"{path}={value!r} {error}")
                    break
    return problems
