"""Offline validation of a Ray cluster launcher config (cluster.yaml): no cloud calls, no credentials.

    .venv/bin/python -c "from orchestration.scale.cluster_config import validate_cluster_yaml as v; v('cluster.yaml')"

Two layers. Ray's own: `prepare_config` (merges the provider's defaults.yaml, fills per-type worker
limits) then `validate_config` (the JSON schema plus a few cross-checks). Both live in
`ray.autoscaler._private.util`, a private API, so this module is the one place that imports it. The
schema lets much through (the provider block takes any key; a node type's max_workers may be negative;
defaults silently fill a missing head_node_type or setup_commands), so our own checks run first, on the
file as written, and name the key that is wrong.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

_INSTALL = re.compile(r"pip install\b.*\s-e\s+[\"']?(?P<path>[^\s\"'\[]+)\[orchestration\]")
_TORCH_PIN = re.compile(r"pip install\b.*\btorch==\d")


def validate_cluster_yaml(path: str | Path) -> dict[str, Any]:
    """Validate `path` offline and return the config as Ray would use it (defaults merged).

    Raises:
        ValueError: naming every key that is wrong, our checks first, then Ray's schema.
    """
    path = Path(path)
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a YAML mapping at the top level, got {type(config).__name__}")
    errors = check_cluster(config)
    if errors:
        raise ValueError(f"{path}: " + "; ".join(errors))
    return _ray_validate(config, path)


def _ray_validate(config: dict[str, Any], path: Path) -> dict[str, Any]:
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config  # private: pinned here only

    try:
        prepared = prepare_config(config)
        validate_config(prepared)
    except jsonschema.ValidationError as err:
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        raise ValueError(f"{path}: Ray's schema rejects {where}: {err.message}") from None
    except (ValueError, AssertionError, KeyError, RuntimeError) as err:
        raise ValueError(f"{path}: Ray rejects the config: {err}") from None
    return prepared


def check_cluster(config: dict[str, Any]) -> list[str]:
    """Our checks of the keys Ray's schema lets through; a list of messages, empty when all is well."""
    return [*_check_provider(config), *_check_node_types(config), *_check_setup(config),
            *_check_start(config)]


def _check_provider(config: dict[str, Any]) -> list[str]:
    provider = config.get("provider")
    if not isinstance(provider, dict):
        return ["provider is missing"]
    return [f"provider.{key} is missing" for key in ("type", "region") if not provider.get(key)]


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_type(name: str, spec: Any, is_head: bool | None, global_max: Any) -> list[str]:
    """One entry of available_node_types; is_head None when the head type is unknown (no worker checks)."""
    key = f"available_node_types.{name}"
    if not isinstance(spec, dict):
        return [f"{key} must be a mapping"]
    errors = [f"{key}.{field} is missing" for field in ("resources", "min_workers", "max_workers", "node_config")
              if field not in spec]
    low, high = spec.get("min_workers", 0), spec.get("max_workers", 0)
    for field, value in (("min_workers", low), ("max_workers", high)):
        if not _int(value) or value < 0:
            errors.append(f"{key}.{field} must be an integer >= 0, got {value!r}")
    if _int(low) and _int(high) and 0 <= high < low:
        errors.append(f"{key}.min_workers ({low}) exceeds {key}.max_workers ({high})")
    if is_head is False and _int(high) and _int(global_max) and high > global_max:
        errors.append(f"{key}.max_workers ({high}) exceeds the cluster's max_workers ({global_max})")
    if "node_config" in spec and not spec["node_config"]:
        errors.append(f"{key}.node_config is empty")
    resources = spec.get("resources")
    if "resources" in spec and not isinstance(resources, dict):
        errors.append(f"{key}.resources must be a mapping")
    elif is_head is False and isinstance(resources, dict) and not (resources.get("GPU") or 0) > 0:
        errors.append(f"{key}.resources.GPU must be > 0 for a worker type (got {resources.get('GPU')!r})")
    return errors


def _check_node_types(config: dict[str, Any]) -> list[str]:
    types, head = config.get("available_node_types"), config.get("head_node_type")
    global_max = config.get("max_workers")
    if not isinstance(types, dict) or not types:
        return ["available_node_types is missing or empty"]
    errors = []
    if not (_int(global_max) and global_max >= 0):
        errors.append(f"max_workers must be an integer >= 0, got {global_max!r}")
    if head is None:
        errors.append("head_node_type is missing")
    elif head not in types:
        errors.append(f"head_node_type {head!r} is not one of available_node_types {sorted(types)}")
    if len(types) < 2:
        errors.append("available_node_types has no worker type besides the head")
    for name, spec in types.items():
        errors += _check_type(name, spec, (name == head) if head in types else None, global_max)
    minimum = sum(s.get("min_workers", 0) for s in types.values()
                  if isinstance(s, dict) and _int(s.get("min_workers", 0)))
    if _int(global_max) and minimum > global_max:
        errors.append(f"max_workers ({global_max}) is below the sum of min_workers ({minimum})")
    return errors


def _check_setup(config: dict[str, Any]) -> list[str]:
    """setup_commands must pin torch and install the mounted repository with its orchestration extras."""
    commands = config.get("setup_commands")
    if not isinstance(commands, list) or not commands:
        return ["setup_commands is missing or empty (Ray's defaults would install a nightly Ray, not the project)"]
    errors = []
    if not any(_TORCH_PIN.search(c) for c in map(str, commands)):
        errors.append("setup_commands do not install a pinned torch (pip install torch==...)")
    installs = [m.group("path") for m in map(_INSTALL.search, map(str, commands)) if m]
    mounts = {_norm(remote) for remote in (config.get("file_mounts") or {})}
    if not installs:
        errors.append("setup_commands do not install the project (pip install -e <repo>[orchestration])")
    elif not any(_norm(p) in mounts for p in installs):
        errors.append(f"setup_commands install {installs} but file_mounts mounts {sorted(mounts)}: "
                      "the repository is not where it is installed from")
    return errors


def _norm(path: str) -> str:
    return path.replace("$HOME", "~").rstrip("/")


def _check_start(config: dict[str, Any]) -> list[str]:
    errors = []
    for key, needle in (("head_start_ray_commands", "ray start --head"),
                        ("worker_start_ray_commands", "ray start --address")):
        if not any(needle in str(c) for c in config.get(key) or []):
            errors.append(f"{key} has no `{needle}`")
    return errors
