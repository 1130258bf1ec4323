"""``TinkerPath``: the address of a checkpoint, ``tinker://<training_run_id>/<kind>/<name>``.

Every ``tinker://`` string the server or the SDK reads is parsed here and every one they
write is produced by ``str(TinkerPath(...))``; nothing else formats or splits them.

Grammar (version 1, the one the server has accepted since its first release)::

    tinker-path = "tinker://" ident "/" kind "/" ident
    kind        = "weights" | "sampler_weights" | "external_weights"
    ident       = [A-Za-z0-9] [A-Za-z0-9:._-]{0,199}

The run id and the name are identifiers: 1 to 200 characters, no ``/``, no whitespace, no
leading ``.`` (so neither ``.`` nor ``..`` can name a checkpoint), no trailing newline. The
run id of a training model contains ``:`` (``<session>:train:<n>``). Parsing is exact:
``str(TinkerPath.parse(s)) == s`` for every accepted ``s``, and any other string raises
:class:`~tensafe.protocol.errors.InvalidTinkerPathError` (a ``ValueError``).

The kind says what the checkpoint holds; :attr:`TinkerPath.checkpoint_type` is the name the
Tinker REST API uses for it (``weights`` -> ``training``, ``sampler_weights`` -> ``sampler``,
``external_weights`` -> ``external``) and :attr:`TinkerPath.checkpoint_id` is the
``<kind>/<name>`` part used in REST URLs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal, get_args

from tensafe.protocol.errors import InvalidTinkerPathError

__all__ = [
    "CHECKPOINT_KINDS",
    "KIND_OF_CHECKPOINT_TYPE",
    "TINKER_PATH_PREFIX",
    "CheckpointKind",
    "CheckpointType",
    "TinkerPath",
]

#: Every checkpoint path starts with this scheme.
TINKER_PATH_PREFIX: Final = "tinker://"

#: The middle part of a path: what the checkpoint holds.
CheckpointKind = Literal["weights", "sampler_weights", "external_weights"]

#: The Tinker REST name of each kind (``Checkpoint.checkpoint_type``).
CheckpointType = Literal["training", "sampler", "external"]

#: The kinds, in the order the documentation lists them.
CHECKPOINT_KINDS: Final[tuple[CheckpointKind, ...]] = get_args(CheckpointKind)

_TYPE_OF_KIND: Final[dict[CheckpointKind, CheckpointType]] = {
    "weights": "training",
    "sampler_weights": "sampler",
    "external_weights": "external",
}
#: The kind of each Tinker REST checkpoint type (the inverse of :attr:`TinkerPath.checkpoint_type`).
KIND_OF_CHECKPOINT_TYPE: Final[dict[CheckpointType, CheckpointKind]] = {
    v: k for k, v in _TYPE_OF_KIND.items()
}
_IDENT: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9:._-]{0,199}")
_FORM: Final = "tinker://<training_run_id>/<weights|sampler_weights|external_weights>/<name>"


def _shown(text: str) -> str:
    """The input as an error message shows it: quoted, at most 80 characters."""
    return repr(text[:80] + ("..." if len(text) > 80 else ""))


@dataclass(frozen=True, slots=True)
class TinkerPath:
    """A checkpoint path; construct it from its parts or with :meth:`parse`.

    Raises:
        InvalidTinkerPathError: (from the constructor) ``run_id`` or ``name`` is not an
            identifier or ``kind`` is not one of :data:`CHECKPOINT_KINDS`.
    """

    run_id: str
    kind: CheckpointKind
    name: str

    def __post_init__(self) -> None:
        if self.kind not in _TYPE_OF_KIND:
            raise InvalidTinkerPathError(
                f"{_shown(str(self.kind))} is not a checkpoint kind; use one of {', '.join(CHECKPOINT_KINDS)}"
            )
        for what, value in (("training run id", self.run_id), ("checkpoint name", self.name)):
            if not isinstance(value, str) or _IDENT.fullmatch(value) is None:
                raise InvalidTinkerPathError(
                    f"{_shown(str(value))} is not a valid {what}: use 1 to 200 letters, digits, "
                    "':', '.', '_' or '-', starting with a letter or digit"
                )

    @classmethod
    def parse(cls, text: str) -> TinkerPath:
        """Parse ``tinker://<training_run_id>/<kind>/<name>`` exactly (see the module docs).

        Raises:
            InvalidTinkerPathError: ``text`` is not such a path.
        """
        if not isinstance(text, str) or not text.startswith(TINKER_PATH_PREFIX):
            raise InvalidTinkerPathError(f"{_shown(str(text))} is not a tinker:// path; the form is {_FORM}")
        parts = text[len(TINKER_PATH_PREFIX) :].split("/")
        if (
            len(parts) != 3
            or parts[1] not in _TYPE_OF_KIND
            or not all(_IDENT.fullmatch(part) for part in (parts[0], parts[2]))
        ):
            raise InvalidTinkerPathError(f"{_shown(text)} must look like {_FORM}")
        return cls(run_id=parts[0], kind=parts[1], name=parts[2])

    @classmethod
    def from_checkpoint_id(cls, run_id: str, checkpoint_id: str) -> TinkerPath:
        """The path of ``checkpoint_id`` (``<kind>/<name>``, as in REST URLs) of run ``run_id``.

        Raises:
            InvalidTinkerPathError: ``checkpoint_id`` is not ``<kind>/<name>`` or a part is invalid.
        """
        kind, sep, name = checkpoint_id.partition("/")
        if not sep or kind not in _TYPE_OF_KIND or _IDENT.fullmatch(name) is None:
            raise InvalidTinkerPathError(
                f"invalid checkpoint id {_shown(checkpoint_id)}: the form is <kind>/<name> with kind one "
                f"of {', '.join(CHECKPOINT_KINDS)}"
            )
        return cls(run_id=run_id, kind=kind, name=name)

    def format(self) -> str:
        """``tinker://<run_id>/<kind>/<name>`` (the same as ``str(path)``)."""
        return f"{TINKER_PATH_PREFIX}{self.run_id}/{self.kind}/{self.name}"

    def __str__(self) -> str:
        return self.format()

    @property
    def checkpoint_id(self) -> str:
        """``<kind>/<name>``: how REST URLs and ``Checkpoint.checkpoint_id`` name it."""
        return f"{self.kind}/{self.name}"

    @property
    def checkpoint_type(self) -> CheckpointType:
        """The Tinker REST type of the kind: ``training``, ``sampler`` or ``external``."""
        return _TYPE_OF_KIND[self.kind]
