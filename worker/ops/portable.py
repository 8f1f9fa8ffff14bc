"""``itrain export`` / ``itrain import``: a model as a portable file, and back.

The file is a NumPy ``.npz`` (a zip of ``.npy`` arrays, read with ``allow_pickle=False``: nothing
in it can run code) holding two arrays:

- ``params``: the weights, little-endian float64, ``[W1, b1, W2, b2]`` flattened in that order;
- ``header``: one JSON text (a 0-d unicode array) with everything needed to use them:
  the format and its version, the model's name, layer sizes and activations
  (``inputs -> hidden (tanh) -> outputs (sigmoid)``), the training configuration (learning rate,
  gradient clip, seed, mode), the checkpoint's version, step and running loss, the feature
  specification (``FEATURE_SPEC``: which inputs, in which order, hashed how) and the target mapping
  (``ITRAIN_TARGETS`` when exported).

An import validates all of it (format, sizes, finiteness, feature specification) before writing
anything, and installs the weights as a new version of the model (``Store.create``): the version
keeps rising, ``step`` is the file's, and a new generation of event markers starts (the imported
model has not seen this deployment's events). A corrupt, truncated or mismatched file is refused
with a one-line ``CheckpointError`` and the model is left as it was.
"""

from __future__ import annotations

import re
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from producer.errors import CheckpointError, ModelNotInitialisedError
from producer.events import MODEL_NAME_PATTERN
from worker.engine.checkpoint import DTYPE, Checkpoint, ModelConfig
from worker.store.model_store import Store

__all__ = ["FEATURE_SPEC", "FORMAT", "Header", "export_model", "import_model", "read_export"]

FORMAT = "interaction-trainer/model"
FORMAT_VERSION = 1
#: What the network's inputs are; a file trained on other inputs cannot be used here.
FEATURE_SPEC: dict[str, Any] = {
    "inputs": ["action_hash", "time_of_day", "user_hash", "has_context"],
    "hash": "blake2b-64, scaled to [-1, 1]",
    "time_of_day": "UTC seconds since midnight / 86400",
}


class Layers(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    inputs: int
    hidden: int
    outputs: int
    hidden_activation: Literal["tanh"] = "tanh"
    output_activation: Literal["sigmoid"] = "sigmoid"


class Header(BaseModel):
    """The JSON header of an export."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["interaction-trainer/model"]
    format_version: Literal[1]
    model: str = Field(pattern=MODEL_NAME_PATTERN)
    layers: Layers
    config: ModelConfig
    version: int = Field(ge=1)
    step: int = Field(ge=0)
    loss_ema: float | None = Field(default=None, allow_inf_nan=False)
    loss_last: float | None = Field(default=None, allow_inf_nan=False)
    features: dict[str, Any]
    targets: dict[str, float]
    exported_at: str


def export_model(store: Store, model: str, out: Path, targets: dict[str, float]) -> Header:
    """Write ``model``'s current checkpoint to ``out`` (``.npz``); returns what was written."""
    ckpt = store.load(model)
    if ckpt is None:
        raise ModelNotInitialisedError(f"model {model!r} does not exist; `itrain models` lists the models")
    shape = ckpt.config.shape
    header = Header(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        model=model,
        layers=Layers(inputs=shape.inputs, hidden=shape.hidden, outputs=shape.outputs),
        config=ckpt.config,
        version=ckpt.version,
        step=ckpt.step,
        loss_ema=ckpt.loss_ema,
        loss_last=ckpt.loss_last,
        features=FEATURE_SPEC,
        targets=targets,
        exported_at=datetime.now(UTC).isoformat(),
    )
    with out.open("wb") as f:  # (np.savez would add ".npz" to a name without it)
        np.savez(f, params=ckpt.theta.astype(DTYPE), header=np.array(header.model_dump_json()))
    return header


def _check_format_version(path: Path, fields: Any) -> None:
    """A file of a newer format is refused naming both versions (its other fields may mean
    something this release does not know, so they are not read)."""
    found = fields.get("format_version") if isinstance(fields, dict) else None
    if type(found) is int and found > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: export format {found} is newer than this release reads (format {FORMAT_VERSION}): "
            "upgrade interaction-trainer"
        )


def read_export(path: Path) -> tuple[Header, np.ndarray]:
    """The header and weights of an export, fully checked; ``CheckpointError`` names what is wrong."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if set(data.files) != {"params", "header"}:
                raise CheckpointError(f"{path} holds {sorted(data.files)}, not an export's params and header")
            params, raw_header = data["params"], data["header"]
    except CheckpointError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path} is not a readable export: {type(exc).__name__}: {exc}") from None
    if raw_header.shape != () or raw_header.dtype.kind != "U":
        raise CheckpointError(f"{path}: the header is not one JSON text")
    try:
        fields = orjson.loads(str(raw_header))
        _check_format_version(path, fields)
        header = Header.model_validate(fields)
    except (orjson.JSONDecodeError, ValidationError) as exc:
        first = exc.errors(include_url=False)[0] if isinstance(exc, ValidationError) else None
        where = ".".join(str(p) for p in first["loc"]) + f": {first['msg']}" if first else str(exc)
        raise CheckpointError(f"{path}: the header is not valid: {where}") from None
    shape = header.config.shape
    if (header.layers.inputs, header.layers.hidden, header.layers.outputs) != (
        shape.inputs,
        shape.hidden,
        shape.outputs,
    ):
        raise CheckpointError(f"{path}: the layer sizes disagree with the configuration")
    if header.features != FEATURE_SPEC:
        raise CheckpointError(f"{path}: trained on other inputs than this version uses: {header.features}")
    if params.dtype != DTYPE or params.ndim != 1 or params.size != shape.size:
        raise CheckpointError(
            f"{path}: the weights are {params.dtype} x {params.shape}; "
            f"{shape.inputs}-{shape.hidden}-{shape.outputs} needs {shape.size} little-endian float64"
        )
    if not np.isfinite(params).all():
        raise CheckpointError(f"{path}: the weights hold non-finite values")
    return header, params.astype(np.float64)


def import_model(store: Store, path: Path, model: str | None, *, force: bool) -> tuple[str, int, Header]:
    """Install an export as a new version of ``model`` (the file's name for it by default);
    returns (model, version, header). Without ``force`` an existing model is left alone."""
    header, theta = read_export(path)
    name = model or header.model
    if not re.fullmatch(MODEL_NAME_PATTERN, name):
        raise CheckpointError(f"model name {name!r} is not 1-64 letters, digits, '_', '.' or '-'")
    ckpt = Checkpoint(
        config=header.config,
        theta=theta,
        version=0,
        step=header.step,
        loss_ema=header.loss_ema,
        loss_last=header.loss_last,
    )
    return name, store.create(name, ckpt, force=force), header
