"""Output paths of CLI commands: their parent directories are created, as ``mkdir -p`` would.

Every option that names a file or directory a command writes (``--out``, ``--canary-out``,
...) goes through :func:`output_path` before the command writes, so ``tensafe data synth
--out data/train.jsonl`` works in an empty directory. A parent that cannot be created stops
the command with one line naming the option and the directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from tensafe.errors import ConfigurationError

__all__ = ["output_path"]


def output_path(path: str | os.PathLike[str], *, flag: str, private: bool = False) -> Path:
    """Create the missing parent directories of ``path`` and return it as a :class:`Path`.

    Args:
        path: The file (or directory) the command will write.
        flag: The option that named it, for the error message (e.g. ``--out``).
        private: New directories get mode 0700 (for keys), else 0777 minus the umask.

    Raises:
        ConfigurationError: A parent directory cannot be created.
    """
    from tensafe._fsutil import ensure_parent_dir

    try:
        return ensure_parent_dir(path, mode=0o700 if private else 0o777)
    except OSError as exc:
        raise ConfigurationError(
            f"{flag} {os.fspath(path)}: cannot create the directory {Path(path).parent} "
            f"({exc.strerror or type(exc).__name__})"
        ) from None
