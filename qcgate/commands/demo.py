"""Sub-command: `demo` — the whole gate on loopback on a SYNTHETIC case (``qcgate.demo``)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING if not args.verbose else logging.DEBUG)
    from qcgate.demo import run_demo

    return run_demo(args.out.resolve(), seed=args.seed, model=args.model, timeout=args.timeout)


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser("demo", help="run the whole gate on a SYNTHETIC case on loopback")
    demo.add_argument("--out", type=Path, default=Path("var/demo"), help="demo working directory (recreated)")
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--model", default="phantom-full", help="threshold model (default: the synthetic demo model)")
    demo.add_argument("--timeout", type=float, default=600.0)
    demo.set_defaults(handler=_demo)
