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
