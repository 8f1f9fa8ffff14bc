"""Pool processes that fetch, train and acknowledge their own messages (``ITRAIN_POOL_FETCH=1``).

By default a worker's main process takes the messages off the queue, makes each a kombu message
and a Celery request, hands a window's worth to a pool process as one job, reads the summaries
back, acks and publishes the task events. That is ~8 turns of its event loop and two pipe
crossings a job: at 1,000 ``train_step`` events/s from 4 threads, ~390 µs of worker CPU an event,
most of it paid per job (README, "Cost").

With ``ITRAIN_POOL_FETCH=1`` each pool process runs a fetcher of its own, a thread started when
the process starts, that does the whole message path in blocking calls:

1. wait on the queue without taking (``BLMOVE q q RIGHT RIGHT``, as the transport does);
2. while messages come fast (``FetchWindow``), ask to gather the next window
   (``lua/gather.lua``: one fetcher of all workers at a time) and wait it out. How fast is the
   queue's: each fetch tells ``lua/tally.lua`` what the last one took and hears what all the
   queue's fetchers took lately (fetchers busy in turn each take only part of a stream);
3. take the window's messages with ``lua/fetch.lua``, recorded as unacknowledged in the same
   atomic step, as always;
4. train them with ``runtime.run_messages`` (lock and read, then the commit with its results), or run any
   other task's message (``predict``) through Celery's tracer, which stores its result;
5. acknowledge them with ``lua/ack.lua`` (only this delivery's records) and publish their task
   events for Flower, in batches.

The main process fetches nothing from that queue (``transport.POOL_FETCHED``): it keeps the
heartbeats, the remote control (``inspect ping``, the health check) and the sweep that gives back
the messages of a holder that died.

What stays as on the default path: no message is ever neither on the queue nor recorded; a Redis
fault under a batch gives its messages back after the growing back-off, uncounted
(``redelivery``); a batch whose training raises is run again message by message, and the message
that fails alone is dead-lettered; deliveries are counted and limited; acks of a delivery swept
back meanwhile leave the new holder's record alone.

What differs (README, "Pool fetch"): the messages of a pool process that dies (SIGKILL, the OOM
killer) come back after ``ITRAIN_VISIBILITY_TIMEOUT`` as a counted delivery, as those of a worker
that dies do (the default path runs them again at once, each alone); a worker consuming several
queues, or a pool other than prefork, keeps the default path (logged); ``--autoscale`` sees no
jobs; Flower's ``enable_events``/``disable_events`` reach the main process only.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from socket import gethostname
from typing import Any

import redis
from celery import Celery
from celery.app.trace import trace_task
from celery.concurrency import get_implementation
from celery.concurrency.prefork import TaskPool
from celery.exceptions import NotRegistered
from celery.signals import worker_init, worker_process_init, worker_process_shutdown
from kombu.serialization import loads as decode_body
from kombu.serialization import prepare_accept_content

from producer.protocol import TASK_TRAIN_BATCH, TASK_TRAIN_STEP
from producer.settings import Settings, get_settings
from worker.consume.batching import dead_letter_culprit, raw_fields
from worker.consume.faults import is_redis_fault
from worker.consume.fetch_window import FetchWindow
from worker.consume.messages import RawMessage, printable
from worker.consume.redelivery import Backoff, JobAction, after_job_failure
from worker.consume.runtime import flush_timings, run_messages
from worker.consume.task_events import (
    FLUSH_SECONDS,
    FLUSH_SIZE,
    GROUP,
    HIDDEN_ARGS,
    JsonDispatcher,
    TaskEventFields,
)
from worker.consume.transport import ACK, FETCH, GATHER, ORPHANS, POOL_FETCHED, TALLY, Channel

__all__ = ["PoolFetcher", "pool_fetch_queue"]

logger = logging.getLogger("itrain.pool_fetch")

#: The tasks whose messages ``run_messages`` trains; any other task runs through Celery's tracer.
TRAINING = frozenset({TASK_TRAIN_STEP, TASK_TRAIN_BATCH})


@dataclass(slots=True)
class _Held:
    """A message this fetcher took and has not yet acknowledged or given back."""

    tag: str
    payload: dict[str, Any]  # the envelope, its delivery fields filled in
    raw: RawMessage


class _Events(TaskEventFields):
    """A fetcher's task events, buffered and published after a batch once ``FLUSH_SECONDS`` have
    passed since the last publish (at once when the fetcher goes idle, or ``FLUSH_SIZE`` wait)."""

    def __init__(self, app: Celery, hostname: str, enabled: bool) -> None:
        self._connection = app.connection_for_write()
        self._enabled = enabled
        self._dispatcher = JsonDispatcher(
            self._connection,
            app=app,
            hostname=hostname,
            enabled=enabled,
            buffer_group=[GROUP],
            buffer_limit=FLUSH_SIZE,
        )
        self._last = time.monotonic()

    def _send(self, type_: str, **fields: Any) -> None:
        if self._enabled:
            self._dispatcher.send(type_, **fields)

    def flush(self, *, due_only: bool = False) -> None:
        now = time.monotonic()
        if due_only and now - self._last < FLUSH_SECONDS:
            return
        self._last = now
        try:
            self._dispatcher.flush()
        except Exception as exc:  # kept by the dispatcher, published with the next flush
            logger.warning("task events not published: %r", exc)

    def close(self) -> None:
        self.flush()
        self._dispatcher.close()
        self._connection.release()


class PoolFetcher:
    """One pool process's fetcher (see the module's docstring)."""

    #: Seconds a wait on the queue lasts. Then the fetcher fetches once anyway (the priority lists,
    #: messages swept back after the visibility timeout) and looks at its stop flag.
    wait_seconds = 1.0
    #: Seconds the fetcher waits after Redis failed it before it tries again.
    fault_pause = 0.5
    #: Acks sent at once, without waiting for the next fetch, when this many wait.
    ack_batch = 256
    #: Windows at most that a fetcher told that another gathers waits beyond that window.
    idle_windows = 3
    #: The queue's take rate (``lua/tally.lua``) is counted in buckets of this many ms, over this
    #: many buckets before the current one (the window's own memory: ``fetch_window.HORIZON``).
    tally_ms = 50
    tally_buckets = 4

    def __init__(self, app: Celery, hostname: str, queue: str, events: bool, settings: Settings) -> None:
        self.app = app
        self.hostname = hostname
        self.queue = queue
        self.settings = settings
        self.send_events = events
        self.window = FetchWindow(settings.batch_wait_ms / 1000.0 if settings.batch_wait_adaptive else 0.0)
        self.backoff = Backoff(settings.requeue_ceiling)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="itrain-pool-fetch", daemon=True)
        self._parent = os.getppid()
        self._node = f"{gethostname()}:{os.getpid()}:pool"
        self._connection: Any = None
        self._channel: Channel | None = None
        self._events: _Events | None = None
        #: The last fetch took some: while messages come fast, ask for the next window at once.
        self._claiming = False
        #: The last fetch was full (or stopped at its bytes): fetch again without waiting.
        self._fetch_next = True
        #: When the window this fetcher gathers is over (monotonic), or None: it fetches then.
        self._window_end: float | None = None
        #: Another fetcher gathers the queue's window until then (monotonic).
        self._ask_after = 0.0
        self._channel_margin = Channel.gather_margin
        #: Consecutive answers that another fetcher gathers the window.
        self._futile = 0
        #: The content types a message of another task may have (``accept_content``, as Celery's
        #: consumer takes it).
        self._accept = prepare_accept_content(app.conf.accept_content)  # type: ignore[no-untyped-call]
        #: Acks a lost connection kept from Redis: (tag, score), sent with the next ones.
        self._acks: list[tuple[str, float]] = []
        #: Messages taken and not yet counted in the queue's tally (told with the next fetch).
        self._untold = 0

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in hand, acknowledge it, publish its events and stop."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _stopping(self) -> bool:
        if os.getppid() != self._parent:  # the worker's main process is gone: so is its pool
            self._stop.set()
        return self._stop.is_set()

    def _run(self) -> None:
        logger.info("pool process %d fetches queue %r itself (ITRAIN_POOL_FETCH)", os.getpid(), self.queue)
        while not self._stopping():
            try:
                channel = self._channel or self._connect()
                self._cycle(channel)
            except Exception as exc:
                self._on_fault(exc)
        self._close()

    def _connect(self) -> Channel:
        self._connection = self.app.connection_for_read()
        channel: Channel = self._connection.default_channel
        self._channel = channel
        if self._events is None:
            self._events = _Events(self.app, self.hostname, self.send_events)
        return channel

    def _on_fault(self, exc: Exception) -> None:
        if is_redis_fault(exc) or isinstance(exc, redis.RedisError):
            logger.warning("pool fetch: Redis failed (%r); trying again in %g s", exc, self.fault_pause)
        else:
            logger.exception("pool fetch: unexpected error; trying again in %g s", self.fault_pause)
        self._disconnect()
        self._fetch_next = True
        self._stop.wait(self.fault_pause)

    def _disconnect(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            try:
                connection.release()
            except Exception as exc:
                logger.debug("pool fetch: closing a failed connection: %r", exc)

    def _close(self) -> None:
        if self._acks and self._channel is not None:
            try:
                self._flush_acks(self._channel)
            except Exception as exc:  # back after the visibility timeout, answered duplicate
                logger.warning("pool fetch: %d ack(s) not sent at shutdown (%r)", len(self._acks), exc)
        if self._events is not None:
            try:
                self._events.close()
            except Exception as exc:
                logger.warning("pool fetch: task events not published at shutdown (%r)", exc)
        self._disconnect()
        logger.info("pool process %d stopped fetching queue %r", os.getpid(), self.queue)

    # -- one turn: wait, gather, fetch, run ----------------------------------------------------

    def _cycle(self, channel: Channel) -> None:
        if ORPHANS:
            self._flush_acks(channel)  # an acked message must not go back
            channel._give_back_orphans()
        now = time.monotonic()
        if self._window_end is not None:  # this fetcher gathers a window: fetch once it is over
            if now < self._window_end:
                self._stop.wait(self._window_end - now)
            self._window_end = None
            self._fetch_and_run(channel)
            return
        if self._fetch_next:
            self._fetch_and_run(channel)
            return
        delay = self.window.delay(now) if self._claiming else 0.0
        if delay > 0 and now < self._ask_after:  # another fetcher gathers until then
            self._stop.wait(self._ask_after - now)
            return
        if delay <= 0:
            self._go_idle(channel)
            woke = self._client(channel).blmove(self.queue, self.queue, self.wait_seconds, "RIGHT", "RIGHT")
            if self._stopping():
                return
            delay = self.window.delay(time.monotonic()) if woke is not None else 0.0
            if delay <= 0:
                self._fetch_and_run(channel, woken=woke is not None)
                return
        asked = time.monotonic()
        self._gathered(self._script(channel, GATHER, *self._gather_arguments(channel, delay)), asked)

    def _go_idle(self, channel: Channel) -> None:
        """Before a wait on the queue: send the acks, the task events and the lock timings that
        wait."""
        self._flush_acks(channel)
        if self._events is not None:
            self._events.flush()
        flush_timings()

    @staticmethod
    def _client(channel: Channel) -> Any:
        with channel.conn_or_acquire() as client:
            return client

    def _script(self, channel: Channel, script: Any, keys: list[str], args: list[Any]) -> Any:
        client = self._client(channel)
        try:
            return client.evalsha(script.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:  # a restarted Redis forgot it
            return client.eval(script.text, len(keys), *keys, *args)

    def _gather_arguments(self, channel: Channel, delay: float) -> tuple[list[str], list[Any]]:
        keys = [channel.gather_key % self.queue, channel.gather_end_key % self.queue]
        return keys, [self._node, max(1, round(delay * 1000))]

    def _gathered(self, reply: Any, asked: float) -> None:
        """The answer of ``lua/gather.lua``, asked at ``asked``: this fetcher gathers the window
        (it fetches once the window is over, counted from when it asked), or another does (this
        one asks again once that window is over)."""
        if not isinstance(reply, list) or len(reply) != 2:  # refused (OOM, NOSCRIPT): fetch now
            self._window_end = asked
            return
        ours, ms = int(reply[0]), int(reply[1])
        if ours:
            self._futile = 0
            self._window_end = asked + ms / 1000.0
            return
        # Another fetcher gathers, and claims each next window with its fetch while it keeps up:
        # asking again at each window's end would cost a round trip a window for nothing. So
        # each answer like this one waits a window more, up to ``idle_windows``: a fetcher that
        # falls behind (a backlog: it fetches without windows) or stops is relieved within them.
        self._futile += 1
        now = time.monotonic()
        self.window.others_gather(now)
        extra = min(self._futile - 1, self.idle_windows) * self.window.longest
        self._ask_after = now + ms / 1000.0 + self._channel_margin + extra

    def _fetch_and_run(self, channel: Channel, *, woken: bool = False) -> None:
        """Take what waits (the acks of the last batch and, while messages come fast and this
        fetch is not one of a backlog, the request for the next window ride in the same round
        trip), then run it."""
        now = time.monotonic()
        claim = 0.0 if self._fetch_next else (self.window.delay(now) if self._claiming else 0.0)
        self._fetch_next = False
        want = int(channel.fetch_max)
        fetched_at = time.time()
        lists, keys, args = channel.fetch_arguments([self.queue], [want], want, fetched_at)
        acks, self._acks = self._acks[:500], self._acks[500:]
        commands: list[tuple[Any, ...]] = []
        if acks:
            ack_keys, ack_args = channel.qos.ack_arguments(acks)
            commands.append(("EVALSHA", ACK.sha, len(ack_keys), *ack_keys, *ack_args))
        commands.append(("EVALSHA", FETCH.sha, len(keys), *keys, *args))
        # What this fetcher took before, told to the queue's tally, which answers how fast all
        # its fetchers took messages together.
        told, self._untold = self._untold, 0
        commands.append(
            ("EVALSHA", TALLY.sha, 1, channel.tally_key % self.queue, told, self.tally_ms, self.tally_buckets)
        )
        if claim > 0:
            gather_keys, gather_args = self._gather_arguments(channel, claim)
            commands.append(("EVALSHA", GATHER.sha, len(gather_keys), *gather_keys, *gather_args))
        try:
            replies = _once(self._client(channel), commands)
        except channel.connection_errors:
            # Its reply is lost, and what it took may be recorded: given back once Redis answers
            # (after the acks, kept for the next try).
            self._acks[:0] = acks
            self._untold += told
            ORPHANS.add([fetched_at])
            raise
        if acks:
            ack_reply, *replies = replies
            if isinstance(ack_reply, Exception):
                self._acks[:0] = acks
                if isinstance(ack_reply, redis.exceptions.NoScriptError):
                    self._load_scripts(channel)
                else:
                    logger.warning(
                        "could not flush %d ack(s) (%r); retried with the next ones", len(acks), ack_reply
                    )
        reply, tally = replies[0], replies[1]
        self._tallied(tally, told)
        if isinstance(tally, redis.exceptions.NoScriptError) and not isinstance(
            reply, redis.exceptions.NoScriptError
        ):
            self._load_scripts(channel)  # (a Redis that had not seen it yet, or restarted)
        if claim > 0:
            self._gathered(replies[2], now)
        if isinstance(reply, redis.exceptions.NoScriptError):  # a restarted Redis forgot them
            self._load_scripts(channel)
            reply = self._script(channel, FETCH, keys, args)
        elif isinstance(reply, Exception):
            raise reply
        if not reply:
            self._claiming = False
            if woken:
                # Woken by a message that another fetcher took: it counts towards the queue's
                # rate all the same. Every idle fetcher of the queue wakes for each message and
                # one takes it; counting only its own takes, each would see its share of the
                # rate, and none would ever open a window (measured: linger_ms=2's ~250 batch
                # messages a second made a pool job each, 3.3 events a job).
                self.window.taken(1, time.monotonic())
            return
        taken = len(reply) // 5
        self._untold += taken
        self._claiming = True
        self._fetch_next = taken >= want or channel._bytes_reached(reply, lists)
        if self._fetch_next:
            self._window_end = None  # a backlog: fetch again at once, not after a window
        self.window.taken(taken, time.monotonic())
        try:
            self._run_held(channel, self._read(channel, reply, lists, fetched_at))
        except BaseException:
            # What it still holds goes back once Redis answers (acks waiting are sent first).
            ORPHANS.add([fetched_at])
            raise

    def _tallied(self, reply: Any, told: int) -> None:
        """The queue's tally answered (``lua/tally.lua``): its take rate goes to the window. A
        refusal (NOSCRIPT after a restart, OOM) keeps the count for the next fetch."""
        if isinstance(reply, Exception) or not isinstance(reply, list) or len(reply) != 2:
            self._untold += told
            return
        taken, ms = int(reply[0]), int(reply[1])
        if ms > 0:
            self.window.shared(taken * 1000.0 / ms, time.monotonic())

    def _load_scripts(self, channel: Channel) -> None:
        client = self._client(channel)
        for script in (ACK, FETCH, GATHER, TALLY):
            client.script_load(script.text)

    def _read(self, channel: Channel, reply: list[Any], lists: list[str], fetched_at: float) -> list[_Held]:
        """The messages of a fetch's reply; an item that is not a message envelope is dropped
        (logged, its record forgotten), as the transport does."""
        held: list[_Held] = []
        taken_at = channel.qos.taken_at
        for i in range(0, len(reply), 5):
            read = channel.fetched_envelope(reply, i, lists)
            if read is None:
                continue
            tag, queue, payload = read
            props = payload["properties"]
            body = payload.get("body")
            try:
                # As kombu's message reads it (a body that is not base64 raises).
                body = channel.decode_body(body, props.get("body_encoding")) if body else body  # type: ignore[no-untyped-call]
            except (ValueError, TypeError) as exc:  # binascii.Error too
                logger.error("dropped a queue item of %s that is not a message envelope: %r", queue, exc)
                channel._forget(tag)
                continue
            headers = payload.get("headers")
            name = headers.get("task") if isinstance(headers, dict) else None
            raw = raw_fields(
                name if isinstance(name, str) else "",
                headers,
                props,
                props["delivery_info"],
                body,
                payload.get("content-type"),
                payload.get("content-encoding"),
            )
            taken_at[tag] = fetched_at
            held.append(_Held(tag, payload, raw))
        return held

    def _run_held(self, channel: Channel, held: list[_Held]) -> None:
        events = self._events
        assert events is not None
        training = [h for h in held if h.raw.task in TRAINING]
        if training:
            self._train(channel, training, alone=False)
        for h in held:
            if h.raw.task not in TRAINING:
                self._run_other(channel, h)
        events.flush(due_only=True)

    # -- training messages ---------------------------------------------------------------------

    def _train(self, channel: Channel, items: list[_Held], *, alone: bool) -> None:
        events = self._events
        assert events is not None
        try:
            summaries = run_messages([h.raw for h in items], results_with_commit=True)
        except Exception as exc:
            action = after_job_failure(exc, alone=alone)
            if action is JobAction.REQUEUE:
                self._give_back_later(channel, items, exc)
            elif action is JobAction.SPLIT:
                logger.error(
                    "batch of %d message(s) not finished (%s: %s); running each alone to find the cause",
                    len(items),
                    type(exc).__name__,
                    exc,
                )
                for h in items:
                    self._train(channel, [h], alone=True)
            else:
                self._dead_letter(channel, items[0], exc)
            return
        self.backoff.reset()
        for h, summary in zip(items, summaries, strict=True):
            events.outcome(summary, name=h.raw.task)
        # Late ack: only now are the results and weights in Redis.
        self._ack(channel, items)

    def _dead_letter(self, channel: Channel, h: _Held, exc: BaseException) -> None:
        try:
            error, shown = dead_letter_culprit(h.raw, exc)
        except Exception as fault:
            if not is_redis_fault(fault):
                logger.exception("task %s could not be dead-lettered", printable(h.raw.task_id))
            self._give_back_later(channel, [h], fault)
            return
        assert self._events is not None
        self._events.failed(h.raw.task_id, error, shown, name=h.raw.task)
        self._ack(channel, [h])

    # -- any other task (predict) --------------------------------------------------------------

    def _run_other(self, channel: Channel, h: _Held) -> None:
        """Run a message of another task as Celery's pool would (its tracer stores the result), or
        drop one of an unregistered task or an undecodable body, as Celery's consumer does."""
        events = self._events
        assert events is not None
        name, task_id = h.raw.task, h.raw.task_id
        message = channel.Message(h.payload, channel=channel)
        task = self.app.tasks.get(name)
        try:
            if task is None:
                raise NotRegistered(name)
            args, kwargs, _ = decode_body(  # type: ignore[no-untyped-call]
                message.body,
                message.content_type,
                message.content_encoding,
                accept=self._accept,
            )
        except Exception as exc:
            logger.error("dropped a message of task %r (id %s): %r", printable(name), printable(task_id), exc)
            events.failed(task_id, repr(exc), HIDDEN_ARGS, name=name)
            self._ack(channel, [h])
            return
        request = {
            **(message.headers if isinstance(message.headers, dict) else {}),
            "id": task_id,
            "delivery_info": message.delivery_info,
            "hostname": self.hostname,
            "argsrepr": HIDDEN_ARGS,
            "kwargsrepr": "{}",
        }
        try:
            out = trace_task(task, task_id, args, kwargs, request, app=self.app)
        except Exception as exc:
            if is_redis_fault(exc):
                self._give_back_later(channel, [h], exc)
                return
            raise
        if out.info is None:
            events.succeeded(task_id, out.retval, out.runtime, HIDDEN_ARGS, name=name)
        else:
            events.failed(task_id, repr(out.retval), HIDDEN_ARGS, name=name)
        self._ack(channel, [h])

    # -- acks and give-backs --------------------------------------------------------------------

    def _ack(self, channel: Channel, items: list[_Held]) -> None:
        taken_at = channel.qos.taken_at
        for h in items:
            score = taken_at.pop(h.tag, None)
            if score is not None:
                self._acks.append((h.tag, score))
        # They ride with the next fetch (``_fetch_and_run``), or go before a wait on the queue
        # (``_go_idle``): no round trip of their own while messages keep coming.
        if len(self._acks) >= self.ack_batch:
            try:
                self._flush_acks(channel)
            except Exception as exc:  # kept, and sent before anything else once Redis answers
                logger.warning(
                    "could not flush %d ack(s) (%r); retried with the next ones", len(self._acks), exc
                )

    def _flush_acks(self, channel: Channel) -> None:
        """Remove the acknowledged deliveries' records (``lua/ack.lua``); kept for the next try on
        a connection error (worst case: swept back after the visibility timeout and answered
        ``duplicate``)."""
        rows, self._acks = self._acks, []
        if not rows:
            return
        try:
            channel.qos._forget_acked(self._client(channel), rows)
        except Exception:
            self._acks[:0] = rows
            raise

    def _give_back_later(self, channel: Channel, items: list[_Held], exc: BaseException) -> None:
        """A Redis fault under ``items``: give them back after the back-off (not a delivery)."""
        delay = self.backoff.next_delay()
        reason = f"Redis failed ({type(exc).__name__}: {exc})"
        logger.warning("%s under %d message(s); requeued in %.1f s", reason, len(items), delay)
        self._stop.wait(delay)  # a stop gives them back at once
        events = self._events
        assert events is not None
        for h in items:
            events.retried(h.raw.task_id, f"requeued: {reason}")
        tags = [h.tag for h in items]
        scores = {channel.qos.taken_at[tag] for tag in tags if tag in channel.qos.taken_at}
        try:
            channel.qos.give_back(tags, self._client(channel), leftmost=True)
        except Exception as fault:
            ORPHANS.add(scores)  # given back once Redis answers again (``_cycle``)
            logger.warning("could not give %d message(s) back yet (%r)", len(tags), fault)
        finally:
            for tag in tags:
                channel.qos.taken_at.pop(tag, None)


