"""The runtime's built-in default validator: the "required plugins" rule.

What an operator uses to make a plugin required (fail-closed), modelled on the upstream
code it follows, at containerd/nri 8ec8b28 (v0.10.0 and later):

* ``plugins/default-validator/default-validator.go`` (``validateRequiredPlugins``): the
  plugins that must have taken part in a container's creation are the configured
  ``required_plugins`` (every container on the node) plus those named by the pod
  annotation ``required-plugins.noderesource.dev``, whose value is a YAML list (so the
  JSON form ``["nri-qos"]`` works too). A configured toleration annotation whose value
  parses as true skips the check; one that does not parse rejects the container. A
  missing plugin rejects the creation: ``required plugin "nri-qos" not present``.
* ``pkg/plugin/annotations.go`` (``GetEffectiveAnnotation``): the annotation is looked
  up as ``<key>/container.<container name>``, then ``<key>/pod``, then ``<key>``; the
  first one present wins (a container-scoped one overrides the pod's).
* ``pkg/api/validate.go`` (``GetPluginMap``): a plugin matches by its registered name
  ("nri-qos") or by "<index>-<name>" ("50-nri-qos").
* ``pkg/adaptation/adaptation.go`` (``CreateContainer``): the plugins listed in the
  validation request are every plugin the runtime has (registered and synchronized) at
  the time, whether or not it subscribes to CreateContainer; one that times out during
  the request is still listed (containerd/nri#316).

The runtimes' configuration: containerd >= 2.2.0 (NRI v0.10.0),
``[plugins.'io.containerd.nri.v1.nri'.default_validator] enable = true``
(``internal/nri/config.go``); CRI-O >= 1.34.0,
``[crio.nri.default_validator] nri_enable_default_validator = true``
(``internal/config/nri/nri.go``). containerd 1.7 has no validation at all.
Only the required-plugins rule is modelled: the other rules (hooks, seccomp, namespaces,
sysctls) reject adjustments nri-qos never makes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import yaml

REQUIRED_PLUGINS_ANNOTATION = "required-plugins.noderesource.dev"
VALIDATOR_NAME = "builtin:00-default-validator"

_TRUE = {"1", "t", "T", "TRUE", "true", "True"}  # Go's strconv.ParseBool
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


@dataclass(frozen=True, slots=True)
class DefaultValidatorConfig:
    """The runtime's ``default_validator`` settings this model knows."""

    enable: bool = False
    required_plugins: tuple[str, ...] = ()
    tolerate_missing_plugins_annotation: str = ""


def effective_annotation(annotations: Mapping[str, str], key: str, container: str) -> str | None:
    """The value of `key` for `container`: container-scoped, then pod-scoped forms."""
    for candidate in (f"{key}/container.{container}", f"{key}/pod", key):
        if candidate in annotations:
            return annotations[candidate]
    return None


def plugin_names(plugins: Iterable[tuple[str, str]]) -> frozenset[str]:
    """Every form a (name, index) plugin is matched by: "name" and "index-name"."""
    out: set[str] = set()
    for name, index in plugins:
        out.add(name)
        out.add(f"{index}-{name}")
    return frozenset(out)


def required_plugins_rejection(
    config: DefaultValidatorConfig,
    pod_annotations: Mapping[str, str],
    container: str,
    plugins: Iterable[tuple[str, str]],
) -> str | None:
    """Why the container must not be created (None: it may be)."""
    if not config.enable:
        return None
    required = list(config.required_plugins)
    tolerate_key = config.tolerate_missing_plugins_annotation
    if tolerate_key:
        value = effective_annotation(pod_annotations, tolerate_key, container)
        if value is not None:
            if value in _TRUE:
                return None
            if value not in _FALSE:
                return f"invalid {tolerate_key} annotation {value!r}: not a boolean"
    value = effective_annotation(pod_annotations, REQUIRED_PLUGINS_ANNOTATION, container)
    if value is not None:
        try:
            annotated = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            return f"invalid {REQUIRED_PLUGINS_ANNOTATION} annotation {value!r}: {exc}"
        if annotated is None:
            annotated = []
        if not isinstance(annotated, list):
            return f"invalid {REQUIRED_PLUGINS_ANNOTATION} annotation {value!r}: not a list"
        required += [str(item) for item in annotated]
    present = plugin_names(plugins)
    missing = [name for name in required if name not in present]
    if not missing:
        return None
    if len(missing) == 1:
        return f'validation error: required plugin "{missing[0]}" not present'
    names = ",".join(missing)
    return f'validation error: required plugins "{names}" not present'
