"""Quoting input in messages people read: values come from pods and runtimes, and a
1 MiB annotation must not become a 1 MiB log line or decision event."""

from __future__ import annotations

# Kubernetes names are at most 253 characters; three of them with separators fit.
NAME_LIMIT = 3 * 253 + 2


def clip(text: str, limit: int = 200) -> str:
    """`text`, cut to `limit` characters with "…(+N chars)" saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…(+{len(text) - limit} chars)"
