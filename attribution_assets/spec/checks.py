"""The spec errors and the ``_check_*`` validators every section's ``__post_init__`` uses.

Each check reads ``getattr(obj, key)`` and raises :class:`SpecValueError` naming the key, the
allowed values and the fix; ``pipeline`` turns it into a :class:`PipelineSpecError` that also
names the YAML file and the section.
"""

from __future__ import annotations

from typing import Any


class PipelineSpecError(ValueError):
    """A pipeline spec is malformed; the message names the file, the key and the fix."""


class SpecValueError(ValueError):
    """One setting has a bad value; ``key`` is its name within its section."""

    def __init__(self, key: str, message: str):
        super().__init__(f"`{key}` {message}")
        self.key, self.message = key, message


def _describe(value: Any) -> str:
    kind = "a string" if isinstance(value, str) else type(value).__name__
    return f"{value!r} ({kind})"


def _unquote_hint(value: Any, integer: bool = False) -> str:
    """``"; write the number without quotes"`` for a string that, unquoted, would pass as the number
    the key needs (``"16"``; ``'1e-3'`` for a float key), else ``""``."""
    if not isinstance(value, str):
        return ""
    try:
        number = int(value) if integer else float(value)
    except ValueError:
        return ""
    return "; write the number without quotes" if number == number and abs(number) != float("inf") else ""


def _check_int(obj: Any, key: str, low: int | None = None, high: int | None = None,
               optional: bool = False, note: str = "") -> None:
    value = getattr(obj, key)
    if value is None and optional:
        return
    bounds = (f" >= {low}" if low is not None else "") + (f" and <= {high}" if high is not None else "")
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low) \
            or (high is not None and value > high):
        raise SpecValueError(key, f"must be an integer{bounds}{note}, got {_describe(value)}"
                                  f"{_unquote_hint(value, integer=True)}.")


def _check_float(obj: Any, key: str, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, note: str = "") -> float:
    """``obj.key`` as a float within ``[low, high]`` (``low_open`` / ``high_open``: that bound
    excluded; None: unbounded), else a :class:`SpecValueError` that states the interval."""
    value = getattr(obj, key)
    number = isinstance(value, int | float) and not isinstance(value, bool)
    too_low = number and low is not None and (value <= low if low_open else value < low)
    too_high = number and high is not None and (value >= high if high_open else value > high)
    if not number or too_low or too_high or value != value:
        bounds = " in " + ("(" if low_open else "[") + f"{low}, {high if high is not None else 'inf'}" \
            + (")" if high is None or high_open else "]") if low is not None else ""
        raise SpecValueError(key, f"must be a number{bounds}{note}, got {_describe(value)}{_unquote_hint(value)}.")
    return float(value)


def _check_choice(obj: Any, key: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, key)
    if not isinstance(value, str) or value not in choices:
        hint = " (YAML reads unquoted on/off/yes/no as booleans: quote the word)" \
            if isinstance(value, bool) else ""
        raise SpecValueError(key, f"is {_describe(value)}; choose one of {list(choices)}{hint}.")


def _check_bool(obj: Any, key: str, optional: bool = False) -> None:
    value = getattr(obj, key)
    if not (isinstance(value, bool) or (optional and value is None)):
        raise SpecValueError(key, f"must be true or false, got {_describe(value)}.")


def _check_str(obj: Any, key: str, optional: bool = True) -> None:
    value = getattr(obj, key)
    if not (isinstance(value, str) and value) and not (optional and value is None):
        raise SpecValueError(key, f"must be a non-empty string{' or null' if optional else ''}, "
                                  f"got {_describe(value)}.")


def _check_strings(obj: Any, key: str, allow_empty: bool = False) -> None:
    value = getattr(obj, key)
    if isinstance(value, list):
        object.__setattr__(obj, key, tuple(value))
        value = tuple(value)
    if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value) \
            or (not value and not allow_empty):
        raise SpecValueError(key, f"must be a {'' if allow_empty else 'non-empty '}list of strings, "
                                  f"got {_describe(value)}.")
