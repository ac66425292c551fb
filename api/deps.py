"""Typed dependencies of the routes: settings, job store, artifact store, job queue, the caller's tenant."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.auth import caller_tenant
from api.jobstore import JobStore
from api.queue import JobQueue
from api.settings import Settings
from api.storage import ObjectStore


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> JobStore:
    return request.app.state.store


def get_artifacts(request: Request) -> ObjectStore:
    return request.app.state.artifacts


def get_queue(request: Request) -> JobQueue:
    return request.app.state.queue


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
ArtifactsDep = Annotated[ObjectStore, Depends(get_artifacts)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]
TenantDep = Annotated[str, Depends(caller_tenant)]
"""The tenant of the caller's API key (401 without a valid one when keys are configured)."""
