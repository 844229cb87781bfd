"""Hardware profiles: one YAML file per device, simulated (specs with sources) or
measured (tables from ``exitbench profile``). Built-ins are ``hardware_profiles/*.yaml``;
plugins come from the ``exitbench.profiles`` entry-point group."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from suite.errors import ConfigError
from suite.registry import Registry

PROFILES_DIR = Path(__file__).resolve().parent.parent / "hardware_profiles"


@dataclass(frozen=True)
class HardwareProfile:
    """A parsed profile file; ``spec`` holds the kind-specific body."""

    name: str
    kind: Literal["simulated", "measured"]
    description: str
    spec: dict[str, Any] = field(default_factory=dict)
    path: str | None = None


def load_profile(path: Path) -> HardwareProfile:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("kind") not in ("simulated", "measured"):
        raise ConfigError(f"{path}: a hardware profile needs 'kind: simulated' or 'kind: measured'")
    body = {k: v for k, v in data.items() if k not in ("name", "kind", "description")}
    return HardwareProfile(name=data.get("name", path.stem), kind=data["kind"],
                           description=data.get("description", ""), spec=body, path=str(path))


def _discover_builtin_profiles(registry: Registry[HardwareProfile]) -> None:
    for path in sorted(PROFILES_DIR.glob("*.yaml")):
        registry.register(path.stem, loader=lambda p=path: load_profile(p), source="builtin")


PROFILES: Registry[HardwareProfile] = Registry("profile", "exitbench.profiles",
                                               _discover_builtin_profiles)


def get_profile(name: str) -> HardwareProfile:
    return PROFILES.get(name)
