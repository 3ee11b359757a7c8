"""Users of the job service: which user a bearer token belongs to, how often an address may fail
to authenticate, and the audit trail. Standard library only.

A tokens file (``meddiffusion serve --tokens FILE``) holds one user per line::

    # name   role   token hash
    alice    user   sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
    root     admin  sha256:...

``meddiffusion serve add-user NAME [--admin] --tokens FILE`` makes a random token, prints it once and
appends its line. The file is re-read when it changes (its size or modification time), so users
are added or removed without a restart. Tokens are random 256-bit strings, so a plain SHA-256 is
enough to keep the file from being a list of passwords (no slow KDF is needed for high-entropy
secrets); the server never stores or logs a token itself.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

log = logging.getLogger("meddiffusion.server")
audit_log = logging.getLogger("meddiffusion.audit")

ROLES = ("user", "admin")
NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
WEAK_TOKEN_CHARS = 16
SINGLE_USER = "owner"  # the one user of --token-file / $MEDDIFFUSION_TOKEN


@dataclass(frozen=True)
class User:
    name: str
    admin: bool = False


def hash_token(token: str) -> str:
    """``sha256:<hex>`` of the token with surrounding whitespace removed."""
    return "sha256:" + hashlib.sha256(token.strip().encode()).hexdigest()


def parse_tokens(text: str, source: str = "tokens file") -> dict[str, User]:
    """``{token hash: user}`` from the text of a tokens file; a bad line raises :class:`UserError`."""
    users: dict[str, User] = {}
    names: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3 or not NAME_RE.match(parts[0]) or parts[1] not in ROLES or not HASH_RE.match(parts[2]):
            raise UserError(f"{source}, line {number}: expected 'NAME ROLE sha256:HEX' with ROLE user or admin")
        if parts[0] in names:
            raise UserError(f"{source}, line {number}: user {parts[0]!r} is listed twice")
        if parts[2] in users:
            raise UserError(f"{source}, line {number}: two users share one token")
        names.add(parts[0])
        users[parts[2]] = User(parts[0], parts[1] == "admin")
    if not users:
        raise UserError(f"{source}: no users (add one with `meddiffusion serve add-user NAME --tokens FILE`)")
    return users


def add_user(path: str | Path, name: str, admin: bool = False) -> str:
    """Append a user with a new random token to the tokens file (created 0600); return the token."""
    path = Path(path)
    if not NAME_RE.match(name):
        raise UserError(f"user names are 1-64 letters, digits or _ . @ -, got {name!r}")
    text = path.read_text() if path.exists() else ""
    existing = {ln.split()[0] for ln in text.splitlines() if ln.split("#", 1)[0].strip()}
    if name in existing:
        raise UserError(f"{path}: user {name!r} exists already (remove the line to replace the token)")
    from .client import new_token

    token = new_token()
    line = f"{name} {'admin' if admin else 'user'} {hash_token(token)}\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as fh:
        if text and not text.endswith("\n"):
            fh.write("\n")
        fh.write(line)
    return token


class Users:
    """Token -> :class:`User`, from a tokens file (re-read when it changes) or one token (the one
    user, an admin). The given token is hashed and compared with every entry in constant time."""

    def __init__(self, tokens_file: str | Path | None = None, token: str | None = None):
        if (tokens_file is None) == (token is None):
            raise UserError("the job service needs either a tokens file or one token")
        self.path = Path(tokens_file) if tokens_file is not None else None
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._checked = 0.0
        # a single token shorter than WEAK_TOKEN_CHARS (a tokens file holds hashes only: its tokens
        # come from add_user, 256 random bits each)
        self.weak = token is not None and len(token.strip()) < WEAK_TOKEN_CHARS
        if token is not None:
            token = token.strip()
            if not token:
                raise UserError("the job service needs a non-empty token")
            self._table = {hash_token(token): User(SINGLE_USER, admin=True)}
        else:
            self._table = parse_tokens(self._read(), str(self.path))

    def _read(self) -> str:
        try:
            st = os.stat(self.path)
            self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            return self.path.read_text()
        except OSError as exc:
            raise UserError(f"{self.path}: cannot read the tokens file ({exc.strerror})") from exc

    def _reload_if_changed(self) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        if now - self._checked < 1.0:
            return
        self._checked = now
        try:
            st = os.stat(self.path)
        except OSError:
            return  # keep the last good table while the file is being replaced
        if (st.st_mtime_ns, st.st_size, st.st_ino) == self._stamp:
            return
        try:
            table = parse_tokens(self._read(), str(self.path))
        except UserError as exc:
            log.error("tokens file not reloaded, the previous users stay: %s", exc)
            return
        self._table = table
        log.info("tokens file reloaded: %d user(s)", len(table))

    def authenticate(self, given: str) -> User | None:
        with self._lock:
            self._reload_if_changed()
            table = self._table
        digest = hash_token(given)
        found = None
        for key, user in table.items():  # every entry compared: no early exit on a match
            if hmac.compare_digest(key, digest):
                found = user
        return found


class FailureLimiter:
    """Failed authentications per client address: the ``limit``-th failure within ``window_s``
    locks the address out (every request, right token or not) until its oldest failure ages out.
    At most ``max_addresses`` are tracked (the oldest are forgotten first)."""

    def __init__(self, limit: int = 10, window_s: float = 60.0, max_addresses: int = 10000):
        self.limit, self.window_s, self.max_addresses = limit, window_s, max_addresses
        self._fails: dict[str, deque] = {}
        self._lock = threading.Lock()

    def _prune(self, addr: str, now: float) -> deque | None:
        q = self._fails.get(addr)
        while q and now - q[0] > self.window_s:
            q.popleft()
        if q is not None and not q:
            del self._fails[addr]
            return None
        return q

    def retry_after(self, addr: str) -> float | None:
        """Seconds until ``addr`` may try again, ``None`` when it is not locked out."""
        now = time.monotonic()
        with self._lock:
            q = self._prune(addr, now)
            if q is None or len(q) < self.limit:
                return None
            return max(1.0, self.window_s - (now - q[0]))

    def failed(self, addr: str) -> None:
        now = time.monotonic()
        with self._lock:
            q = self._prune(addr, now)
            if q is None:
                if len(self._fails) >= self.max_addresses:
                    del self._fails[next(iter(self._fails))]
                q = self._fails[addr] = deque(maxlen=self.limit)
            q.append(now)


class AuditLog:
    """One line per submit, download, delete, cancel, unload and refusal: time, client address,
    user, action, job and HTTP status. Never a token, a file name or a file's contents. Written to
    the ``meddiffusion.audit`` logger and, with a work folder, to ``audit.log`` there (0600),
    rotated at ``max_bytes`` into ``audit.log.1`` .. ``audit.log.<keep>``."""

    def __init__(self, path: str | Path | None = None, max_bytes: int = 10 * 2 ** 20, keep: int = 5):
        self.path = Path(path) if path is not None else None
        self.max_bytes, self.keep = max_bytes, keep
        self._lock = threading.Lock()
        if self.path is not None:
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))

    def _rotate(self) -> None:
        for i in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def record(self, addr: str, user: str | None, action: str, job: str | None, status: int) -> None:
        # every field is ours or checked (user names match NAME_RE, job ids are hex): no forged lines
        line = (f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} addr={addr} user={user or '-'} action={action} "
                f"job={job or '-'} status={status}")
        audit_log.info(line)
        if self.path is not None:
            with self._lock:
                try:
                    if self.path.stat().st_size > self.max_bytes:
                        self._rotate()
                except FileNotFoundError:
                    pass
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                with os.fdopen(fd, "a") as fh:
                    fh.write(line + "\n")


__all__ = ["User", "Users", "hash_token", "parse_tokens", "add_user", "FailureLimiter", "AuditLog",
           "WEAK_TOKEN_CHARS", "SINGLE_USER"]
