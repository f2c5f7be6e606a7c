"""Accounts of the archive web app: password hashing, users, API tokens.

Passwords are hashed with argon2id (argon2-cffi's defaults, the RFC 9106 low-memory
profile); a hash made with older parameters is replaced on the next successful login.
API tokens are random, shown once, and only their SHA-256 is stored: a token has
256 bits of entropy, so a fast hash is enough and lets a request be authenticated
with one indexed lookup.
"""

from __future__ import annotations

import functools
import hashlib
import re
import secrets
from datetime import datetime

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import update
from sqlmodel import Session, col, select

from kernel.errors import BadInputError
from kernel.store import Analysis, Meeting, TokenScope, User, UserRole, utcnow

#: Shortest password `users add` accepts.
MIN_PASSWORD_LENGTH = 10
#: Prefix of every API token, so a leaked one is recognisable in logs and secret scanners.
TOKEN_PREFIX = "clk_"

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class AccountError(BadInputError):
    """A user cannot be created or changed as asked (bad email, short password, duplicate)."""


@functools.cache
def password_hasher() -> PasswordHasher:
    """The argon2id hasher shared by the process (its parameters decide when to rehash)."""
    return PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    # Verified against when the email is unknown, so a login takes as long for a missing user as for a wrong password.
    return password_hasher().hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    """An argon2id hash of ``password`` (salted; the encoded string carries its parameters)."""
    return password_hasher().hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    """Whether ``password`` matches ``password_hash``; a malformed hash never matches."""
    try:
        return password_hasher().verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def normalize_email(email: str) -> str:
    """An email as stored: trimmed, lower-case; raises :class:`AccountError` when it is not an address."""
    cleaned = email.strip().lower()
    if not _EMAIL.match(cleaned):
        raise AccountError(f"not an email address: {email!r}")
    return cleaned


#: Words at the root of the passwords that attackers try first (the most common entries of
#: leaked-password lists, and this product's own name). A password that is one of them, or
#: one of them followed by digits and punctuation ("password12", "Welcome2024!"), is refused.
COMMON_PASSWORD_ROOTS: frozenset[str] = frozenset({
    "password", "passw0rd", "p@ssword", "p@ssw0rd", "qwerty", "qwertyuiop", "qwertz", "azerty", "asdfgh",
    "asdfghjkl", "zxcvbnm", "abc", "abcdef", "abcdefg", "abcdefgh", "abcdefghij", "iloveyou", "letmein",
    "welcome", "admin", "administrator", "root", "login", "master", "monkey", "dragon", "football", "baseball",
    "soccer", "sunshine", "princess", "shadow", "superman", "batman", "trustno", "starwars", "pokemon",
    "whatever", "freedom", "secret", "changeme", "default", "guest", "test", "tester", "testing", "hello",
    "helloworld", "charlie", "michael", "jennifer", "jordan", "hunter", "ranger", "matrix", "computer",
    "internet", "access", "summer", "winter", "spring", "autumn", "teacher", "student", "school", "classroom",
    "classlens", "zoom", "meeting", "lovely", "flower", "cookie", "chocolate", "killer", "mustang", "ninja",
})
"""Lower-case roots of the most common passwords."""

PASSWORD_RULE = (
    f"at least {MIN_PASSWORD_LENGTH} characters, not blank, not one character repeated, not a run "
    "like 1234567890, and not a common password such as 'password12'"
)
"""The password rule in words, shown before a password is asked for."""

_RUNS = ("01234567890", "09876543210", "abcdefghijklmnopqrstuvwxyz", "qwertyuiopasdfghjklzxcvbnm")


def check_password_strength(password: str) -> None:
    """Refuse passwords that attackers guess first (NIST SP 800-63B's blocklist advice).

    Too short (:data:`MIN_PASSWORD_LENGTH`), blank or whitespace only, one character
    repeated, a run of a keyboard or counting sequence, or a common password
    (:data:`COMMON_PASSWORD_ROOTS`, also with digits and punctuation after it). The message
    says which rule failed; the password itself is never echoed.
    """
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    if not password.strip():
        raise AccountError("the password must not be blank")
    if len(set(password)) == 1:
        raise AccountError("the password must not be one character repeated")
    folded = password.lower()
    if any(folded in run for run in _RUNS):
        raise AccountError("the password must not be a run of keys or digits (like 1234567890)")
    root = re.sub(r"[\d\W_]+$", "", folded)
    if root in COMMON_PASSWORD_ROOTS or re.sub(r"[\W_]+", "", folded) in COMMON_PASSWORD_ROOTS:
        raise AccountError("the password is too common (attackers try it first); choose another")


def find_user(session: Session, email: str) -> User | None:
    """The user with this email (any case), or None."""
    return session.exec(select(User).where(User.email == email.strip().lower())).first()


def owner_id_for(session: Session, email: str) -> int | None:
    """The id of the user who owns command-line runs (``--owner``); None for no owner.

    An email that names no user is bad input: a run filed under nobody by mistake would be
    invisible to the teacher who started it.
    """
    if not email.strip():
        return None
    user = find_user(session, email)
    if user is None or user.id is None:
        raise BadInputError(f"--owner: no ClassLens user {email.strip()!r}; add one with "
                            f"`classlens users add {email.strip()}`, or leave --owner out")
    return user.id


