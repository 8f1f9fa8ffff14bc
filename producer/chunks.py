"""One result per ``train_many`` chunk: its stored form, and how each event's handle reads it.

A ``train_many`` chunk (one ``itrain.train_batch`` message sent with a single argument, the list
of events) gets one result, under ``celery-task-meta-<chunk id>``, instead of a key per event: a
key costs Redis ~60 bytes of bookkeeping and two commands per event, and the chunk's result
costs ~70 bytes an event and one command per chunk. The stored value is a Celery result meta
(``AsyncResult(chunk_id).get()`` returns its ``result``), whose ``result`` is::

    {"model": "default",                  # or a list, one model per event
     "ids": ["<event id>", ...],          # the events' ids, in the chunk's order
     "results": [entry, ...]}             # one per event, same order

and each entry is ``[step, version, loss]`` for a trained event (the common case, kept short),
the full result object for any other outcome (``{"status": "duplicate", ...}``,
``{"status": "skipped", ...}``), or Celery's exception form (``{"exc_type", "exc_message",
"exc_module"}``) for a failed one. A message refused whole stores a FAILURE meta instead; every
event of the chunk then reads that failure.

Each event's handle has the id ``<chunk id>:<index>`` (``handle_id``); ``event_meta`` turns the
chunk's meta into the Celery meta that event would have had with a key of its own.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "chunk_result",
    "event_meta",
    "event_state",
    "handle_id",
    "handle_ids",
    "is_chunk_result",
    "merge_chunk",
    "parse_handle_id",
]

_SEPARATOR = ":"


def handle_id(chunk_id: str, index: int) -> str:
    """The id of the handle of event ``index`` of chunk ``chunk_id``."""
    return f"{chunk_id}{_SEPARATOR}{index}"


def handle_ids(chunk_id: str, n: int) -> list[str]:
    """The ids of the handles of all ``n`` events of chunk ``chunk_id``, in order."""
    prefix = chunk_id + _SEPARATOR
    return [prefix + str(i) for i in range(n)]


def parse_handle_id(value: str) -> tuple[str, int] | None:
    """(chunk id, index) of a chunk event's handle id; None for any other id."""
    chunk_id, sep, index = value.rpartition(_SEPARATOR)
    if not sep or not chunk_id or not index.isdigit():
        return None
    return chunk_id, int(index)


def chunk_result(models: list[str], event_ids: list[str | None], entries: list[Any]) -> dict[str, Any]:
    """The ``result`` of a chunk's meta. ``models`` names each trained event's model ("" for the
    others): stored once when they are all the same. ``event_ids`` holds None for an event whose
    id could not be read."""
    named = {m for m in models if m}
    model: str | list[str] = named.pop() if len(named) == 1 else models
    return {"model": model, "ids": event_ids, "results": entries}


def is_chunk_result(meta: Any) -> bool:
    """Whether a decoded meta is a chunk's (SUCCESS with the chunk form, or a FAILURE)."""
    if not isinstance(meta, dict):
        return False
    result = meta.get("result")
    if meta.get("status") == "FAILURE":
        return isinstance(result, dict) and "exc_type" in result
    return (
        meta.get("status") == "SUCCESS"
        and isinstance(result, dict)
        and isinstance(result.get("ids"), list)
        and isinstance(result.get("results"), list)
        and len(result["ids"]) == len(result["results"])
    )


def event_meta(chunk: dict[str, Any], index: int, task_id: str) -> dict[str, Any]:
    """The Celery meta of event ``index``, read from its chunk's decoded meta."""
    status, result = event_state(chunk, index, task_id)
    return {
        "status": status,
        "result": result,
        "traceback": None,
        "children": [],
        "date_done": chunk.get("date_done"),
        "task_id": task_id,
    }


def event_state(
    chunk: dict[str, Any], index: int, task_id: str, *, checked: bool | None = None
) -> tuple[Any, Any]:
    """(status, result) of event ``index`` in its chunk's decoded meta: the parts of its
    ``event_meta`` that ``TrainingClient.wait_all`` reads, without building the rest.
    ``checked``: ``is_chunk_result(chunk)`` when the caller knows it already (it reads many
    events of one chunk)."""
    status = chunk.get("status")
    if status != "SUCCESS":
        return status, chunk.get("result")  # the whole message failed (or is not ready): so did every event
    if not (is_chunk_result(chunk) if checked is None else checked):
        return "FAILURE", _not_a_chunk(task_id)
    body = chunk["result"]
    if not 0 <= index < len(body["ids"]):
        return "FAILURE", _not_a_chunk(task_id)
    entry = body["results"][index]
    if isinstance(entry, list):
        model = body["model"] if isinstance(body["model"], str) else body["model"][index]
        step, version, loss = entry
        trained = {
            "status": "trained",
            "model": model,
            "event_id": body["ids"][index],
            "step": step,
            "version": version,
            "loss": loss,
        }
        return "SUCCESS", trained
    if isinstance(entry, dict) and "exc_type" in entry:
        return "FAILURE", entry
    if entry is None:
        return "PENDING", None  # not answered (never written by a worker of this version)
    return "SUCCESS", entry


def merge_chunk(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any] | None:
    """The chunk meta to store when ``new`` meets an earlier ``old`` one, or None to keep ``old``.

    Results are write-once, event by event, with one exception: a ``trained`` entry replaces an
    earlier entry of the same event that is not ``trained`` (a FAILURE, ``skipped``,
    ``duplicate``), as for a result of its own; an event not answered yet takes any answer. A
    chunk whose events differ from the stored chunk's changes nothing (a message cannot take
    over another's results).
    """
    if not is_chunk_result(new):
        return None
    if old.get("status") == "FAILURE":
        return new if is_chunk_result(old) else None  # the message trained this time
    if not is_chunk_result(old):
        return None
    old_ids, new_ids = old["result"]["ids"], new["result"]["ids"]
    if len(old_ids) != len(new_ids) or any(a != b for a, b in zip(old_ids, new_ids, strict=False) if a and b):
        return None
    was, now = old["result"]["results"], new["result"]["results"]
    take = [
        (o is None and n is not None) or (_trained(n) and not _trained(o))
        for o, n in zip(was, now, strict=True)
    ]
    if not any(take):
        return None
    sources = [new["result"] if t else old["result"] for t in take]
    models = [_model_at(src, i) if _trained(src["results"][i]) else "" for i, src in enumerate(sources)]
    body = chunk_result(
        models,
        [a or b for a, b in zip(old_ids, new_ids, strict=True)],
        [src["results"][i] for i, src in enumerate(sources)],
    )
    return {**old, "result": body, "date_done": new.get("date_done")}


def _model_at(body: dict[str, Any], index: int) -> str:
    model = body["model"]
    return model if isinstance(model, str) else str(model[index])


def _trained(entry: Any) -> bool:
    return isinstance(entry, list)


def _not_a_chunk(task_id: str) -> dict[str, Any]:
    return {
        "exc_type": "ItrainError",
        "exc_message": [f"the result stored for {task_id}'s chunk is not a train_many chunk result"],
        "exc_module": "producer.errors",
    }
