"""``ModelReader``: a model's predictions in the calling process, from the shared checkpoint.

``itrain.predict`` answers through the queue (a round trip through a worker). A service that
predicts often reads the checkpoint itself: ``ModelReader(model).predict(event)`` reads it once,
keeps it, and checks at most every ``refresh_ms`` whether a newer version was committed (one
``HMGET`` of the version and its id), reading the weights again only then. No numpy: a 4-16-1
forward pass is a few hundred multiplications, done here in plain Python with the same features
(``producer.features``) and the same formulas as the worker's ``mlp.forward``; predictions agree
with ``itrain.predict`` to 1e-12.

Needs read access to the model's checkpoint (the ``reader`` role of ``itrain acl``), and the same
``ITRAIN_HASH_KEY`` as the workers that train the model.
"""

from __future__ import annotations

import math
import struct
import threading
import time
from typing import Any

import orjson

from producer.errors import CheckpointError, ModelNotInitialisedError
from producer.events import InteractionData
from producer.features import Featurizer
from producer.keys import ModelKeys
from producer.redis_conn import check_tls_url, connect
from producer.settings import Settings, get_settings

__all__ = ["ModelReader"]


class _Weights:
    """One checkpoint's network, as nested lists."""

    __slots__ = ("b1", "b2", "tag", "version", "w1", "w2")

    def __init__(self, tag: bytes, version: int, params: bytes, config: dict[str, Any]) -> None:
        i, h, k = int(config["inputs"]), int(config["hidden"]), int(config["outputs"])
        size = h * i + h + k * h + k
        if len(params) != size * 8:
            raise CheckpointError(f"checkpoint holds {len(params)} bytes, {i}-{h}-{k} needs {size * 8}")
        theta = struct.unpack(f"<{size}d", params)  # little-endian float64, whatever this host is
        if not all(math.isfinite(v) for v in theta):
            raise CheckpointError("checkpoint holds non-finite weights")
        a, b, c = h * i, h * i + h, h * i + h + k * h
        self.w1 = [theta[r * i : (r + 1) * i] for r in range(h)]
        self.b1 = theta[a:b]
        self.w2 = [theta[b + r * h : b + (r + 1) * h] for r in range(k)]
        self.b2 = theta[c : c + k]
        self.tag = tag
        self.version = version

    def forward(self, x: tuple[float, ...]) -> list[float]:
        hidden = [
            math.tanh(math.fsum(w * v for w, v in zip(row, x, strict=True)) + b)
            for row, b in zip(self.w1, self.b1, strict=True)
        ]
        out = []
        for row, b in zip(self.w2, self.b2, strict=True):
            z = math.fsum(w * v for w, v in zip(row, hidden, strict=True)) + b
            out.append(0.5 * (1.0 + math.tanh(0.5 * z)))  # the sigmoid as mlp.sigmoid computes it
        return out


class ModelReader:
    """Predictions of one model, in process, refreshed when a new version is committed."""

    def __init__(
        self,
        model: str = "default",
        redis_url: str | None = None,
        *,
        settings: Settings | None = None,
        refresh_ms: float = 1000.0,
    ) -> None:
        base = settings or get_settings()
        url = (
            base.complete(check_tls_url(redis_url, "redis_url"), "redis_url")
            if redis_url is not None
            else base.store
        )
        self.model = model
        self.refresh_s = refresh_ms / 1000.0
        self._client = connect(url, base.publish_timeout)
        self._keys = ModelKeys(model)
        self._features = Featurizer(base.hash_key_bytes)
        self._weights: _Weights | None = None
        self._checked = 0.0
        self._lock = threading.Lock()

    def predict(self, event: InteractionData | dict[str, Any]) -> dict[str, Any]:
        """``{model, version, prediction}``, as ``itrain.predict`` answers, for the reader's model
        (an event naming another model is read as if for this one)."""
        ev = event if isinstance(event, InteractionData) else InteractionData.model_validate(event)
        weights = self._current()
        prediction = weights.forward(self._features.row(ev))
        return {"model": self.model, "version": weights.version, "prediction": prediction}

    @property
    def version(self) -> int:
        return self._current().version

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ModelReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _current(self) -> _Weights:
        now = time.monotonic()
        with self._lock:
            weights = self._weights
            if weights is not None and now - self._checked < self.refresh_s:
                return weights
            self._checked = now
            if weights is None:  # nothing to compare yet: read everything in one round trip
                self._weights = weights = self._load()
                return weights
            version, cid = (_bytes(v) for v in self._client.hmget(self._keys.ckpt, ["version", "cid"]))
            if version is None:
                raise ModelNotInitialisedError(f"model {self.model!r} is not initialised")
            tag = version + b":" + (cid or b"")
            if weights.tag != tag:
                weights = self._load()
                self._weights = weights
            return weights

    def _load(self) -> _Weights:
        # One HMGET: weights never without their version (a commit writes them in one script).
        fields = ["version", "cid", "params", "config"]
        version, cid, params, config = (_bytes(v) for v in self._client.hmget(self._keys.ckpt, fields))
        if version is None or params is None or config is None:
            raise ModelNotInitialisedError(f"model {self.model!r} is not initialised")
        return _Weights(version + b":" + (cid or b""), int(version), params, orjson.loads(config))


def _bytes(value: Any) -> bytes | None:
    return value.encode() if isinstance(value, str) else value
