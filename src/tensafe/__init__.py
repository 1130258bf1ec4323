"""TenSafe: privacy-first fine-tuning and shipping of LoRA adapters.

The top-level package is deliberately light: importing :mod:`tensafe` never imports
torch, a database driver or a crypto backend. Functionality lives in subpackages
(``tensafe.privacy``, ``tensafe.crypto``, ``tensafe.training`` ...), each with its own
``__all__`` and its own exception tree rooted at :class:`tensafe.errors.TenSafeError`.
"""

from tensafe._version import __version__
from tensafe.errors import TenSafeError

__all__ = ["TenSafeError", "__version__"]
