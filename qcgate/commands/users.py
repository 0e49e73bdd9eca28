"""Sub-commands: `users add|list|disable|token`, the people of the web console and the API."""

from __future__ import annotations

import argparse
import contextlib
import getpass
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from qcgate.commands.common import add_settings_arguments, settings_from_args
from qcgate.errors import QcgateError

if TYPE_CHECKING:  # imported in the handlers, so that `qcgate --help` does not load SQLAlchemy
    from sqlalchemy.orm import Session

ROLES = ("viewer", "reviewer", "admin", "sender")


@contextlib.contextmanager
def _session(args: argparse.Namespace) -> Iterator[Session]:
    """A session on the (migrated) database, committed when the block succeeds."""
    from qcgate.store import database

    settings = settings_from_args(args)
    engine = database.create_db_engine(settings.database_url)
    try:
        database.upgrade_database(engine)
        with database.make_session_factory(engine)() as session, session.begin():
            yield session
    finally:
        engine.dispose()


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            raise QcgateError("the two passwords differ")
    else:
        raise QcgateError("give the password on standard input with --password-stdin")
    if not password:
        raise QcgateError("empty password")
    return password


def _add(args: argparse.Namespace) -> int:
    from qcgate.store import users

    password = _read_password(args)
    with _session(args) as session:
        user = users.add_user(session, args.name, args.role, password)
        print(f"user {user.name} added with the role {user.role}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from qcgate.store import users

    with _session(args) as session:
        rows = users.list_users(session)
    columns = ["name", "role", "disabled", "api_tokens", "created_at", "last_login_at"]
    cells = [["" if row[c] is None else str(row[c]) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]
    for line in [columns, *cells]:
        print("  ".join(value.ljust(widths[i]) for i, value in enumerate(line)).rstrip())
    if not rows:
        print("(no users: add one with `qcgate users add NAME --role admin --password-stdin`)")
    return 0


def _disable(args: argparse.Namespace) -> int:
    from qcgate.store import users

    with _session(args) as session:
        users.disable_user(session, args.name)
    print(f"user {args.name} disabled: their sessions and API tokens no longer work")
    return 0


def _token(args: argparse.Namespace) -> int:
    from qcgate.store import users

    with _session(args) as session:
        token = users.issue_token(session, args.name)
    print(token)
    print(f"a new API token for {args.name}: shown this once, stored hashed; send it as 'Authorization: Bearer …'",
          file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    users = subparsers.add_parser("users", help="people of the web console and the API: add, list, disable, token")
    commands = users.add_subparsers(dest="users_command", metavar="ACTION", required=True)
    add = commands.add_parser("add", help="add a user with a role and a password")
    add_settings_arguments(add)
    add.add_argument("name")
    add.add_argument("--role", choices=ROLES, required=True, help="viewer: reads; reviewer: also decides reviews; "
                     "admin: also re-sends deliveries and re-queues jobs; sender: a machine that only stores "
                     "instances (STOW-RS), no console")
    add.add_argument("--password-stdin", action="store_true", help="read the password from the first line of standard input")
    add.set_defaults(handler=_add)
    listing = commands.add_parser("list", help="list users, their roles and whether they are disabled")
    add_settings_arguments(listing)
    listing.set_defaults(handler=_list)
    disable = commands.add_parser("disable", help="disable a user: no sign-in, sessions and tokens revoked")
    add_settings_arguments(disable)
    disable.add_argument("name")
    disable.set_defaults(handler=_disable)
    token = commands.add_parser("token", help="print a new API bearer token for a user (shown once, stored hashed)")
    add_settings_arguments(token)
    token.add_argument("name")
    token.set_defaults(handler=_token)
