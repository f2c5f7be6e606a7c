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

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlmodel import Session, col, select

from kernel.errors import BadInputError
from kernel.store import User, UserRole, utcnow

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
    """The user whose email and password match, or None.

    Records the login time and upgrades a hash made with outdated parameters. An
    unknown email costs one argon2 verification too, so timing does not reveal which
    emails have accounts.
    """
    user = find_user(session, email)
    if user is None:
        verify_password(_dummy_hash(), password)
        return None
    if not verify_password(user.password_hash, password):
        return None
    if password_hasher().check_needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    user.last_login_at = utcnow()
    session.add(user)
    return user


def token_digest(token: str) -> str:
    """The stored form of an API token: hex SHA-256."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def issue_api_token(session: Session, user: User) -> str:
    """Give ``user`` a new API token (replacing any earlier one) and return it; it is not stored in clear."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    user.api_token_hash = token_digest(token)
    session.add(user)
    return token


def user_for_token(session: Session, token: str) -> User | None:
    """The user an API token belongs to, or None for an unknown or empty token."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    return session.exec(select(User).where(User.api_token_hash == token_digest(token))).first()


def list_users(session: Session) -> list[User]:
    """Every user, by email."""
    return list(session.exec(select(User).order_by(col(User.email))))