def _once(client: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
    """The replies to ``commands``, sent in one round trip and never again: redis-py retries a
    command whose connection was lost, and a fetch sent again takes other messages while those
    of the lost reply stay recorded as this worker's (they are given back instead:
    ``ORPHANS``). A reply that is an error comes back as the exception."""
    pool = client.connection_pool
    connection = pool.get_connection()
    try:
        connection.send_packed_command(connection.pack_commands(commands))
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(connection.read_response())
            except redis.ResponseError as exc:
                replies.append(exc)
        return replies
    except BaseException:
        connection.disconnect()
        raise
    finally:
        pool.release(connection)


# -- wiring: the main process decides, each pool process starts its fetcher ----------------------

#: (app, worker hostname, queue, task events on) decided by the main process at ``worker_init``;
#: a pool process inherits it when it forks.
_plan: tuple[Celery, str, str, bool] | None = None
_fetcher: PoolFetcher | None = None


def pool_fetch_queue(queues: list[str], pool: Any, settings: Settings) -> str | None:
    """The queue the pool processes fetch themselves, or None (the default path): with
    ``ITRAIN_POOL_FETCH``, a prefork worker on one queue. Why not is logged."""
    if not settings.pool_fetch:
        return None
    try:
        prefork = issubclass(get_implementation(pool), TaskPool)
    except Exception:
        prefork = False
    if not prefork:
        logger.warning("ITRAIN_POOL_FETCH needs the prefork pool; pool %r keeps the default path", pool)
        return None
    if len(queues) != 1:
        logger.warning(
            "ITRAIN_POOL_FETCH serves a worker on one queue; this one consumes %d (%s) and keeps the "
            "default path",
            len(queues),
            ", ".join(queues),
        )
        return None
    return queues[0]


def _decide(sender: Any = None, **_: Any) -> None:
    global _plan
    if sender is None or not hasattr(sender, "app"):
        return
    queues = sorted(sender.app.amqp.queues.consume_from)
    queue = pool_fetch_queue(queues, sender.pool_cls, get_settings())
    if queue is None:
        return
    POOL_FETCHED.add(queue)
    _plan = (sender.app, sender.hostname, queue, bool(getattr(sender, "task_events", True)))


def _start(**_: Any) -> None:
    global _fetcher
    if _plan is None:
        return
    app, hostname, queue, events = _plan
    _fetcher = PoolFetcher(app, hostname, queue, events, get_settings())
    _fetcher.start()


def _stop(**_: Any) -> None:
    if _fetcher is not None:
        _fetcher.stop()


worker_init.connect(_decide, weak=False)
worker_process_init.connect(_start, weak=False)
worker_process_shutdown.connect(_stop, weak=False)
