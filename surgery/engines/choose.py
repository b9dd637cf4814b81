"""The engine a verb's `engine=` argument names."""

from __future__ import annotations

from surgery.engines.local import LocalEngine
from surgery.engines.ray_engine import RayEngine
from surgery.errors import SurgeryError


def as_engine(engine) -> LocalEngine | RayEngine:
    """`None`/`"local"`: this process; `"ray"`: a default `RayEngine`; else itself."""
    if engine is None or engine == "local":
        return LocalEngine()
    if engine == "ray":
        return RayEngine()
    if isinstance(engine, LocalEngine | RayEngine):
        return engine
    raise SurgeryError(
        f"engine must be 'local', 'ray' or a surgery.RayEngine, got {engine!r}"
    )
