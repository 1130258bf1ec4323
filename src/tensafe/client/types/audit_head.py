"""``AuditHead``: a signed checkpoint of the tenant's audit chain, kept by the client."""

from __future__ import annotations

from pydantic import Field

from tensafe.client.types._base import ResponseModel

__all__ = ["AuditHead"]


class AuditHead(ResponseModel):
    """The newest signed checkpoint of the tenant's chain (``GET /api/v1/tensafe/audit/head``).

    Keep it somewhere the server's operators cannot write, and pass it back to
    :meth:`~tensafe.client.RestClient.verify_audit` later: verification then fails if the
    chain was rolled back below it or rewritten. :meth:`to_json` is a head file that
    ``tensafe audit verify-head HEAD.json --public-key PUB`` (its signature) and
    ``tensafe audit verify --known-head`` / ``verify-bundle --known-head`` accept.

    The SDK does not check ``signature`` itself. Check it with the deployment's public key
    obtained from the operator out of band (``tensafe keys export-public-key``, compared
    by ``key_id``), never with a key the server hands out: the server's word proves
    nothing about itself. See ``docs/audit.md`` ("Known heads").
    """

    format: str
    tenant: str
    length: int = Field(ge=0)
    head_hash: str
    timestamp: str
    key_id: str
    signature: str

    def to_json(self) -> str:
        """The head file: this object as JSON, one member per line."""
        return self.model_dump_json(indent=2) + "\n"
