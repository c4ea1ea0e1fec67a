"""The debug API: a gRPC service on a local unix socket (`server`), and its client
(`client`) that the `nri-qos status|pods|explain|...` commands and the lab use.

It replaces the JSON status socket nri-qos had before: the same views
(`nri_plugin.views`), typed, with a decision stream that can be followed and a runtime
dry-run switch. The messages are in `proto/debug.proto`.
"""

from __future__ import annotations

DEFAULT_SOCKET = "/run/nri-qos/debug.sock"

__all__ = ["DEFAULT_SOCKET"]
