"""Blob keys, checked the same way by every blob store, so a key that works embedded works on S3 too.

A key is a relative, slash-separated path (``frames/<appliance>/<camera>/<sha256>.jpg``). Keys come
from appliances over the API, so anything that could climb out of the store's folder is refused.
"""

from __future__ import annotations

MAX_KEY = 1024  # S3's limit, in UTF-8 bytes


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe blob key; ``ValueError`` saying why not otherwise."""
    if not isinstance(key, str) or not key:
        raise ValueError("blob key: must be a non-empty string")
    if len(key.encode()) > MAX_KEY:
        raise ValueError(f"blob key {key[:40]!r}...: longer than {MAX_KEY} bytes")
    if key.startswith("/") or "\\" in key or "\x00" in key:
        raise ValueError(f"blob key {key!r}: must be relative, with '/' separators and no NUL")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"blob key {key!r}: empty, '.' or '..' path segments are not allowed")
    return key
