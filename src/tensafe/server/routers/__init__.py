"""The HTTP routes of the training API server, one module per resource.

Each module exports ``router`` (a :class:`fastapi.APIRouter`); :data:`ROUTERS` lists them in
the order :func:`tensafe.server.app.create_app` includes them. A new capability adds one
module here and one ``app.include_router(...)`` line in ``create_app``.

=================  ===========================================================================
``health``         ``/healthz``, ``/readyz``
``checkpoints``    ``save_weights_external``, download URLs and downloads, publish, TTL
``sessions``       ``client/config``, ``create_session``, heartbeats, ``finish``, telemetry
``training``       ``create_model``, ``get_info``, ``forward[_backward]``, ``optim_step``,
                   ``tensafe/register_dataset``, ``tensafe/train_step``
``weights``        ``save_weights``, ``save_weights_for_sampler``, ``load_weights``, ``weights_info``
``sampling``       ``create_sampling_session``, ``samplers/{id}``, ``asample``
``futures``        ``retrieve_future`` (long-polling)
``rest``           capabilities, training runs, checkpoints and sessions listings, delete
``tensafe``        ``/api/v1/tensafe/...``: audit, artifacts, privacy reports and certificates
=================  ===========================================================================

``external_weights`` holds the upload of LoRA weights trained elsewhere (Tinker 0.39's
``external_weights_upload_start``/``_finish``) and ``checkpoints/search``.

Routers depend only on :mod:`tensafe.server.deps` and the job layer (services, jobs,
checkpoints, retention, ...); the job layer never imports a router (``.importlinter``).
"""

from __future__ import annotations

from fastapi import APIRouter

from tensafe.server.routers import (
    checkpoints,
    external_weights,
    futures,
    health,
    rest,
    sampling,
    sessions,
    tensafe,
    training,
    weights,
)

__all__ = ["ROUTERS"]

#: Every router, in inclusion order: ``checkpoints`` before ``rest``, whose
#: ``DELETE .../checkpoints/{path}`` would otherwise shadow ``DELETE .../publish``.
ROUTERS: tuple[APIRouter, ...] = (
    health.router,
    checkpoints.router,
    sessions.router,
    training.router,
    weights.router,
    sampling.router,
    futures.router,
    rest.router,
    tensafe.router,
    external_weights.router,
)
