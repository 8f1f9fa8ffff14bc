"""The checkpoint: weights as raw float64 bytes plus JSON metadata; never pickle.

``encode`` and ``decode`` are pure: they turn a ``Checkpoint`` into the fields of the Redis hash
and back, checking shape, dtype and size on the way in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from producer.errors import CheckpointError
from worker.engine.evaluation import EvalState
from worker.engine.features import N_FEATURES
from worker.engine.guard import Guard
from worker.engine.mlp import Shape, init_params

__all__ = ["DTYPE", "Checkpoint", "Mode", "ModelConfig", "decode", "encode"]

Mode = Literal["per_event", "minibatch"]
#: Little-endian float64 whatever the host's byte order, so any worker can read any checkpoint.
DTYPE = np.dtype("<f8")


class ModelConfig(BaseModel):
    """Hyper-parameters fixed at ``itrain init``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inputs: int = Field(N_FEATURES, ge=1, le=N_FEATURES)
    hidden: int = Field(16, ge=1, le=4096)
    outputs: int = Field(1, ge=1, le=64)
    lr: float = Field(0.05, gt=0, allow_inf_nan=False)
    clip: float = Field(1.0, ge=0, allow_inf_nan=False)
    seed: int = 0
    mode: Mode = "per_event"

    @property
    def shape(self) -> Shape:
        return Shape(self.inputs, self.hidden, self.outputs)


@dataclass(slots=True)
class Checkpoint:
    """One version of a model: weights, position in the training sequence and running loss."""

    config: ModelConfig
    theta: npt.NDArray[np.float64]
    version: int
    step: int
    loss_ema: float | None = None
    loss_last: float | None = None
    #: Random id of this exact checkpoint, new with every commit (see ``worker/store/lua/read.lua``).
    cid: str = ""
    #: The generation: the version ``itrain init`` gave the model; event markers are keyed by it.
    gen: int = 0
    #: The online evaluation as of this checkpoint (read and cached with it by the trainer).
    eval: EvalState | None = None
    guard: Guard | None = None
    #: A tripped guard paused training until ``itrain resume``.
    paused: bool = False

    @classmethod
    def initial(cls, config: ModelConfig) -> Checkpoint:
        """A new model's first checkpoint: seeded initial weights, nothing trained yet. The store
        gives it its version, generation and id when it writes it (``Store.create``)."""
        return cls(config=config, theta=init_params(config.shape, config.seed), version=0, step=0)

    @property
    def tag(self) -> str:
        return f"{self.version}:{self.cid}"


def encode(ckpt: Checkpoint) -> dict[str, bytes | str | int | float]:
    """The hash fields of a checkpoint (``loss_*`` only when known)."""
    shape = ckpt.config.shape
    meta = {"dtype": DTYPE.str, "shape": [shape.inputs, shape.hidden, shape.outputs], "size": shape.size}
    fields: dict[str, bytes | str | int | float] = {
        "params": ckpt.theta.astype(DTYPE, copy=False).tobytes(),
        "meta": orjson.dumps(meta).decode(),
        "config": ckpt.config.model_dump_json(),
        "version": ckpt.version,
        "step": ckpt.step,
    }
    if ckpt.loss_ema is not None:
        fields["loss_ema"] = repr(ckpt.loss_ema)
    if ckpt.loss_last is not None:
        fields["loss_last"] = repr(ckpt.loss_last)
    return fields


def decode(
    *,
    params: bytes,
    meta: bytes,
    config: bytes,
    version: bytes | int,
    step: bytes | int,
    loss_ema: bytes | None = None,
    loss_last: bytes | None = None,
    cid: str = "",
    gen: int = 0,
) -> Checkpoint:
    """A checkpoint from its hash fields; ``CheckpointError`` names what does not fit."""
    try:
        cfg = ModelConfig.model_validate_json(config)
        info = orjson.loads(meta)
    except (ValidationError, orjson.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint metadata is unreadable: {exc}") from exc
    shape = cfg.shape
    if info.get("dtype") != DTYPE.str:
        raise CheckpointError(f"checkpoint dtype {info.get('dtype')!r} is not {DTYPE.str!r}")
    if len(params) != shape.size * DTYPE.itemsize:
        raise CheckpointError(
            f"checkpoint holds {len(params)} bytes, shape {shape} needs {shape.size * DTYPE.itemsize}"
        )
    theta = np.frombuffer(params, dtype=DTYPE).astype(np.float64)  # a writable, native copy
    if not np.isfinite(theta).all():
        raise CheckpointError("checkpoint holds non-finite weights")
    return Checkpoint(
        config=cfg,
        theta=theta,
        version=int(version),
        step=int(step),
        loss_ema=float(loss_ema) if loss_ema else None,
        loss_last=float(loss_last) if loss_last else None,
        cid=cid,
        gen=gen,
    )
