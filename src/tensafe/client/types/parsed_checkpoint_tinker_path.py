"""``ParsedCheckpointTinkerPath``: the parts of ``tinker://<run>/<kind>/<name>``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

__all__ = ["CheckpointType", "ParsedCheckpointTinkerPath"]

#: The checkpoint type of each path kind.
CheckpointType = Literal["training", "sampler", "external"]

_TYPES: dict[str, CheckpointType] = {
    "weights": "training",
    "sampler_weights": "sampler",
    "external_weights": "external",
}
_PREFIX = "tinker://"


class ParsedCheckpointTinkerPath(BaseModel):
    """A parsed checkpoint path; ``checkpoint_id`` is ``<kind>/<name>`` (e.g. ``weights/final``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tinker_path: str
    training_run_id: str
    checkpoint_type: CheckpointType
    checkpoint_id: str

    @classmethod
    def from_tinker_path(cls, tinker_path: str) -> ParsedCheckpointTinkerPath:
        """Parse ``tinker://<run>/<kind>/<name>``, with ``kind`` one of ``weights``,
        ``sampler_weights`` or ``external_weights``.

        Raises:
            ValueError: The path does not have that form (checked before any request).
        """
        if not tinker_path.startswith(_PREFIX):
            raise ValueError(f"not a tinker:// path: {tinker_path[:80]!r}")
        parts = tinker_path[len(_PREFIX) :].split("/")
        if len(parts) != 3 or not all(parts):
            raise ValueError(
                f"invalid checkpoint path {tinker_path[:80]!r}: the form is tinker://<run>/<kind>/<name>"
            )
        run, kind, name = parts
        if kind not in _TYPES:
            raise ValueError(
                f"invalid checkpoint path {tinker_path[:80]!r}: the kind must be one of {', '.join(_TYPES)}"
            )
        return cls(
            tinker_path=tinker_path,
            training_run_id=run,
            checkpoint_type=_TYPES[kind],
            checkpoint_id=f"{kind}/{name}",
        )
