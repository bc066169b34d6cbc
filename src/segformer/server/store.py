"""Short-lived results fetched by URL (``output=url``): kept in memory, never on disk, each for
``ttl`` seconds, and within ``max_bytes`` in all (the oldest go first when it fills up)."""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

# 16 random bytes, URL-safe base64: what every token (results, video jobs) looks like
TOKEN = re.compile(r"[A-Za-z0-9_-]{22}")


def new_token() -> str:
    return secrets.token_urlsafe(16)


@dataclass(frozen=True)
class StoredFile:
    data: bytes
    media_type: str


@dataclass
class _Entry:
    files: dict[str, StoredFile]
    expires: float

    @property
    def size(self) -> int:
        return sum(len(f.data) for f in self.files.values())


class ResultStore:
    """Named files grouped under a random token, expiring together."""

    def __init__(self, max_bytes: int, ttl: float) -> None:
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, files: dict[str, StoredFile]) -> tuple[str, float] | None:
        """Keep ``files``; returns (token, expiry as a Unix time), or None when they alone are
        larger than the whole store."""
        entry = _Entry(files, time.time() + self.ttl)
        if entry.size > self.max_bytes:
            return None
        token = new_token()
        with self._lock:
            self._sweep_locked(time.time())
            while self._entries and self._bytes + entry.size > self.max_bytes:
                _, oldest = self._entries.popitem(last=False)
                self._bytes -= oldest.size
            self._entries[token] = entry
            self._bytes += entry.size
        return token, entry.expires

    def get(self, token: str, name: str) -> StoredFile | None:
        if not TOKEN.fullmatch(token):
            return None
        with self._lock:
            entry = self._entries.get(token)
            if entry is None:
                return None
            if entry.expires <= time.time():
                self._drop_locked(token)
                return None
            return entry.files.get(name)

    def sweep(self, now: float | None = None) -> int:
        """Forget expired results; returns how many."""
        with self._lock:
            return self._sweep_locked(time.time() if now is None else now)

    def _sweep_locked(self, now: float) -> int:
        expired = [token for token, entry in self._entries.items() if entry.expires <= now]
        for token in expired:
            self._drop_locked(token)
        return len(expired)

    def _drop_locked(self, token: str) -> None:
        entry = self._entries.pop(token)
        self._bytes -= entry.size

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
