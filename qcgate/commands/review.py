"""Sub-commands: `review accept|reject CASE --reason TEXT --user NAME`, the console's decision from a shell."""

from __future__ import annotations

import argparse

from qcgate.commands.common import add_settings_arguments, settings_from_args


def _decide(args: argparse.Namespace) -> int:
    from qcgate.store import database
    from qcgate.store.review import decide_review

    settings = settings_from_args(args)
    engine = database.create_db_engine(settings.database_url, must_exist=True)
    try:
        database.upgrade_database(engine)
        with database.make_session_factory(engine)() as session, session.begin():
            outcome = decide_review(session, args.case_id, args.decision, args.user, args.reason)
    finally:
        engine.dispose()
    moved = outcome.held_released or outcome.held_discarded
    print(f"case {outcome.case_id}: {outcome.decision}ed by {outcome.user} at {outcome.decided_at}"
          + (f"; {moved} held output(s) {'released' if outcome.decision == 'accept' else 'discarded'}" if moved else ""))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    review = subparsers.add_parser("review", help="decide a case in review: accept or reject it, with a reason")
    commands = review.add_subparsers(dest="review_command", metavar="DECISION", required=True)
    for decision, text in (("accept", "accept the case's result"), ("reject", "reject the case's result")):
        parser = commands.add_parser(decision, help=text)
        add_settings_arguments(parser)
        parser.add_argument("case_id", type=int, metavar="CASE")
        parser.add_argument("--reason", required=True, help="why (mandatory; kept in the audit)")
        parser.add_argument("--user", required=True, help="the reviewer (a user with the role reviewer or admin)")
        parser.set_defaults(handler=_decide, decision=decision)
