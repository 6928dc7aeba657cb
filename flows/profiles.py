"""YAML profiles -> validated PipelineConfig, with key=value overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from kd_core.config import ConfigError, PipelineConfig, load_yaml_config

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


# A flow's `profile` parameter: a choice of the profiles in a deployment's run form (the schema's
# enum, which the Prefect server enforces for deployment runs), while a flow called in-process
# (`kd run --profile my.yaml`) still takes a YAML path: the enum is schema, not validation.
ProfileName = Annotated[str, Field(json_schema_extra={"enum": available_profiles()})]


def load_profile(profile: str, overrides: dict[str, Any] | None = None, force: list[str] | None = None) -> PipelineConfig:
    path = Path(profile)
    if not path.suffix:
        path = PROFILES_DIR / f"{profile}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown profile {profile!r}; choose one of {', '.join(available_profiles())} or pass a YAML path")
    merged = dict(overrides or {})
    merged.setdefault("profile", path.stem)
    if force:
        merged["force"] = list(force)
    return load_yaml_config(path, PipelineConfig, merged)
