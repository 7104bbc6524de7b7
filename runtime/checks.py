"""Value checks shared by every reader of user-written config (model.json, ONNX metadata, --set, diffusers configs):
the type tests and how a found value is shown in the one-line error."""

from __future__ import annotations

import json
import math
import numbers
from typing import Any


def found(value: Any) -> str:
    """A value as the user wrote it (JSON where it is JSON: ``"16"`` for a string, ``16`` for a number)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def is_int(v: Any) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_number(v: Any, finite: bool = True) -> bool:
    """A real number (int or float, Python or NumPy), not a bool; finite unless ``finite=False``."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and (not finite or math.isfinite(v))


# kind -> (test, what the value must be), for every reader of a config file or option. Each test gets the value and
# returns True when it is valid.
KINDS: dict[str, tuple[Any, str]] = {
    "posint": (lambda v: is_int(v) and v >= 1, "a positive integer"),
    "nonneg_int": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "int": (is_int, "an integer"),
    "unit_float": (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "pos_float": (lambda v: is_number(v) and v > 0, "a number > 0"),
    "nonneg_float": (lambda v: is_number(v) and v >= 0, "a number >= 0"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "posint_list": (lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(is_int(x) and x >= 1 for x in v),
                    "a non-empty list of positive integers"),
    "posint_list0": (lambda v: isinstance(v, (list, tuple)) and all(is_int(x) and x >= 1 for x in v),
                     "a list of positive integers"),
}


def check_field(name: str, value: Any, kind: str, kinds: dict[str, tuple[Any, str]] = KINDS) -> Any:
    """``value`` if it is of ``kind`` (lists become tuples), else ConfigError '<name> must be …, found …'."""
    from .errors import ConfigError

    test, what = kinds[kind]
    if not test(value):
        raise ConfigError(f"{name} must be {what}, found {found(value)}")
    return tuple(value) if isinstance(value, list) else value

