"""The tests' forwarder is the dev tools' one (``worker/devtools/forwarder.py``): a stable address in
front of a Redis that can be replaced, with a network delay and a partition when asked."""

from __future__ import annotations

from worker.devtools.forwarder import Forwarder

__all__ = ["Forwarder"]
