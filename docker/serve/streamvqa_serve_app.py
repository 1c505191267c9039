"""Ray Serve application builders for the RayService (``import_path`` in serveConfigV2).

``encoder_app(args)`` and ``lm_app(args)`` build the two applications of
``streamvqa.operators.serve.deployments`` from the ``args`` block of the Serve config; the
stages' object store comes from the STREAMVQA_S3__* environment (``StoreConfig.from_settings``),
the same settings the pipeline reads. Replica resources and autoscaling are set per
deployment in the Serve config (they override the decorator's options).
"""

from __future__ import annotations


def _store():
    from streamvqa.operators.serve.stages import StoreConfig
    from streamvqa.settings import Settings

    return StoreConfig.from_settings(Settings())


def encoder_app(args: dict):
    from streamvqa.operators.serve.deployments import DeploySettings, ServeConfig, build_app
    from streamvqa.operators.serve.stages import EncoderStageConfig

    stage = EncoderStageConfig(**{**args.get("stage", {}), "store": _store()})
    deploy = DeploySettings(max_batch_size=int(args.get("max_batch_size", 16)))
    return build_app(ServeConfig(encoder=stage, encoder_deploy=deploy))


def lm_app(args: dict):
    from streamvqa.operators.serve.deployments import ServeConfig, build_app
    from streamvqa.operators.serve.stages import LMStageConfig

    stage = LMStageConfig(**{**args.get("stage", {}), "store": _store()})
    return build_app(ServeConfig(lm=stage))