def create_user(
    session: Session, email: str, password: str, *, role: UserRole = UserRole.teacher, display_name: str = ""
) -> User:
    """Add a user with a hashed password; the caller's transaction commits it."""
    address = normalize_email(email)
    check_password_strength(password)
    if find_user(session, address) is not None:
        raise AccountError(f"a user with the email {address} already exists")
    user = User(email=address, display_name=display_name.strip(), password_hash=hash_password(password), role=role)
    session.add(user)
    session.flush()
    return user


def authenticate(session: Session, email: str, password: str) -> User | None:
    """The enabled user whose email and password match, or None.

    Records the login time and upgrades a hash made with outdated parameters. An
    unknown email costs one argon2 verification too, so timing does not reveal which
    emails have accounts; a disabled user's password is verified as well, and the answer
    is the same None as for a wrong one.
    """
    user = find_user(session, email)
    if user is None:
        verify_password(_dummy_hash(), password)
        return None
    if not verify_password(user.password_hash, password) or user.disabled:
        return None
    if password_hasher().check_needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    user.last_login_at = utcnow()
    session.add(user)
    return user


def end_browser_sessions(user: User) -> None:
    """End every browser session of ``user`` (their cookies carry an older epoch from now on)."""
    user.session_epoch += 1


def set_password(session: Session, user: User, password: str) -> None:
    """Give ``user`` a new password (checked for strength) and end all their browser sessions."""
    check_password_strength(password)
    user.password_hash = hash_password(password)
    end_browser_sessions(user)
    session.add(user)


def set_disabled(session: Session, user: User, disabled: bool) -> None:
    """Disable (no sign-in, token refused, sessions ended) or re-enable ``user``."""
    user.disabled = disabled
    if disabled:
        end_browser_sessions(user)
    session.add(user)


def remove_user(session: Session, user: User) -> int:
    """Delete ``user``; returns how many sessions they owned, which stay in the archive without an owner.

    Their sessions and meetings are kept (an admin still sees them); the audit log keeps
    the user's id and email on every event they caused.
    """
    owned = len(session.exec(select(Analysis.id).where(Analysis.owner_id == user.id)).all())
    session.execute(update(Analysis).where(col(Analysis.owner_id) == user.id).values(owner_id=None))
    session.execute(update(Meeting).where(col(Meeting.owner_id) == user.id).values(owner_id=None))
    session.delete(user)
    session.flush()
    return owned


def token_digest(token: str) -> str:
    """The stored form of an API token: hex SHA-256."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def issue_api_token(session: Session, user: User, *, scope: TokenScope = TokenScope.full,
                    expires_at: datetime | None = None) -> str:
    """Give ``user`` a new API token (replacing any earlier one) and return it; it is not stored in clear.

    ``scope`` limits what the token may do (:class:`~kernel.store.TokenScope`);
    ``expires_at`` (timezone-aware) ends it, None keeps it until replaced or revoked.
    """
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    user.api_token_hash = token_digest(token)
    user.api_token_scope = scope
    user.api_token_expires_at = expires_at
    session.add(user)
    return token


def revoke_api_token(session: Session, user: User) -> bool:
    """Remove ``user``'s API token; returns whether there was one."""
    had_token = user.api_token_hash is not None
    user.api_token_hash = None
    user.api_token_expires_at = None
    user.api_token_scope = TokenScope.full
    session.add(user)
    return had_token


def token_expired(user: User, now: datetime | None = None) -> bool:
    """Whether ``user``'s API token has passed its expiry."""
    expires = user.api_token_expires_at
    if expires is None:
        return False
    if expires.tzinfo is None:  # SQLite hands back naive datetimes; the store writes UTC
        expires = expires.replace(tzinfo=(now or utcnow()).tzinfo)
    return (now or utcnow()) >= expires


def user_for_token(session: Session, token: str, scope: TokenScope = TokenScope.full) -> User | None:
    """The enabled user an unexpired API token allowing ``scope`` belongs to, or None.

    A full-scope token allows everything; a WHIP token only :attr:`TokenScope.whip`.
    """
    if not token.startswith(TOKEN_PREFIX):
        return None
    user = session.exec(select(User).where(User.api_token_hash == token_digest(token))).first()
    if user is None or user.disabled or token_expired(user):
        return None
    if user.api_token_scope not in (TokenScope.full, scope):
        return None
    return user


def token_summary(user: User, now: datetime | None = None) -> str:
    """The user's API token in a few words: 'none', 'full', 'whip until 2026-12-31 12:00', 'expired'."""
    if user.api_token_hash is None:
        return "none"
    if token_expired(user, now):
        return "expired"
    until = f" until {user.api_token_expires_at:%Y-%m-%d %H:%M} UTC" if user.api_token_expires_at else ""
    return f"{user.api_token_scope.value}{until}"


def list_users(session: Session) -> list[User]:
    """Every user, by email."""
    return list(session.exec(select(User).order_by(col(User.email))))
