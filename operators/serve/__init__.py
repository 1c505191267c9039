"""Model stages as Ray Serve deployments, and the Beam model handlers that call them.

- :mod:`.stages`: the plain-Python stages (no Ray): :class:`EncoderStage` (vision encoder with
  per-stream STC cache) and :class:`LMStage` (KV-memory language model). Per-stream state is
  checkpointed to the object store so any process can take a stream over.
- :mod:`.deployments`: the stages as Serve deployments (``@serve.batch``, stream affinity through
  model multiplexing keyed by stream id); :func:`~.deployments.build_apps`.
- :mod:`.handlers`: Beam ``ModelHandler`` s, in-process or remote (Serve handle, retries).
- :mod:`.local`: start/stop a private local Ray + Serve (no network access, own temp dir).
- :mod:`.cli`: ``streamvqa serve up|down|status``.

Nothing heavy is imported here (the CLI stays fast): the names below load on first use, and Ray
only with :mod:`.deployments` and the remote handlers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "EncoderStage": "stages",
    "EncoderStageConfig": "stages",
    "LMStage": "stages",
    "LMStageConfig": "stages",
    "StageError": "stages",
    "StoreConfig": "stages",
    "ServeClientSettings": "handlers",
    "RemoteStageError": "handlers",
    "handler_from_settings": "handlers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
