"""The standalone serving process of ``tensafe serve``: one tenant's verified packages on one engine.

:meth:`StandaloneServer.start` does everything that can refuse **before anything listens**:
each package is admitted (:class:`~tensafe.serving.packages.PackageAdmission`: signatures
against the operator's trust store and threshold, expiry, rollback, the Rego policy,
decryption in memory with the serving recipient key, the base model), then loaded into the
engine through the :class:`~tensafe.serving.registry.AdapterRegistry` (which checks rank,
targets and shapes and records ``serving.adapter.loaded``). The first refusal stops the start
with one line (:class:`~tensafe.serving.errors.AdapterRefusedError`), recorded in the tenant's
audit chain. :func:`run_standalone` then serves :meth:`StandaloneServer.app` with uvicorn in the
same event loop, next to a task that sweeps expired packages out of the engine every
``recheck_seconds``.

**Who may do what.**

* ``/v1/*`` (the OpenAI-compatible API of :mod:`tensafe.serving.api`): an API key of the
  served tenant (``tensafe admin create-api-key``; the one lookup of
  :func:`tensafe.db.api_keys.lookup_api_key`), sent as ``Authorization: Bearer`` (the
  ``openai`` SDK) or ``X-API-Key``. A revoked or expired key, and any other tenant's key, is a
  401: this process serves one tenant's packages only.
* ``/admin/adapters`` (load, unload, list at runtime): the **operator**, who proves it with
  the admin token given at start (``--admin-token-file``: a file only its owner can read,
  holding a random token of at least 32 characters; only its SHA-256 is kept). No API key is
  ever an admin credential, so a tenant's key holders cannot change what the server serves,
  and the operator token cannot generate. Without ``--admin-token-file`` the admin routes
  answer 401 (disabled).

**Audit.** The tenant's chain records every package decision (``tssp.unpack.accepted`` or the
refusal), every refusal of the serving layer (``serving.adapter.refused``: a package refused
at start or by the operator, an expired package requested) and every load and unload
(``serving.adapter.loaded`` / ``serving.adapter.unloaded`` with the reason: ``admin``,
``invalid`` for an expired or replaced package, ``lru``, ``shutdown``). Actors are
``apikey:<key id>``, ``operator:admin-token`` and ``service:tensafe-serve``. Never a prompt,
a completion, a key or the admin token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Final

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.orm import Session, sessionmaker

from tensafe.audit import AuditLog
from tensafe.db import utcnow
from tensafe.db.api_keys import ApiKeyRejectedError, KeyOwner, lookup_api_key
from tensafe.package import AuditLogSink, AuditSink
from tensafe.serving._audit import serving_details
from tensafe.serving.api import Authenticate, build_openai_app, openai_error_response
from tensafe.serving.engine import Engine
from tensafe.serving.errors import (
    AdapterRefusedError,
    InvalidGenerationRequestError,
    ModelNotFoundError,
    ServingError,
    UnauthenticatedError,
)
from tensafe.serving.packages import (
    PACKAGE_SOURCE,
    AdmittedPackage,
    PackageAdmission,
    PackageSource,
    RevocationList,
)
from tensafe.serving.registry import AdapterRegistry, ServingCaller, model_not_found

__all__ = [
    "ADMIN_ACTOR",
    "MAX_UPLOAD_BYTES",
    "SERVICE_ACTOR",
    "AdminToken",
    "StandaloneServer",
    "api_key_authenticator",
    "read_revocation_list",
    "run_standalone",
]

_log = logging.getLogger("tensafe.serving.standalone")

#: The audit actor of the operator's admin requests.
ADMIN_ACTOR: Final = "operator:admin-token"
#: The audit actor of what the process does by itself (loads at start, expiry sweeps).
SERVICE_ACTOR: Final = "service:tensafe-serve"
#: The largest package an operator may upload to ``POST /admin/adapters``.
MAX_UPLOAD_BYTES: Final = 1 << 30
_MIN_TOKEN_CHARS: Final = 32


class AdminToken:
    """The operator's admin token; only its SHA-256 is kept.

    Build it with :meth:`from_file` (the ``--admin-token-file`` of ``tensafe serve``).
    """

    __slots__ = ("_digest",)

    def __init__(self, token: str) -> None:
        """Keep the digest of ``token`` (at least 32 printable ASCII characters, no spaces).

        Raises:
            AdapterRefusedError: The token is too short or has other characters.
        """
        if len(token) < _MIN_TOKEN_CHARS or not token.isascii() or not token.isprintable() or " " in token:
            raise AdapterRefusedError(
                f"the admin token must be at least {_MIN_TOKEN_CHARS} printable ASCII characters without "
                "spaces (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        self._digest = hashlib.sha256(token.encode("ascii")).digest()

    def __repr__(self) -> str:
        return "AdminToken(<hidden>)"

    @classmethod
    def from_file(cls, path: str | Path) -> AdminToken:
        """Read the token from the first line of ``path``, which only its owner may read.

        Raises:
            AdapterRefusedError: The file cannot be read, is readable or writable by the group
                or others, or holds no valid token.
        """
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise AdapterRefusedError(
                f"--admin-token-file {path}: cannot read the file ({exc.strerror or exc})"
            ) from None
        with os.fdopen(fd, "rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise AdapterRefusedError(
                    f"--admin-token-file {path}: the group or others may access it (mode "
                    f"{stat.S_IMODE(mode):04o}); run 'chmod 600 {path}'"
                )
            first = fh.readline(4096).decode("ascii", "replace").strip()
        return cls(first)

    def matches(self, presented: str | None) -> bool:
        """Whether ``presented`` is the token (constant time)."""
        if not presented:
            return False
        digest = hashlib.sha256(presented.encode("utf-8", "replace")).digest()
        return hmac.compare_digest(digest, self._digest)


def _presented_key(request: Request) -> str | None:
    """The credential of a request: ``Authorization: Bearer X`` (the ``openai`` SDK), else ``X-API-Key``."""
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return request.headers.get("x-api-key") or None


def api_key_authenticator(sessions: sessionmaker[Session], *, tenant: str) -> Authenticate:
    """The ``authenticate`` of the OpenAI API: an API key of ``tenant``, else a 401."""

    def lookup(key: str | None) -> KeyOwner:
        with sessions() as session:
            return lookup_api_key(session, key)

    async def authenticate(request: Request) -> ServingCaller:
        key = _presented_key(request)
        if key is None:
            raise UnauthenticatedError(
                "missing API key: send it as 'Authorization: Bearer <key>' (the openai SDK's api_key)"
            )
        try:
            owner = await anyio.to_thread.run_sync(lookup, key)
        except ApiKeyRejectedError as exc:
            raise UnauthenticatedError(str(exc)) from None
        if owner.tenant != tenant:
            raise UnauthenticatedError("this API key is not valid on this server")
        return ServingCaller(tenant=owner.tenant, actor=f"apikey:{owner.key_id}")

    return authenticate


async def _record_refusal(audit_log: AuditLog, tenant: str, model: str, why: str, *, actor: str) -> None:
    """Record a package the serving layer refused in the tenant's chain (``serving.adapter.refused``)."""
    details = serving_details(
        "serving.adapter.refused",
        reason="package_refused",
        source=PACKAGE_SOURCE,
        why=" ".join(why.split())[:300],
    )
    clean = "".join("?" if ord(c) < 32 or 127 <= ord(c) < 160 else c for c in model)[:200]
    await anyio.to_thread.run_sync(
        lambda: audit_log.append(
            tenant=tenant,
            actor=actor,
            action="serving.adapter.refused",
            resource=f"adapter/{clean}",
            details=details,
        )
    )


