"""Logging setup: plain lines for a terminal, or one JSON object per line for log shippers.

Log lines carry UIDs, AE titles and addresses, never patient names.
"""

from __future__ import annotations

import json
import logging
import sys

from qcgate.config import LoggingSettings


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload)


def configure_logging(settings: LoggingSettings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.json_format:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    # pynetdicom logs every PDU at INFO; keep its warnings, drop its chatter.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
