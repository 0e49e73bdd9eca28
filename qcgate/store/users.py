"""The console's people: users with a role, argon2id passwords, API tokens and login sessions.

Secrets are never stored: a password is kept as its argon2id hash (argon2-cffi's defaults); an API
token and a session id are 32 random bytes shown once (the token) or held only by the browser's
cookie (the session), and the database keeps their SHA-256. A disabled user can neither sign in nor
use a token, and their open sessions stop working at the next request.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from qcgate.errors import QcgateError
from qcgate.store.models import ApiToken, ConsoleSession, User, UserRole, utcnow

ROLES = tuple(role.value for role in UserRole)
# What each role may do, cumulative: viewer < reviewer < admin. A sender is below viewer: it reads
# nothing; it may only store instances (STOW-RS), as an admin may.
_RANK = {UserRole.SENDER.value: -1, UserRole.VIEWER.value: 0, UserRole.REVIEWER.value: 1, UserRole.ADMIN.value: 2}
STORE_ROLES = (UserRole.SENDER.value, UserRole.ADMIN.value)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD_LENGTH = 10
TOKEN_PREFIX = "qcg_"


@dataclass(frozen=True)
class Principal:
    """Who is asking: the user's id, name and role (and, for a console session, its CSRF token)."""

    user_id: int
    name: str
    role: str
    csrf_token: str | None = None
    via: str = "session"  # session | token

    def may(self, role: str) -> bool:
        """True when this user's role is ``role`` or above."""
        return _RANK[self.role] >= _RANK[role]

    def may_store(self) -> bool:
        """True when this user may store instances (STOW-RS): a sender or an admin."""
        return self.role in STORE_ROLES


def _hasher():  # type: ignore[no-untyped-def]
    from argon2 import PasswordHasher

    return PasswordHasher()


def sha256_hex(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise QcgateError(f"{name!r} is not a valid user name (letters, digits, . _ @ -; at most 64)")
    return name


def add_user(session: Session, name: str, role: str, password: str) -> User:
    """A new enabled user; the password is hashed with argon2id."""
    check_name(name)
    if role not in ROLES:
        raise QcgateError(f"{role!r} is not one of {', '.join(ROLES)}")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise QcgateError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    if session.scalar(select(User.id).where(User.name == name)) is not None:
        raise QcgateError(f"user {name!r} exists already")
    user = User(name=name, role=role, password_hash=_hasher().hash(password), disabled=False, created_at=utcnow())
    session.add(user)
    session.flush()
    return user


def list_users(session: Session) -> list[dict[str, object]]:
    rows = []
    for user in session.scalars(select(User).order_by(User.name)):
        tokens = session.scalars(select(ApiToken.id).where(ApiToken.user_id == user.id)).all()
        rows.append({"name": user.name, "role": user.role, "disabled": user.disabled,
                     "created_at": _iso(user.created_at), "last_login_at": _iso(user.last_login_at), "api_tokens": len(tokens)})
    return rows


def get_user(session: Session, name: str) -> User:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise QcgateError(f"no user {name!r}")
    return user


def disable_user(session: Session, name: str) -> User:
    """Disable ``name``: no sign-in, no token; their sessions and tokens are deleted."""
    user = get_user(session, name)
    user.disabled = True
    session.execute(delete(ConsoleSession).where(ConsoleSession.user_id == user.id))
    session.execute(delete(ApiToken).where(ApiToken.user_id == user.id))
    return user


def issue_token(session: Session, name: str) -> str:
    """A new bearer token for ``name``: returned once, stored as its SHA-256."""
    user = get_user(session, name)
    if user.disabled:
        raise QcgateError(f"user {name!r} is disabled")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(user_id=user.id, token_sha256=sha256_hex(token), created_at=utcnow()))
    return token


def verify_password(session: Session, name: str, password: str) -> User | None:
    """The enabled user ``name`` when ``password`` is theirs, else None (unknown names cost a hash
    too, so the answer's timing does not say which names exist)."""
    from argon2.exceptions import InvalidHashError, VerificationError

    hasher = _hasher()
    user = session.scalar(select(User).where(User.name == name)) if _NAME.match(name) else None
    if user is None:
        try:
            hasher.verify(_DUMMY_HASH or _dummy_hash(), password)
        except (VerificationError, InvalidHashError):
            pass
        return None
    try:
        hasher.verify(user.password_hash, password)
    except (VerificationError, InvalidHashError):
        return None
    if user.disabled:
        return None
    if hasher.check_needs_rehash(user.password_hash):
        user.password_hash = hasher.hash(password)
    return user


_DUMMY_HASH: str | None = None


def _dummy_hash() -> str:
    global _DUMMY_HASH
    _DUMMY_HASH = _hasher().hash(secrets.token_hex(16))
    return _DUMMY_HASH


def principal_for_token(session: Session, token: str) -> Principal | None:
    """The user of an API bearer token (enabled users only)."""
    row = session.execute(
        select(ApiToken, User).join(User, User.id == ApiToken.user_id).where(ApiToken.token_sha256 == sha256_hex(token))
    ).first()
    if row is None or row[1].disabled:
        return None
    api_token, user = row
    now = utcnow()
    last = api_token.last_used_at
    if last is None or _aware(last) < now - dt.timedelta(minutes=1):  # one write a minute, not one per call
        api_token.last_used_at = now
    return Principal(user.id, user.name, user.role, via="token")


def open_session(session: Session, user: User, hours: float) -> tuple[str, str]:
    """A new login session for ``user``: (the cookie's secret, the session's CSRF token)."""
    secret, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    now = utcnow()
    session.add(ConsoleSession(user_id=user.id, token_sha256=sha256_hex(secret), csrf_token=csrf, created_at=now,
                               expires_at=now + dt.timedelta(hours=hours)))
    user.last_login_at = now
    # Expired sessions are removed whenever someone signs in: the table stays small.
    session.execute(delete(ConsoleSession).where(ConsoleSession.expires_at < now))
    return secret, csrf


def principal_for_session(session: Session, secret: str) -> Principal | None:
    """The user of a session cookie, while the session has not expired and the user is enabled."""
    row = session.execute(
        select(ConsoleSession, User).join(User, User.id == ConsoleSession.user_id)
        .where(ConsoleSession.token_sha256 == sha256_hex(secret))
    ).first()
    if row is None:
        return None
    login, user = row
    if user.disabled or _aware(login.expires_at) <= utcnow():
        return None
    return Principal(user.id, user.name, user.role, csrf_token=login.csrf_token, via="session")


def close_session(session: Session, secret: str) -> None:
    session.execute(delete(ConsoleSession).where(ConsoleSession.token_sha256 == sha256_hex(secret)))


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)  # SQLite returns naive UTC


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else _aware(value).isoformat(timespec="seconds")
