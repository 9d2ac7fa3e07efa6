"""Structured audit records: one JSON line per job event on the ``mriseg.audit`` logger.

Fields are identifiers and outcomes only (job id or key digest, site, source,
status, error status, seconds); never object keys, file names or voxel data,
which can carry patient identifiers. Route the logger to its own sink with
standard logging configuration.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

log = logging.getLogger("mriseg.audit")


def audit(event: str, **fields: Any) -> dict[str, Any]:
    """Log one audit record (``event`` such as ``job.accepted``) and return it."""
    record = {"ts": round(time.time(), 3), "event": event, **{k: v for k, v in fields.items() if v is not None}}
    log.info(json.dumps(record, sort_keys=True, default=str))
    return record
