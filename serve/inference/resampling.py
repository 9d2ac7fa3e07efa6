"""The input-resampling settings a request names: TotalSegmentator's ``-ro`` and what the cast did.

Kept free of numpy so the CLI's parser, the API's request models and the job records can check them
without loading the inference core; :mod:`serve.inference.preprocess` applies them.
"""

from __future__ import annotations

import argparse
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


def resampling_order_arg(value: str) -> int:
    """``-ro``'s argparse type: a whole number 0..5, as TotalSegmentator's ``resampling_order``."""
    try:
        order = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid resampling order {value!r}: give a whole number from 0 to 5")
    if not 0 <= order <= 5:
        raise argparse.ArgumentTypeError(f"resampling order {order} is outside 0 to 5")
    return order


def add_resampling_order_arg(p: argparse.ArgumentParser) -> None:
    """``-ro/--resampling_order/--resampling-order`` (segment and bulk)."""
    p.add_argument("-ro", "--resampling_order", "--resampling-order", dest="resampling_order",
                   type=resampling_order_arg, default=DEFAULT_RESAMPLING_ORDER, metavar="0-5",
                   help="spline order of the input's resampling to the model spacing, TotalSegmentator's -ro "
                        f"(default {DEFAULT_RESAMPLING_ORDER}, as TotalSegmentator 2.18); integer-valued inputs are "
                        "then cast to int32 as there, others keep float intensities (docs/inference.md)")
