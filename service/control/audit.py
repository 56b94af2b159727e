"""The audit log: one JSON line per admin action, to the state dir (if any) and to the log."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from models.checkpoint import utc_now

log = logging.getLogger("headswap.audit")


class AuditLog:
    def __init__(self, path: Path | None) -> None:
        self.path = path

    def record(self, **fields: Any) -> None:
        """Append ``{"time", **fields}``; callers pass token ids, never tokens."""
        line = json.dumps({"time": utc_now(), **{k: v for k, v in fields.items() if v is not None}}, sort_keys=True)
        log.info("audit %s", line)
        if self.path is not None:
            with open(self.path, "a") as fh:
                fh.write(line + "\n")
