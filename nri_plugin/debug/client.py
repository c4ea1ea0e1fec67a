"""A small typed client of the debug API, for the CLI and the lab.

Blocking (grpc's sync channel): the CLI is a short-lived command and the lab calls it
from a thread. Every failure is a `DebugError` whose message is one line saying what is
wrong and what to do, and whose `exit_code` follows the CLI's conventions (2: the daemon
is not there, access refused, or the question cannot be answered as asked).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from nri_plugin.debug import DEFAULT_SOCKET
from nri_plugin.debug.proto import debug_pb2 as pb
from nri_plugin.debug.proto import debug_pb2_grpc as pb_grpc

EXIT_ERROR = 1
EXIT_SETUP = 2


class DebugError(Exception):
    """A call that did not succeed; `str()` is the one line to show."""

    def __init__(self, message: str, code: Any = None, exit_code: int = EXIT_SETUP) -> None:
        super().__init__(message)
        self.code = code  # grpc.StatusCode, or None when the daemon was not reached
        self.exit_code = exit_code


def diagnose(path: Path) -> str:
    """Why nobody answers on `path`, as one line with what to do."""
    start = "start it (systemctl start nri-qos), or pass --socket PATH if it listens elsewhere"
    try:
        path.lstat()
    except FileNotFoundError:
        return f"nri-qos is not running: {path} does not exist; {start}"
    except PermissionError:
        return f"cannot see {path}: permission denied; run as root (sudo nri-qos ...)"
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2.0)
        probe.connect(str(path))
    except PermissionError:
        return (
            f"no permission to connect to {path}: run as root (sudo nri-qos ...), or as a "
            "member of the group the daemon was given"
        )
    except ConnectionRefusedError:
        return f"nri-qos is not running: nobody listens on {path} (a stale socket); {start}"
    except OSError as exc:
        if exc.errno == errno.ENOTSOCK:
            return f"{path} is not a socket; pass --socket PATH of the daemon's debug socket"
        return f"cannot reach nri-qos at {path}: {exc.strerror or exc}"
    finally:
        probe.close()
    return f"nri-qos at {path} accepted the connection but did not speak gRPC; is it nri-qos?"


class DebugClient:
    def __init__(self, path: Path | str = DEFAULT_SOCKET, timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._channel = grpc.insecure_channel(
            f"unix:{os.fspath(self.path)}", options=[("grpc.enable_retries", 0)]
        )
        self._stub = pb_grpc.DebugStub(self._channel)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> DebugClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- calls --------------------------------------------------------------------------------

    def status(self) -> pb.StatusReply:
        return self._call(self._stub.Status, pb.StatusRequest())  # type: ignore[no-any-return]

    def ready(self) -> pb.ReadyReply:
        return self._call(self._stub.Ready, pb.ReadyRequest())  # type: ignore[no-any-return]

    def containers(self, include_plan_json: bool = False) -> pb.ListContainersReply:
        request = pb.ListContainersRequest(include_plan_json=include_plan_json)
        return self._call(self._stub.ListContainers, request)  # type: ignore[no-any-return]

    def explain(self, query: str) -> pb.ExplainReply:
        return self._call(self._stub.Explain, pb.ExplainRequest(query=query))  # type: ignore[no-any-return]

    def signals(self) -> pb.SignalsReply:
        return self._call(self._stub.Signals, pb.SignalsRequest())  # type: ignore[no-any-return]

    def numa(self) -> pb.NumaReply:
        return self._call(self._stub.Numa, pb.NumaRequest())  # type: ignore[no-any-return]

    def config(self, toml: bool = False) -> pb.ConfigReply:
        fmt = pb.CONFIG_FORMAT_TOML if toml else pb.CONFIG_FORMAT_JSON
        return self._call(self._stub.Config, pb.ConfigRequest(format=fmt))  # type: ignore[no-any-return]

    def set_dry_run(self, on: bool) -> pb.SetDryRunReply:
        return self._call(self._stub.SetDryRun, pb.SetDryRunRequest(on=on))  # type: ignore[no-any-return]

    def events(self, follow: bool = False, since: float = 0.0) -> Iterator[pb.Event]:
        """The decision log; with `follow`, blocks for new events until interrupted."""
        request = pb.EventsRequest(follow=follow, since=since)
        stream = self._stub.Events(request, timeout=None if follow else self.timeout)
        try:
            yield from stream
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        finally:
            stream.cancel()

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def _error(self, exc: grpc.RpcError) -> DebugError:
        code = exc.code()  # type: ignore[attr-defined]
        details = " ".join(str(exc.details() or "").split())  # type: ignore[attr-defined]
        if code == grpc.StatusCode.UNAVAILABLE and "connect" in details.lower():
            return DebugError(diagnose(self.path), code)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DebugError(
                f"nri-qos did not answer within {self.timeout:.0f}s; it may be overloaded: "
                "try again",
                code,
                EXIT_ERROR,
            )
        if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            return DebugError(f"nri-qos failed to answer: {details}", code, EXIT_ERROR)
        return DebugError(details or str(code), code)


__all__ = ["DebugClient", "DebugError", "diagnose"]