async def _admit(
    admission: PackageAdmission,
    audit_log: AuditLog,
    tenant: str,
    path: str | Path,
    *,
    actor: str,
    revoked: RevocationList,
) -> AdmittedPackage:
    """Admit one package, its TSSP decision and any refusal recorded under ``actor``."""
    sink: AuditSink = AuditLogSink(audit_log, tenant=tenant, actor=actor)
    try:
        package = await anyio.to_thread.run_sync(partial(admission.admit, path, audit=sink))
        why = revoked.reason(package)
        if why is not None:
            raise AdapterRefusedError(f"package {path} refused: {why} (the revocation list)")
    except AdapterRefusedError as exc:
        await _record_refusal(audit_log, tenant, Path(path).name, str(exc), actor=actor)
        raise
    return package


def read_revocation_list(path: str | Path | None) -> RevocationList:
    """The revocation list in ``path`` (empty when None).

    Raises:
        AdapterRefusedError: The file cannot be read or has a malformed line.
    """
    if path is None:
        return RevocationList()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AdapterRefusedError(
            f"--revocation-list {path}: cannot read the file ({getattr(exc, 'strerror', None) or exc})"
        ) from None
    return RevocationList.parse(text, origin=f"--revocation-list {path}")


class StandaloneServer:
    """One tenant's admitted packages, the engine, the registry and the app (see the module docstring).

    Build it with :meth:`start`; serve it with :func:`run_standalone`.
    """

    def __init__(
        self,
        *,
        tenant: str,
        engine: Engine,
        admission: PackageAdmission,
        source: PackageSource,
        registry: AdapterRegistry,
        audit_log: AuditLog,
        sessions: sessionmaker[Session],
        admin_token: AdminToken | None,
        recheck_seconds: float,
        revocation_list: str | Path | None = None,
    ) -> None:
        """Assemble the parts (use :meth:`start`, which also admits and loads the packages)."""
        self.tenant = tenant
        self.engine = engine
        self.admission = admission
        self.source = source
        self.registry = registry
        self._audit_log = audit_log
        self._sessions = sessions
        self._admin_token = admin_token
        self.recheck_seconds = recheck_seconds
        self._revocation_list = revocation_list
        self.revoked = read_revocation_list(revocation_list)
        source.set_revoked(self.revoked)
        self._admin_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"StandaloneServer(tenant={self.tenant!r}, model={self.engine.model_id!r})"

    @classmethod
    async def start(
        cls,
        *,
        tenant: str,
        start_engine: Callable[[], Awaitable[Engine]],
        admission: PackageAdmission,
        packages: Sequence[str | Path],
        audit_log: AuditLog,
        sessions: sessionmaker[Session],
        admin_token: AdminToken | None,
        max_resident: int,
        recheck_seconds: float = 30.0,
        revocation_list: str | Path | None = None,
    ) -> StandaloneServer:
        """Admit every package, start the engine, load each package; nothing listens yet.

        The packages are admitted before the engine starts (a refusal costs no model load).

        Raises:
            AdapterRefusedError: A package was refused (one line naming it and why; recorded),
                two packages have the same name, or the engine refused an adapter.
            EngineUnavailableError: The engine cannot start.
        """
        if recheck_seconds <= 0:
            raise InvalidGenerationRequestError(
                "the expiry check interval must be positive", param="recheck_seconds"
            )
        revoked = read_revocation_list(revocation_list)
        admitted: dict[str, AdmittedPackage] = {}
        for path in packages:
            package = await _admit(admission, audit_log, tenant, path, actor=SERVICE_ACTOR, revoked=revoked)
            if package.name in admitted:
                why = (
                    f"packages {admitted[package.name].source} and {path} are both named "
                    f"{package.name!r}; give one"
                )
                await _record_refusal(audit_log, tenant, package.name, why, actor=SERVICE_ACTOR)
                raise AdapterRefusedError(why)
            admitted[package.name] = package
        engine = await start_engine()
        try:
            if engine.model_id != admission.base_model:
                raise AdapterRefusedError(
                    f"the engine serves {engine.model_id!r} but packages are admitted for "
                    f"{admission.base_model!r}"
                )
            source = PackageSource(tenant=tenant, base_model=engine.model_id)

            async def engine_for(name: str) -> Engine:
                if name != engine.model_id:
                    raise model_not_found(name)
                return engine

            registry = AdapterRegistry(
                sources=[source],
                engine_for=engine_for,
                base_models=[engine.model_id],
                max_resident=max_resident,
                audit=audit_log,
                recheck_seconds=recheck_seconds,
            )
            server = cls(
                tenant=tenant,
                engine=engine,
                admission=admission,
                source=source,
                registry=registry,
                audit_log=audit_log,
                sessions=sessions,
                admin_token=admin_token,
                recheck_seconds=recheck_seconds,
                revocation_list=revocation_list,
            )
            for package in admitted.values():
                source.add(package)
            for package in admitted.values():
                await server._load(package, actor=SERVICE_ACTOR)
        except BaseException:
            await engine.close()
            raise
        return server

    # ------------------------------------------------------------------ operations

    async def _admit(self, path: str | Path, *, actor: str) -> AdmittedPackage:
        return await _admit(
            self.admission, self._audit_log, self.tenant, path, actor=actor, revoked=self.revoked
        )

    async def _load(self, package: AdmittedPackage, *, actor: str) -> None:
        """Load ``package`` into the engine now (the registry checks and records it)."""
        caller = ServingCaller(tenant=self.tenant, actor=actor)
        try:
            await self.registry.load(caller, package.model)
        except ServingError:
            self.source.remove(package.model)
            raise

    async def load_package(self, path: str | Path, *, actor: str = ADMIN_ACTOR) -> dict[str, Any]:
        """Admit and load a package at runtime (an operator's action); a newer version replaces the old one.

        Raises:
            AdapterRefusedError: The package was refused (recorded); nothing changed.
        """
        async with self._admin_lock:
            package = await self._admit(path, actor=actor)
            replaced = self.source.add(package)
            try:
                await self._load(package, actor=actor)
            except ServingError:
                if replaced is not None:
                    self.source.add(replaced)
                raise
            if replaced is not None:
                await self.registry.sweep()  # the replaced version's adapter leaves the engine now
        return {
            "object": "adapter",
            "id": package.name,
            "version": package.version,
            "models": [package.name, package.model],
            "expires": package.info.manifest["expires"],
            "header_sha256": package.header_sha256,
            "replaced": None if replaced is None else replaced.version,
        }

    async def unload_package(self, name: str, *, actor: str = ADMIN_ACTOR) -> dict[str, Any]:
        """Unload and forget the package ``name`` (or ``name@version``); it is unknown from then on.

        Raises:
            ModelNotFoundError: No package of that name is held.
        """
        async with self._admin_lock:
            ref = self.source.ref_of(name)
            if ref is None:
                raise model_not_found(name)
            caller = ServingCaller(tenant=self.tenant, actor=actor)
            resident = ref.adapter_id in {r.adapter_id for r in self.registry.resident()}
            if resident:
                with contextlib.suppress(ModelNotFoundError):  # an expired one is swept below
                    await self.registry.unload(caller, name)
            package = self.source.remove(name)
            await self.registry.sweep()
            if not resident:
                details = serving_details(
                    "serving.adapter.unloaded",
                    adapter_id=ref.adapter_id,
                    base_model=ref.base_model,
                    source=ref.source,
                    version=ref.version,
                    reason="admin",
                    resident=False,
                )
                await anyio.to_thread.run_sync(
                    lambda: self._audit_log.append(
                        tenant=self.tenant,
                        actor=actor,
                        action="serving.adapter.unloaded",
                        resource=f"adapter/{ref.name}",
                        details=details,
                    )
                )
        assert package is not None
        return {"object": "adapter", "id": package.name, "version": package.version, "deleted": True}

    def describe(self) -> list[dict[str, Any]]:
        """Every package held: name, version, expiry, whether expired and resident."""
        resident = {r.adapter_id for r in self.registry.resident()}
        now = utcnow()
        out = []
        for package in self.source.packages():
            ref = self.source.ref_of(package.name)
            out.append(
                {
                    "object": "adapter",
                    "id": package.name,
                    "version": package.version,
                    "models": [package.name, package.model],
                    "expires": package.info.manifest["expires"],
                    "expired": now >= package.expires,
                    "resident": ref is not None and ref.adapter_id in resident,
                    "header_sha256": package.header_sha256,
                    "trusted_signers": list(package.info.trusted_signers),
                }
            )
        return out

    def reload_revocations(self) -> None:
        """Read the revocation list again; a list that became unreadable keeps the last one (logged)."""
        if self._revocation_list is None:
            return
        try:
            self.revoked = read_revocation_list(self._revocation_list)
        except AdapterRefusedError as exc:
            _log.error("keeping the previous revocation list: %s", exc)
            return
        self.source.set_revoked(self.revoked)

    async def sweep_forever(self) -> None:
        """Every ``recheck_seconds``, re-read the revocation list and unload the adapters whose
        packages expired or were revoked (recorded)."""
        while True:
            await asyncio.sleep(self.recheck_seconds)
            try:
                await anyio.to_thread.run_sync(self.reload_revocations)
                gone = await self.registry.sweep()
            except Exception:  # the next sweep retries; the registry refuses expired ones anyway
                _log.warning("the expiry sweep failed", exc_info=True)
                continue
            for name in gone:
                _log.warning("unloaded %s: its package may no longer be served", name)

    async def close(self) -> None:
        """Unload every adapter (recorded) and stop the engine."""
        try:
            await self.registry.close()
        finally:
            await self.engine.close()

    # ------------------------------------------------------------------ HTTP

    def _check_admin(self, request: Request) -> None:
        if self._admin_token is None:
            raise UnauthenticatedError(
                "the admin routes are disabled: start tensafe serve with --admin-token-file FILE"
            )
        if not self._admin_token.matches(_presented_key(request)):
            raise UnauthenticatedError("admin routes need the operator's admin token (Authorization: Bearer)")

    def app(self) -> FastAPI:
        """The application: ``/v1/*`` (OpenAI-compatible) and ``/admin/adapters`` (operator)."""
        app = build_openai_app(
            registry=self.registry,
            authenticate=api_key_authenticator(self._sessions, tenant=self.tenant),
            prefix="/v1",
            title="TenSafe serve",
        )

        async def list_adapters(request: Request) -> Response:
            """The packages held (operator only)."""
            try:
                self._check_admin(request)
            except ServingError as exc:
                return openai_error_response(exc)
            return JSONResponse({"object": "list", "data": self.describe()})

        async def load_adapter(request: Request) -> Response:
            """Load a package: JSON ``{"path": "/srv/pkgs/x.tssp"}`` or the package bytes (operator only)."""
            try:
                self._check_admin(request)
                result = await self._load_request(request)
            except ServingError as exc:
                return openai_error_response(exc)
            return JSONResponse(result, status_code=201)

        async def delete_adapter(request: Request, name: str) -> Response:
            """Unload a package by ``name`` or ``name@version`` (operator only)."""
            try:
                self._check_admin(request)
                result = await self.unload_package(name)
            except ServingError as exc:
                return openai_error_response(exc)
            return JSONResponse(result)

        app.add_api_route("/admin/adapters", list_adapters, methods=["GET"], include_in_schema=False)
        app.add_api_route("/admin/adapters", load_adapter, methods=["POST"], include_in_schema=False)
        app.add_api_route(
            "/admin/adapters/{name}", delete_adapter, methods=["DELETE"], include_in_schema=False
        )
        return app

    async def _load_request(self, request: Request) -> dict[str, Any]:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            return await self._load_upload(request)
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise InvalidGenerationRequestError("the body is not valid JSON", code="invalid_json") from None
        if not isinstance(body, dict) or set(body) != {"path"} or not isinstance(body["path"], str):
            raise InvalidGenerationRequestError(
                'send {"path": "<package file on the server>"} or the package bytes '
                "(Content-Type: application/octet-stream)",
                param="path",
            )
        return await self.load_package(body["path"])

    async def _load_upload(self, request: Request) -> dict[str, Any]:
        """Keep an uploaded package (ciphertext) in a private temporary file while it is admitted."""
        directory = Path(tempfile.mkdtemp(prefix="tensafe-serve-upload-"))
        try:
            path = directory / "upload.tssp"
            size = 0
            with open(path, "wb") as fh:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > MAX_UPLOAD_BYTES:
                        raise InvalidGenerationRequestError(
                            f"the package is larger than {MAX_UPLOAD_BYTES} bytes; give its path instead",
                            param=None,
                        )
                    fh.write(chunk)
            if size == 0:
                raise InvalidGenerationRequestError(
                    'send the package bytes, or {"path": ...} as application/json', param=None
                )
            return await self.load_package(path)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


