"""The input-resampling settings a request names: TotalSegmentator's ``-ro`` and what the cast did.

Kept free of numpy so the CLI's parser, the API's request models and the job records can check them
without loading the inference core; :mod:`serve.inference.preprocess` applies them.
"""

from __future__ import annotations

import numbers

from serve.errors import MrisegError

#: TotalSegmentator 2.18's ``-ro/--resampling_order`` default.
DEFAULT_RESAMPLING_ORDER = 1
#: The spline orders ``scipy.ndimage.zoom`` (and TotalSegmentator's ``-ro``) accept.
RESAMPLING_ORDERS = range(0, 6)
#: ``input_cast`` values: the resampled intensities were truncated to int32 (TotalSegmentator's cast), or not.
CAST_NONE, CAST_INT32 = "none", "int32"


def check_resampling_order(order: object) -> int:
    """``order`` as a spline order TotalSegmentator's ``-ro`` accepts.

    Args:
        order: a whole number 0..5 (a bool, a float or a string is refused, not converted).

    Returns:
        The order as an int.

    Raises:
        MrisegError: anything else (400), saying what to give.
    """
    if isinstance(order, bool) or not isinstance(order, numbers.Integral) or int(order) not in RESAMPLING_ORDERS:
        raise MrisegError(f"resampling_order must be a whole number from 0 to 5 (the spline order of the input's "
                          f"resampling, TotalSegmentator's -ro; default {DEFAULT_RESAMPLING_ORDER}), not {order!r}")
    return int(order)
