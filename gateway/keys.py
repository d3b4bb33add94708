"""API keys: stored only as SHA-256 hashes in a JSON file, each with its user, allowed models and rate limit.

A key reads ``pp-<key id>-<secret>``: the id finds the entry, the secret's hash is compared in constant time
(``hmac.compare_digest``), and an unknown id is compared against a dummy hash, so timing tells nothing. The
secret is 32 random bytes, so a plain SHA-256 is as strong as a slow password hash here. The file is written
whole and renamed into place; a running gateway reloads it when it changes, so ``pixelpipe keys revoke`` takes
effect within a second without a restart.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

KEY_PATTERN = re.compile(r"pp-(k[0-9a-f]{12})-([A-Za-z0-9_-]{43})")
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()


class KeyError_(ValueError):
    """A keys file or a key operation that cannot be done."""


@dataclass(frozen=True)
class ApiKey:
    """One key's entry: never the key itself, only its hash."""

    key_id: str
    key_hash: str
    user_id: str
    models: list[str] = field(default_factory=lambda: ["*"])
    requests_per_minute: int = 60
    burst: int = 10
    created_at: str = ""
    revoked_at: str | None = None
    name: str = ""

    def allows(self, model: str) -> bool:
        return "*" in self.models or model in self.models

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    """The keys file: created, listed and revoked by ``pixelpipe keys``, read by the gateway."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._keys: dict[str, ApiKey] = {}

    def keys(self) -> dict[str, ApiKey]:
        """Every key by id, reread when the file changed (checked on each call: one stat)."""
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                self._keys = self._read() if stamp else {}
                self._stamp = stamp
            return self._keys

    def _read(self) -> dict[str, ApiKey]:
        try:
            raw = json.loads(self.path.read_text())
            return {entry["key_id"]: ApiKey(**entry) for entry in raw["keys"]}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise KeyError_(f"keys file {self.path} cannot be read: {e}") from None

    def _write(self, keys: dict[str, ApiKey]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        body = json.dumps({"keys": [asdict(k) for k in keys.values()]}, indent=2) + "\n"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(body)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, self.path)

    def authenticate(self, presented: str) -> ApiKey | None:
        """The active key ``presented`` is, or None; the hashes are compared in constant time."""
        match = KEY_PATTERN.fullmatch(presented)
        key_id, secret = match.groups() if match else ("", presented)
        entry = self.keys().get(key_id)
        same = hmac.compare_digest(_hash(secret), entry.key_hash if entry else _DUMMY_HASH)
        return entry if same and entry is not None and entry.active else None

    def create(
        self,
        user_id: str,
        models: list[str] | None = None,
        requests_per_minute: int = 60,
        burst: int = 10,
        name: str = "",
    ) -> tuple[str, ApiKey]:
        """A new key: returns the key itself (shown once, never stored) and its entry."""
        if not user_id or len(user_id) > 64 or ":" in user_id:
            raise KeyError_(f"user id must be 1 to 64 characters without ':', got {user_id!r}")
        if requests_per_minute < 1 or burst < 1:
            raise KeyError_("requests per minute and burst must be at least 1")
        key_id, secret = f"k{secrets.token_hex(6)}", secrets.token_urlsafe(32)
        entry = ApiKey(
            key_id=key_id,
            key_hash=_hash(secret),
            user_id=user_id,
            models=list(models or ["*"]),
            requests_per_minute=requests_per_minute,
            burst=burst,
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            name=name,
        )
        self._write(self.keys() | {key_id: entry})
        return f"pp-{key_id}-{secret}", entry

    def revoke(self, key_id: str) -> ApiKey:
        keys = dict(self.keys())
        if key_id not in keys:
            raise KeyError_(f"no key {key_id!r} in {self.path}")
        entry = keys[key_id]
        if entry.active:
            now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            keys[key_id] = entry = ApiKey(**(asdict(entry) | {"revoked_at": now}))
            self._write(keys)
        return entry


def describe(entry: ApiKey) -> dict[str, Any]:
    """What ``pixelpipe keys list`` shows of a key: everything but its hash."""
    return {k: v for k, v in asdict(entry).items() if k != "key_hash"}