def _uvicorn_server(config: Any) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server without its signal capture: it re-raises SIGTERM after serving, which
        would kill the process before the adapters are unloaded (and recorded) and the engine stops."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server(config)


async def run_standalone(
    server: StandaloneServer,
    *,
    host: str,
    port: int,
    ssl_context: Any = None,
    started: Callable[[], None] | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Serve ``server`` with uvicorn in this event loop, sweeping expired packages; close it at the end.

    Args:
        server: A started server.
        host, port: Where to listen.
        ssl_context: A server-side :class:`ssl.SSLContext` for HTTPS, or None.
        started: Called once the socket listens.
        stop: Setting it (from any thread) stops the server; SIGINT/SIGTERM stop it too.
    """
    import uvicorn

    extra: dict[str, Any] = {}
    if ssl_context is not None:
        context = ssl_context
        extra["ssl_context_factory"] = lambda _config, _default: context
    config = uvicorn.Config(server.app(), host=host, port=port, log_level="warning", lifespan="off", **extra)
    web = _uvicorn_server(config)
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, partial(setattr, web, "should_exit", True))
                handled.append(signum)
    sweeper = asyncio.create_task(server.sweep_forever())

    async def watch() -> None:
        while not web.started:
            await asyncio.sleep(0.02)
        if started is not None:
            started()
        if stop is not None:
            while not stop.is_set():
                await asyncio.sleep(0.05)
            web.should_exit = True

    watcher = asyncio.create_task(watch())
    try:
        await web.serve()
    finally:
        for task in (sweeper, watcher):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await server.close()
        for signum in handled:
            loop.remove_signal_handler(signum)
