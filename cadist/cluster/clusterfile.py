"""The Ray cluster file (`ray_cluster.yaml`, Ray's cluster-launcher format) validated offline: Ray's
schema and defaults, then cadist's own expectations (token auth on every node, the dashboard on
loopback); `cadist cluster check`."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import yaml

from cadist.errors import ConfigError


# -- the cluster file ---------------------------------------------------------------------------
def check_cluster_file(path: str | Path) -> dict:
    """Validate a Ray cluster-launcher YAML offline (Ray's schema and defaults) and cadist's own
    expectations. Returns a summary with `warnings`; raises `ConfigError` naming the key."""
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exn:
        raise ConfigError(f"{path}: cannot read the cluster file ({exn.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; a cluster file is YAML in UTF-8") from None
    except yaml.YAMLError as exn:
        raise ConfigError(f"{path}: not valid YAML ({exn})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping (Ray cluster-launcher format)")
    schema_file = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_file.read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(raw), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        where = ".".join(str(p) for p in e.path) or "(top level)"
        raise ConfigError(
            f"{path}: {where}: {e.message.splitlines()[0]}"
            f"{f' ({len(errors)} problems in all)' if len(errors) > 1 else ''}; see Ray's "
            f"cluster-launcher configuration reference"
        )
    try:
        full = prepare_config(copy.deepcopy(raw))
        validate_config(full)
    except Exception as exn:  # Ray's own checks raise ValueError/ValidationError/…
        raise ConfigError(f"{path}: {type(exn).__name__}: {str(exn).splitlines()[0]}") from None
    auth = _auth_problems(full)
    if auth:
        raise ConfigError(
            f"{path}: Ray token auth is not on: {'; '.join(auth)}; without it anyone who reaches "
            f"a node's ports runs code on the cluster (ShadowRay, CVE-2023-48022). Start Ray with "
            f"RAY_AUTH_MODE=token on every node and mount the token made by `ray get-auth-token "
            f"--generate` (file_mounts: /home/ubuntu/.ray/auth_token: ~/.ray/auth_token), as "
            f"ray_cluster.yaml does"
        )
    warnings = []
    head_cmds = " ".join(full.get("head_start_ray_commands", []))
    if "--head" in head_cmds and "--dashboard-host=127.0.0.1" not in head_cmds:
        warnings.append(
            "head_start_ray_commands: the dashboard (and the job API, which runs code) is not "
            "bound to 127.0.0.1; add --dashboard-host=127.0.0.1 and use `ray dashboard` to reach it"
        )
    types = full.get("available_node_types", {})
    return {
        "cluster_name": full.get("cluster_name"),
        "provider": full["provider"].get("type"),
        "head_node_type": full.get("head_node_type"),
        "node_types": {
            name: {
                "resources": t.get("resources", {}),
                "min_workers": t.get("min_workers", 0),
                "max_workers": t.get("max_workers", 0),
            }
            for name, t in types.items()
        },
        "max_workers": full.get("max_workers"),
        "warnings": warnings,
    }


def _auth_problems(full: dict) -> list[str]:
    """Where a (defaults-filled) cluster file leaves Ray's token auth off."""
    problems = []
    commands = []
    for key in ("head_setup_commands", "worker_setup_commands", "setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):  # fmt: skip
        commands += [(f"{key}.{i}", c) for i, c in enumerate(full.get(key) or [])]
    for where, cmd in commands:
        if re.search(r"RAY_AUTH_MODE=[\"']?disabled", cmd):
            problems.append(f"{where} sets RAY_AUTH_MODE=disabled")
        elif re.search(r"\bray start\b", cmd) and not re.search(r"\bRAY_AUTH_MODE=token\b", cmd):
            problems.append(f"{where} runs `ray start` without RAY_AUTH_MODE=token")
    mounted = any(
        str(t).rstrip("/").endswith(".ray/auth_token") for t in full.get("file_mounts", {})
    )
    if not mounted and not any("RAY_AUTH_TOKEN" in c for _, c in commands):
        problems.append("no token reaches the nodes (no file_mounts entry for ~/.ray/auth_token, "
                        "no RAY_AUTH_TOKEN from a secret store in the commands)")  # fmt: skip
    return problems
