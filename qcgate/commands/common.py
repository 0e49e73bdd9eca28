"""What every sub-command shares: argument types and the settings flags.

The command modules sit at the top of the package (they wire the layers below into the CLI); they
import this module and the layers below, never each other or ``qcgate.cli``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from qcgate.config import Settings, load_settings


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1, with a message that names the bad value."""
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """--config and --data-dir/--db-url, shared by every command that opens the database."""
    parser.add_argument("--config", type=Path, help="TOML settings file (see deploy/qcgate.example.toml)")
    parser.add_argument("--data-dir", type=Path, help="spool, quarantine and the embedded database live here")
    parser.add_argument("--db-url", help="SQLAlchemy URL of the audit database (default: SQLite in the data dir)")


def settings_from_args(args: argparse.Namespace, **sections: dict[str, Any]) -> Settings:
    """Settings from --config, with command-line flags (``sections``) overriding the file."""
    data_dir = args.data_dir.resolve() if getattr(args, "data_dir", None) else None
    return load_settings(args.config, {
        "storage": {"data_dir": data_dir},
        "database": {"url": getattr(args, "db_url", None)},
        **sections,
    })
