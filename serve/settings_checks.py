"""Checks for numbers in settings files, shared by every settings reader.

YAML hands over ``true``, ``"5"``, ``.inf`` and ``.nan`` as readily as ``5``;
each would pass a bare ``v >= minimum`` or fail far from the file that held it
(``True >= 1`` holds, ``.inf`` makes a timeout that never fires). Readers call
:func:`checked_number` and put their own prefix (file, site, key) before the
message it raises.
"""
from __future__ import annotations

import math
from typing import Any


def is_number(value: Any, minimum: float, *, integer: bool = False, above: bool = False,
              maximum: float | None = None) -> bool:
    """Whether ``value`` is a finite number, not a bool, ``>= minimum`` (``>`` with ``above``), ``<= maximum``.

    With ``integer``, a whole number (``5.0`` counts: YAML writes what it is given).
    """
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and (value > minimum if above else value >= minimum) and (maximum is None or value <= maximum)
            and (not integer or float(value).is_integer()))


def checked_number(value: Any, minimum: float, *, integer: bool = False, above: bool = False,
                   maximum: float | None = None) -> int | float:
    """``value`` as an int (``integer``) or float when :func:`is_number` holds.

    Otherwise raises ValueError reading "must be an integer >= 1, not '5'",
    for the caller to prefix with the setting's name.
    """
    if not is_number(value, minimum, integer=integer, above=above, maximum=maximum):
        bound = f"{'>' if above else '>='} {minimum:g}" + (f" and <= {maximum:g}" if maximum is not None else "")
        raise ValueError(f"must be {'an integer' if integer else 'a number'} {bound}, not {value!r:.80}")
    return int(value) if integer else float(value)
