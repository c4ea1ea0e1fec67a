"""How nri-qos reaches the Kubernetes API server: one place for the client settings the
evictor, the reporter and the pod-spec watch share.

Every configuration made here has no retries: each caller owns its retry policy (an
eviction is a POST that is not idempotent; a publication is retried one interval later
with newer values; a watch lists again). A setup that cannot work raises
`ClusterUnavailable` with one line saying why and what to configure instead; callers
re-raise it as their own kind. The `kubernetes` package is imported on first use (it
takes about a second).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MAX_MESSAGE = 300  # an API server's message goes into one log line


class ClusterUnavailable(Exception):
    """No API client can be configured here; the message says why and what to set."""


def one_line(text: str) -> str:
    """`text` (often the API server's or the client's words) as one bounded line."""
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"


def no_retries() -> Any:
    """A fresh client configuration that never retries behind the caller's back."""
    from kubernetes import client

    configuration = client.Configuration()
    configuration.retries = 0
    return configuration


def in_cluster(instead: str) -> Any:
    """From the pod's service account (a DaemonSet's; the token file is re-read as the
    kubelet rotates it). `instead`: what to configure when not in a pod."""
    host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "")
    token = SERVICE_ACCOUNT / "token"
    if not host or not port:
        raise ClusterUnavailable(
            f"not running in a cluster: KUBERNETES_SERVICE_HOST/PORT are not set; {instead}"
        )
    if not token.is_file():
        raise ClusterUnavailable(f"not running in a cluster: {token} does not exist; {instead}")
    from kubernetes import config

    configuration = no_retries()
    try:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except config.ConfigException as exc:
        raise ClusterUnavailable(
            f"not running in a cluster: {one_line(str(exc))}; {instead}"
        ) from None
    return configuration


def from_kubeconfig(path: str | Path, key: str) -> Any:
    """From a kubeconfig file (its current context), for an agent run outside a pod;
    `key` is the setting to fix when it cannot be used."""
    from kubernetes import config

    if not Path(path).is_file():
        raise ClusterUnavailable(f"kubeconfig {path} does not exist: fix {key}")
    configuration = no_retries()
    try:
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(path), client_configuration=configuration, persist_config=False
        )
    except (config.ConfigException, OSError, ValueError) as exc:
        raise ClusterUnavailable(
            f"kubeconfig {path} cannot be used: {one_line(str(exc))}"
        ) from None
    return configuration


def for_url(url: str, token: str | None, verify_ssl: bool = False) -> Any:
    """An API server at `url` with a bearer token (a test server, a proxy)."""
    configuration = no_retries()
    configuration.host = url.rstrip("/")
    configuration.verify_ssl = verify_ssl
    if token:
        configuration.api_key = {"authorization": token}
        configuration.api_key_prefix = {"authorization": "Bearer"}
    return configuration


def cause(exc: BaseException) -> str:
    """The innermost reason of a connection failure (urllib3 wraps it twice), one line."""
    reason = getattr(exc, "reason", None)
    if isinstance(reason, BaseException):
        return cause(reason)
    return one_line(str(exc) or type(exc).__name__)
