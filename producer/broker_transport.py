"""The producer app's kombu transport for plain ``redis://`` and ``rediss://`` brokers.

kombu's stock Redis transport keeps a connection whose server was demoted behind a stable address
(a managed service's DNS name, a proxy): a write there raises ``ReadOnlyError``, and a
``PUBLISH`` (a control broadcast) is accepted by the demoted server and heard by no worker, since
the workers listen on the promoted one. kombu's pools keep these connections per URL for the whole
process, so every later client on that address met them. This transport's connections are
demotion-aware (``producer.demotion``): a demotion seen on any of them drops the others too, and
the refused command is sent again on a new connection.

It is chosen by the producer app only (Celery's ``broker_transport``, so the URL a user reads is
unchanged); the worker has its own (``worker.consume.transport``). Sentinel URLs keep kombu's
Sentinel transport, whose connections ask the sentinels where the master is.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import Empty
from kombu.utils.json import dumps

from producer.demotion import DemotionAwareConnection, DemotionAwareSSLConnection, ServerDemotedError, stale

__all__ = ["TRANSPORT", "Channel", "Transport"]

#: A control broadcast's ``PUBLISH``, where writes are taken only. A replica accepts a plain
#: ``PUBLISH`` (heard by its own subscribers alone), and a client that only broadcasts (its reply
#: queue declared once, kombu remembers) would never learn that its server was demoted; a script
#: declared with flags and without ``no-writes`` is refused by a replica with ``READONLY``, which
#: drops the connection and sends the broadcast again, to the promoted server. Task events keep a
#: plain ``PUBLISH`` (the producer's ACL role has no ``EVAL``): each follows the task's own push,
#: a write that notices a demotion first.
PUBLISH_ON_MASTER = "#!lua\nreturn redis.call('PUBLISH', ARGV[1], ARGV[2])"
#: kombu names a mailbox's broadcast exchange ``<namespace>.pidbox`` (Celery's: ``celery.pidbox``).
MAILBOX_SUFFIX = ".pidbox"


class Channel(kombu_redis.Channel):
    connection_class = DemotionAwareConnection
    connection_class_ssl = DemotionAwareSSLConnection

    def _brpop_start(self, timeout: Any = None) -> None:
        # The reply queue's consumer connection is driven by kombu's poller, registered by its
        # socket: one made before a demotion is reconnected and registered again here, before
        # anything is sent (sending on it would raise, and drop the caller's wait for replies).
        connection = getattr(self.client, "connection", None)
        if connection is not None and connection._sock is not None and stale(connection):
            connection.disconnect()
            self.connection.cycle._register(self, self.client, "BRPOP")
        super()._brpop_start(timeout)

    def _put_fanout(self, exchange: Any, message: Any, routing_key: Any, **kwargs: Any) -> None:
        if kwargs.get("_publish_batch") is not None or not str(exchange).endswith(MAILBOX_SUFFIX):
            super()._put_fanout(exchange, message, routing_key, **kwargs)
            return
        payload = dumps(message)
        with self.conn_or_acquire() as client:
            for topic in self._get_publish_topics(exchange, routing_key):
                client.eval(PUBLISH_ON_MASTER, 0, topic, payload)

    def _brpop_read(self, **options: Any) -> Any:
        # A wait for replies left on a master that was then demoted ends with -UNBLOCKED: it took
        # nothing, so it is a wait that ended empty (the connection is dropped; the next wait
        # reconnects), not an error for whoever drains replies next (a later ping, say).
        try:
            return super()._brpop_read(**options)
        except ServerDemotedError:
            raise Empty() from None


class Transport(kombu_redis.Transport):
    Channel = Channel


#: Celery's ``broker_transport`` for the producer app on a plain Redis URL.
TRANSPORT = f"{__name__}:Transport"
