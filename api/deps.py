"""Typed dependencies of the routes: settings, job store, lifecycle, artifact store, job queue, event hub,
the caller's tenant."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.auth import caller_tenant
from api.event_stream import EventHub
from service.lifecycle import Lifecycle, service_lifecycle
from service.policy import SourcePolicy
from service.queue import JobQueue
from service.settings import Settings
from service.storage import ObjectStore
from service.store import JobStore

# The getters are ``async def`` because they only read app.state: FastAPI runs sync
# dependencies on its thread pool, and a thread hop per dependency per request is waste.


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> JobStore:
    return request.app.state.store


async def get_artifacts(request: Request) -> ObjectStore:
    return request.app.state.artifacts


async def get_policy(request: Request) -> SourcePolicy:
    return request.app.state.policy


async def get_queue(request: Request) -> JobQueue:
    return request.app.state.queue


async def get_lifecycle(request: Request) -> Lifecycle:
    """Made per request from the shared clients (a few small objects): the one writer of job states."""
    state = request.app.state
    return service_lifecycle(state.store, state.settings, queue=state.queue, artifacts=state.artifacts)


async def get_event_hub(request: Request) -> EventHub:
    """Made by the app's lifespan (api/main.py), on the server's event loop."""
    return request.app.state.events


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
ArtifactsDep = Annotated[ObjectStore, Depends(get_artifacts)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]
PolicyDep = Annotated[SourcePolicy, Depends(get_policy)]
LifecycleDep = Annotated[Lifecycle, Depends(get_lifecycle)]
EventHubDep = Annotated[EventHub, Depends(get_event_hub)]
TenantDep = Annotated[str, Depends(caller_tenant)]
"""The tenant of the caller's API key (401 without a valid one when keys are configured)."""
