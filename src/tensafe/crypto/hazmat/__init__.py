"""Low-level building blocks of :mod:`tensafe.crypto`.

Nothing here is a safe recipe on its own: these modules hold the format constants,
the armoring code, the raw primitive calls and the hybrid KEM combiner that the
top-level modules compose. Only :mod:`tensafe.crypto` may import this package (an
import-linter contract enforces it); tests may import it to check vectors.
"""

from __future__ import annotations

__all__: list[str] = []
