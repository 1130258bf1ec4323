"""Semantic Versioning 2.0.0 parsing and precedence (https://semver.org/spec/v2.0.0.html)."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["SemVer"]

_SEMVER_RE = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$",
    re.ASCII,
)
_MAX_LEN = 128


@dataclass(frozen=True)
class SemVer:
    """A parsed semantic version; compare with :meth:`precedence_key` (build metadata is ignored)."""

    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...]
    build: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> SemVer:
        """Parse ``text``.

        Raises:
            ValueError: ``text`` is not a SemVer 2.0.0 version.
        """
        if not isinstance(text, str) or len(text) > _MAX_LEN or not text.isascii():
            raise ValueError("not a semantic version")
        match = _SEMVER_RE.fullmatch(text)
        if match is None:
            raise ValueError("not a semantic version")
        major, minor, patch, pre, build = match.groups()
        return cls(
            int(major),
            int(minor),
            int(patch),
            tuple(pre.split(".")) if pre else (),
            tuple(build.split(".")) if build else (),
        )

    def precedence_key(self) -> tuple[object, ...]:
        """A key whose ordering is SemVer precedence (§11)."""
        if not self.prerelease:
            pre: tuple[object, ...] = ((1,),)
        else:
            idents: list[tuple[int, int, str]] = []
            for ident in self.prerelease:
                if ident.isdigit():
                    idents.append((0, int(ident), ""))
                else:
                    idents.append((1, 0, ident))
            pre = ((0, tuple(idents)),)
        return (self.major, self.minor, self.patch, *pre)

    def __str__(self) -> str:
        text = f"{self.major}.{self.minor}.{self.patch}"
        if self.prerelease:
            text += "-" + ".".join(self.prerelease)
        if self.build:
            text += "+" + ".".join(self.build)
        return text
