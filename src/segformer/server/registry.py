"""The models a server offers, by public name, each loaded once and shared by all requests.

A model is loaded the first time it is needed (the default one at start-up), under a lock so
that two requests arriving together load it once. A request may ask for another inference
mode than the server's default; that gets its own ``Segmenter`` around the same weights.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from segformer.inference.modes import MODES
from segformer.inference.segmenter import Segmenter
from segformer.server.settings import ModelSpec, Settings

log = logging.getLogger("segformer.server")


def public_source(source: Any) -> str | None:
    """Where a model came from, as clients may see it: hub ids and names as they are, local
    paths reduced to their last component (the server's folder layout is nobody's business)."""
    if source is None:
        return None
    text = str(source)
    if text.startswith(("/", "~", ".")) or "\\" in text or Path(text).exists():
        return Path(text.rstrip("/\\")).name
    return text


class ServedModel:
    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        self.spec = spec
        self.settings = settings
        self._segmenters: dict[str, Segmenter] = {}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def loaded(self) -> bool:
        return bool(self._segmenters)

    def segmenter(self, mode: str | None = None) -> Segmenter:
        """The segmenter for ``mode`` (default: the server's), loading the model if needed."""
        mode = mode or self.settings.mode
        segmenter = self._segmenters.get(mode)
        if segmenter is not None:
            return segmenter
        with self._lock:
            if mode in self._segmenters:
                return self._segmenters[mode]
            base = next(iter(self._segmenters.values()), None)
            settings = self.settings
            if base is None:
                log.info("loading model %s (%s)", self.name, self.spec.source or "built-in")
                segmenter = Segmenter.from_pretrained(
                    self.spec.source,
                    device=settings.device,
                    precision=settings.precision,
                    backend=settings.backend,
                    mode=mode,
                    max_pixels=settings.max_pixels,
                    reduced_decode=settings.reduced_decode,
                    name=self.name,
                )
                # The first pass pays for kernel selection and memory set-up; pay it here
                # rather than in a user's first request.
                segmenter(np.zeros((64, 64, 3), dtype=np.uint8))
            else:
                segmenter = Segmenter(
                    base.model,
                    device=base.device,
                    engine=base.engine,
                    mode=mode,
                    max_pixels=settings.max_pixels,
                    reduced_decode=settings.reduced_decode,
                    name=self.name,
                )
            self._segmenters[mode] = segmenter
            return segmenter

    def info(self) -> dict[str, Any]:
        """``Segmenter.info()`` for clients (paths hidden), plus whether it is loaded."""
        info = dict(self.segmenter().info())
        info["name"] = self.name
        info["source"] = public_source(info.get("source"))
        info["loaded"] = True
        info["modes"] = list(MODES)
        return info


class ModelRegistry:
    def __init__(self, settings: Settings) -> None:
        specs = settings.model_specs()
        self.models = {spec.name: ServedModel(spec, settings) for spec in specs}
        self.default = specs[0].name

    @property
    def names(self) -> list[str]:
        return list(self.models)

    def get(self, name: str | None) -> ServedModel | None:
        return self.models.get(name or self.default)

    def load_at_start(self, preload: bool) -> None:
        """Load the default model (every model with ``preload``); errors stop the start."""
        for name, model in self.models.items():
            if preload or name == self.default:
                model.segmenter()
