"""``itrain``: the command line. Every command exits 0 on success; on bad input or an unreachable
Redis it prints one line on stderr (no traceback) and exits non-zero."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from kombu.exceptions import OperationalError
from pydantic import ValidationError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from producer.client import TrainingClient
from producer.errors import ConfigurationError, ItrainError, ModelNotInitialisedError
from producer.events import MODEL_NAME_PATTERN, describe_validation_error, event_json_schema
from producer.keys import ModelKeys
from producer.redis_conn import connect, redact_url
from producer.routes import check_queue_name
from producer.server_version import check_server_versions
from producer.settings import Settings, get_settings
from producer.stats import read_stats
from worker.devtools.pacing import send_paced
from worker.devtools.synthetic import ACTIONS, synthetic_events
from worker.engine.checkpoint import Checkpoint, ModelConfig
from worker.engine.guard import Guard
from worker.output import Output
from worker.store.guard import resume, set_guard
from worker.store.layout import check_store_layout, stamp_new_store
from worker.store.model_store import Store

__all__ = ["main", "build_parser"]

# A terminal gets rich's tables and colours; a file or a pipe gets whole lines, tables as Markdown
# (worker/output.py).
out = Output()
err = Output(stderr=True, soft_wrap=True)  # an error is one line, on a terminal too

EXIT_FAIL = 1
EXIT_USAGE = 2

#: Commands that use no configured Redis (``schema``; ``acl`` prints lines for any server) or
#: check the one they use themselves (``up``, ``demo`` and ``bench`` may start their own). Every
#: other command first checks the version of each configured Redis (``producer.server_version``).
_NO_VERSION_CHECK = frozenset({"schema", "acl", "up", "demo", "bench", "failover"})
#: Commands that do not read the store, or read its layout themselves (``migrate``). Every other
#: command first checks that this release reads the store's layout (``worker.store.layout``).
_NO_LAYOUT_CHECK = _NO_VERSION_CHECK | {"migrate", "produce", "predict"}


# -- commands ----------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace, settings: Settings) -> int:
    if not re.fullmatch(MODEL_NAME_PATTERN, args.model):
        raise ValueError(f"--model must be 1 to 64 of A-Z a-z 0-9 _ . - (as in events), got {args.model!r}")
    config = ModelConfig(
        hidden=args.hidden, outputs=args.outputs, lr=args.lr, clip=args.clip, seed=args.seed, mode=args.mode
    )
    guard = _guard_args(args.guard_window, args.guard_ratio)
    if args.queue is not None:
        check_queue_name(args.queue, settings.queue)  # before anything is written
    store = Store(connect(settings.store, settings.publish_timeout), settings)
    stamp_new_store(store.client)  # a new store starts at this release's layout
    if args.exist_ok and not args.force and args.model in store.models():
        note = " (its guard too: `itrain guard` changes one)" if guard else ""
        note += " (its queue too: `itrain route` moves it)" if args.queue is not None else ""
        out.print(f"model [bold]{args.model}[/] exists; left unchanged{note}")
        return 0
    version = store.create(args.model, Checkpoint.initial(config), force=args.force)
    out.print(
        f"model [bold]{args.model}[/] initialised at version {version}: "
        f"4 -> {config.hidden} -> {config.outputs}, lr {config.lr:g}, clip {config.clip:g}, "
        f"seed {config.seed}, mode {config.mode}"
    )
    if args.queue is not None:
        _route(args.model, args.queue, settings)
    if guard is not None:
        set_guard(store.client, args.model, guard, settings)
        out.print(
            f"guard: pause and roll back when the log loss of any {guard.window} consecutive events "
            f"exceeds {guard.ratio:g} x the best recent snapshot's"
        )
    return 0


def _guard_args(window: int | None, ratio: float | None) -> Guard | None:
    if window is None and ratio is None:
        return None
    if window is None or ratio is None:
        raise ConfigurationError("a guard needs both --guard-window and --guard-ratio")
    return Guard(window, ratio)


def cmd_guard(args: argparse.Namespace, settings: Settings) -> int:
    client = connect(settings.store, settings.publish_timeout)
    if args.off:
        set_guard(client, args.model, None, settings)
        out.print(f"model {args.model}: guard removed")
        return 0
    guard = _guard_args(args.window, args.ratio)
    if guard is None:
        raise ConfigurationError("give --window W --ratio R, or --off")
    set_guard(client, args.model, guard, settings)
    out.print(
        f"model {args.model}: guard set (window {guard.window} events, ratio {guard.ratio:g}); a new "
        "baseline: it arms at the next snapshot taken with that window full"
    )
    return 0


def cmd_resume(args: argparse.Namespace, settings: Settings) -> int:
    was_paused = resume(connect(settings.store, settings.publish_timeout), args.model, settings)
    state = "resumed: training again" if was_paused else "was not paused; its evaluation window restarted"
    out.print(f"model {args.model} {state}")
    return 0


def cmd_stats(args: argparse.Namespace, settings: Settings) -> int:
    client = connect(settings.store, settings.publish_timeout)
    stats = read_stats(client, args.model)
    if not stats["initialized"]:
        # A misspelt name must not look like a model with no events (zeros and exit 0).
        raise ModelNotInitialisedError(
            f"model {args.model!r} does not exist; `itrain models` lists the models, "
            f"`itrain init --model {args.model}` creates it"
        )
    if args.json:
        print(json.dumps(stats))
        return 0
    from worker.ops.master import describe_master

    print_stats(stats, master=describe_master(settings.store, client, settings.publish_timeout))
    return 0


def _mib(size: int) -> str:
    return f"{size / 1_048_576:.1f} MiB"


def print_stats(stats: dict[str, Any], master: str | None = None) -> None:
    """``stats`` as a table; ``master``: which server is the master now (a row of the table only:
    the JSON keys are the contract's)."""
    table = Table(title=f"model {stats['model']}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    if master is not None:
        table.add_row("master", Text(master))
    for key, value in stats.items():
        if key == "interactions_by_action":
            # Action names come from events (any text): shown escaped, never as terminal codes.
            value = ", ".join(f"{terminal_safe(k)} {v}" for k, v in value.items()) or "-"
        elif key == "redis_memory_used":
            value = f"{value} B ({_mib(value)})"
        elif key == "eval" and value is not None:
            table.add_row("eval", Text(_eval_text(value)))
            table.add_row("guard", Text(_guard_text(value["guard"])))
            continue
        elif isinstance(value, float):
            value = f"{value:.6f}"
        table.add_row(key, Text("-" if value is None else str(value)))  # Text: no markup read
    out.print(table)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _eval_text(ev: dict[str, Any]) -> str:
    """The online evaluation, one line for the window and the total, one per action."""

    def line(name: str, m: dict[str, Any]) -> str:
        t = m["total"]
        return (
            f"{name}: last {m['count']} logloss {_fmt(m['logloss'])} mse {_fmt(m['mse'])} "
            f"acc {_fmt(m['accuracy'])} auc {_fmt(m['auc'])} | all {t['count']} logloss "
            f"{_fmt(t['logloss'])} mse {_fmt(t['mse'])} acc {_fmt(t['accuracy'])}"
        )

    rows = [line(f"window {ev['window']}", ev)]
    rows += [line(terminal_safe(name), m) for name, m in ev["by_action"].items()]
    return "\n".join(rows)


def _guard_text(guard: dict[str, Any]) -> str:
    text = (
        "none"
        if guard["window"] is None
        else f"window {guard['window']}, ratio {guard['ratio']:g}, reference "
        f"{_fmt(guard['reference_loss'])} (snapshot {guard['reference_version'] or '-'})"
    )
    return text + f", trips {guard['trips']}" + (", PAUSED" if guard["paused"] else "")


def terminal_safe(text: str) -> str:
    """``text`` with every control and non-printable character escaped (``\\x1b``, ``\\n``)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    from worker.ops.routing import read_routes

    client = connect(settings.store, settings.publish_timeout)
    store = Store(client, settings)
    routes = read_routes(connect(settings.broker, settings.publish_timeout))
    table = Table(
        "model",
        "queue",
        "version",
        "step",
        "loss_ema",
        "eval logloss",
        "last update (UTC)",
        "history",
        "dead letters",
    )
    models = store.models()
    queues = {name: routes.get(name, settings.queue) for name in models}
    for name in models:
        s = read_stats(client, name)
        ema = "-" if s["loss_ema"] is None else f"{s['loss_ema']:.6f}"
        ev = "-" if s["eval"] is None else _fmt(s["eval"]["logloss"])
        if s["eval"] is not None and s["eval"]["guard"]["paused"]:
            ev += " (paused)"
        updated = client.hget(ModelKeys(name).ckpt, "updated_at")
        when = "-" if updated is None else f"{datetime.fromtimestamp(float(updated), UTC):%Y-%m-%d %H:%M:%S}"
        shown = Text(terminal_safe(name))  # (names written by other tools may hold anything)
        table.add_row(
            shown,
            Text(terminal_safe(queues[name])),
            str(s["version"]),
            str(s["step"]),
            ema,
            ev,
            when,
            str(s["history_len"]),
            str(s["dead_letters"]),
        )
    out.print(table)
    if not args.no_workers_check:
        _warn_unserved(queues, settings)
    return 0


def _warn_unserved(queues: dict[str, str], settings: Settings) -> None:
    """A line on stderr for each queue of ``queues`` (model -> queue) that no live worker
    consumes (its events wait there until one does), or that no model can be routed to."""
    from producer.celery_config import make_celery
    from producer.errors import QueueNameError
    from worker.ops.routing import consumed_queues, unserved

    by_queue: dict[str, list[str]] = {}
    for model, queue in queues.items():
        by_queue.setdefault(queue, []).append(model)
    for queue, models in by_queue.items():
        try:
            check_queue_name(queue, settings.queue)
        except QueueNameError as exc:
            err.print(f"warning: {_models_text(models)}: {exc}", markup=False, highlight=False)
    if not by_queue:
        return
    app = make_celery(settings, main="itrain-cli", producer=True)
    try:
        consumed = consumed_queues(app)
    finally:
        app.close()
    for queue in unserved(by_queue, consumed):
        err.print(
            f"warning: no live worker consumes queue {terminal_safe(queue)!r} "
            f"({_models_text(by_queue[queue])}): its events wait until a worker does "
            f"(ITRAIN_QUEUES or celery -Q)",
            markup=False,
            highlight=False,
        )


def _models_text(models: list[str]) -> str:
    shown = ", ".join(terminal_safe(m) for m in models[:5])
    return f"model{'s' if len(models) > 1 else ''} {shown}" + (
        f" and {len(models) - 5} more" if len(models) > 5 else ""
    )


def _route(model: str, queue: str, settings: Settings) -> str:
    """Route ``model`` to ``queue`` and say so (with a warning when no live worker consumes it);
    returns the queue it had."""
    from worker.ops.routing import set_route

    old = set_route(connect(settings.broker, settings.publish_timeout), model, queue, settings.queue)
    if old == queue:
        out.print(f"model {model}: queue {queue} (unchanged)", markup=False, highlight=False)
    else:
        out.print(f"model {model}: queue {old} -> {queue}", markup=False, highlight=False)
    _warn_unserved({model: queue}, settings)
    return old


def cmd_route(args: argparse.Namespace, settings: Settings) -> int:
    store = Store(connect(settings.store, settings.publish_timeout), settings)
    if args.model not in store.models():
        raise ModelNotInitialisedError(
            f"model {args.model!r} does not exist; `itrain models` lists the models, "
            f"`itrain init --model {args.model} --queue {args.queue}` creates it on that queue"
        )
    check_queue_name(args.queue, settings.queue)
    old = _route(args.model, args.queue, settings)
    if old != args.queue:
        out.print(
            f"producers send {args.model}'s events to {args.queue} within ITRAIN_ROUTES_TTL="
            f"{settings.routes_ttl:g} s; keep a worker on {old} until it is empty (they still train)",
            markup=False,
            highlight=False,
        )
    return 0


def cmd_dead_letters(args: argparse.Namespace, settings: Settings) -> int:
    from worker.ops.dead_letters import read_dead_letters

    client = connect(settings.store, settings.publish_timeout)
    letters, total = read_dead_letters(client, args.model, args.limit)
    if args.json:
        shown = [letter.as_json() for letter in letters]
        print(json.dumps({"model": args.model, "total": total, "dead_letters": shown}))
        return 0
    table = Table(
        "time (UTC)",
        "event id",
        "error",
        "message",
        "deliveries",
        title=f"dead letters of {args.model}: newest {len(letters)} of {total}",
    )
    for letter in letters:
        when = "-" if letter.time is None else letter.time.replace("T", " ")[:19]
        event = letter.event_id or (f"[{letter.events} events]" if letter.events else "-")
        # Texts come from events and errors (any text): shown escaped, never as terminal codes.
        table.add_row(
            when,
            Text(terminal_safe(event)),
            Text(terminal_safe(letter.error or "-")),
            Text(terminal_safe(letter.message or "-")),
            "-" if letter.deliveries is None else str(letter.deliveries),
        )
    out.print(table)
    return 0


def cmd_plot(args: argparse.Namespace, settings: Settings) -> int:
    from worker.ops.plot import plot_loss, read_loss_series

    series = read_loss_series(connect(settings.store, settings.publish_timeout), args.model)
    path = plot_loss(series, args.out, window=args.window)
    out.print(f"wrote {path} ({len(series.steps)} events, steps {series.steps[0]}-{series.steps[-1]})")
    return 0


def cmd_exporter(args: argparse.Namespace, settings: Settings) -> int:
    from worker.ops.exporter import DEFAULT_PORT, serve
    from worker.ops.exporter_http import access_from_settings

    access = access_from_settings(settings)  # a bad password file or key fails before Redis is tried
    client = connect(settings.store, settings.publish_timeout)
    client.ping()  # an unreachable Redis is a one-line error now, not an exporter that reports 0
    port = args.port or DEFAULT_PORT
    # ITRAIN_QUEUE first (where unrouted models' events go), then ITRAIN_QUEUES and the routes'.
    queues = list(dict.fromkeys([settings.queue, *settings.queue_names]))
    stop = serve(client, queues, port, args.address, access)
    auth = f", basic auth as user {access.user}" if access.password is not None else ""
    out.print(
        f"serving Prometheus metrics on {access.scheme}://{args.address}:{port}/metrics{auth} (Ctrl-C stops)",
        markup=False,
        highlight=False,
    )
    stop.wait()
    return 0


def cmd_acl(args: argparse.Namespace, settings: Settings) -> int:
    from worker.ops.acl import acl_lines, unknown_commands

    try:
        # Commands the configured server lacks cannot be named (CLIENT SETINFO before 7.2).
        unknown = unknown_commands(connect(settings.store, min(settings.publish_timeout, 2.0)))
    except redis.RedisError:
        unknown = set()  # not reachable from here: the lines are for a current Redis
    user = args.user or f"itrain-{args.role}"
    queues = None
    if args.queues is not None:
        if args.role not in ("producer", "reader"):
            raise ConfigurationError("--queues limits a producer or reader role to some queues")
        queues = [check_queue_name(q.strip(), settings.queue) for q in args.queues.split(",") if q.strip()]
        if not queues:
            raise ConfigurationError("--queues names no queue")
    for line in acl_lines(args.role, user, settings.queue, args.password, unknown, queues=queues):
        print(line)
    return 0


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    from worker.ops.portable import export_model

    store = Store(connect(settings.store, settings.publish_timeout), settings)
    header = export_model(store, args.model, args.out, settings.targets)
    out.print(f"wrote {args.out}: model {header.model}, version {header.version}, step {header.step}")
    return 0


def cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    from worker.ops.portable import import_model

    store = Store(connect(settings.store, settings.publish_timeout), settings)
    model, version, header = import_model(store, args.file, args.model, force=args.force)
    out.print(
        f"model {model} is now version {version}: the weights of {header.model} version {header.version}, "
        f"step {header.step}"
    )
    return 0


def cmd_snapshots(args: argparse.Namespace, settings: Settings) -> int:
    from worker.store.snapshots import list_snapshots

    client = connect(settings.store, settings.publish_timeout)
    if not client.exists(ModelKeys(args.model).ckpt):
        raise ModelNotInitialisedError(f"model {args.model!r} does not exist; `itrain models` lists them")
    table = Table(
        "version",
        "step",
        "taken (UTC)",
        "loss_ema",
        "window",
        "eval logloss",
        "eval mse",
        "eval accuracy",
        title=f"snapshots of {args.model}",
    )
    for snap in list_snapshots(client, args.model):
        ema = "-" if snap.loss_ema is None else f"{snap.loss_ema:.6f}"
        taken = f"{datetime.fromtimestamp(snap.snapshot_at, UTC):%Y-%m-%d %H:%M:%S}"
        ev = snap.eval or {"count": 0, "logloss": None, "mse": None, "accuracy": None}
        table.add_row(
            str(snap.version),
            str(snap.step),
            taken,
            ema,
            str(ev["count"]),
            _fmt(ev["logloss"]),
            _fmt(ev["mse"]),
            _fmt(ev["accuracy"]),
        )
    out.print(table)
    return 0


def cmd_rollback(args: argparse.Namespace, settings: Settings) -> int:
    from worker.store.snapshots import rollback

    version = rollback(connect(settings.store, settings.publish_timeout), args.model, args.to, settings)
    out.print(f"model {args.model} is now version {version}: the weights of version {args.to}")
    return 0


def cmd_delete(args: argparse.Namespace, settings: Settings) -> int:
    from worker.ops.lifecycle import delete_model

    if not args.yes:
        raise ConfigurationError(f"deleting model {args.model!r} loses its weights and history: add --yes")
    removed = delete_model(connect(settings.store, settings.publish_timeout), args.model)
    from worker.ops.routing import drop_route

    drop_route(connect(settings.broker, settings.publish_timeout), args.model)
    out.print(f"model {args.model} deleted ({removed} keys)")
    return 0


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from worker.store.layout import migrate, plan_migration

    client = connect(settings.store, settings.publish_timeout)
    where = f"store Redis {redact_url(settings.store)}"
    plan = plan_migration(client, where)
    if not plan.steps:
        out.print(f"{where} is at layout {plan.found}, the newest this release knows: nothing to do")
        return 0
    verb = "would migrate" if args.dry_run else "migrating"
    out.print(f"{verb} {where} from layout {plan.found} to {plan.target}:")
    for step in plan.steps:
        when = (
            f"safe while workers of layout {step.source} run"
            if step.online
            else "stop-the-world: stop every worker first"
        )
        out.print(f"  layout {step.source} -> {step.source + 1}: {step.what} ({when})")
    if args.dry_run:
        out.print("nothing written (--dry-run)")
        return 0
    done = migrate(client, where)
    out.print(f"{where} is at layout {done.target}")
    return 0


def cmd_schema(args: argparse.Namespace, settings: Settings) -> int:
    print(json.dumps(event_json_schema(), indent=2, sort_keys=True))
    return 0


def cmd_produce(args: argparse.Namespace, settings: Settings) -> int:
    with TrainingClient(settings=settings) as client:
        flipped = (
            {action: 1.0 - settings.targets[action] for action, _ in ACTIONS} if args.flip_labels else None
        )
        summary = produce(
            client,
            args.events,
            model=args.model,
            rate=args.rate,
            users=args.users,
            wait=args.wait,
            labels=flipped,
        )
    out.print(summary)
    return 0 if "failed" not in summary else EXIT_FAIL


def produce(
    client: TrainingClient,
    n: int,
    *,
    model: str,
    rate: float | None,
    users: int,
    wait: bool,
    timeout: float = 600.0,
    labels: dict[str, float] | None = None,
) -> str:
    """Send ``n`` synthetic events (paced at ``rate`` per second if given) and describe the run."""
    events = synthetic_events(n, users=users, model=model, labels=labels)
    start = time.perf_counter()
    with _progress() as progress:
        sent_bar = progress.add_task("enqueued", total=n)
        handles, _ = send_paced(
            events, client.train_many, rate=rate, on_sent=lambda k: progress.update(sent_bar, completed=k)
        )
    sent = time.perf_counter() - start
    lines = [f"enqueued {n} events in {sent:.2f} s ({n / sent:,.0f} events/s)"]
    if wait:
        results = _wait_with_progress(client, handles, timeout)
        total = time.perf_counter() - start
        counts = Counter(r.get("status", "?") if isinstance(r, dict) else "failed" for r in results)
        lines.append(
            f"trained end to end in {total:.2f} s ({n / total:,.0f} events/s): "
            + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        )
    return "\n".join(lines)


def _wait_with_progress(client: TrainingClient, handles: list[Any], timeout: float) -> list[Any]:
    with _progress() as progress:
        bar = progress.add_task("results", total=len(handles))
        results: list[Any] = []
        for i in range(0, len(handles), 5000):
            results.extend(client.wait_all(handles[i : i + 5000], timeout=timeout))
            progress.update(bar, completed=len(results))
    return results


def cmd_predict(args: argparse.Namespace, settings: Settings) -> int:
    context = dict(_parse_kv(kv) for kv in args.context) or None
    event = {
        "user_id": args.user,
        "action_type": args.action,
        "timestamp": time.time(),
        "context": context,
        "model": args.model,
    }
    with TrainingClient(settings=settings) as client:
        (result,) = client.wait_all([client.predict(event)], timeout=args.timeout)
    if isinstance(result, BaseException):
        raise result
    print(json.dumps(result))
    return 0


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from worker.devtools.local_stack import local_stack

    stop = _stop_on_signals()
    with local_stack(
        settings,
        workers=args.workers,
        concurrency=args.concurrency,
        flower=not args.no_flower,
        flower_port=args.flower_port,
        exporter_port=None if args.no_exporter else args.exporter_port,
        embedded=args.embedded_redis,
        replicas=args.replicas,
    ) as stack:
        _print_stack(stack)
        out.print("Ctrl-C stops everything.")
        while not stop():
            time.sleep(0.2)
        out.print("stopping ...")
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    """The quickstart: stack up, model initialised, synthetic events trained, stats printed."""
    from worker.devtools.local_stack import local_stack, stack_settings

    with local_stack(
        settings, workers=args.workers, concurrency=2, flower=False, embedded=args.embedded_redis
    ) as stack:
        _print_stack(stack)
        s = stack_settings(settings, stack)
        store = Store(connect(s.store, s.publish_timeout), s)
        stamp_new_store(store.client)
        if args.model not in store.models():
            store.create(args.model, Checkpoint.initial(ModelConfig()), force=False)
            out.print(f"model [bold]{args.model}[/] initialised")
        with TrainingClient(settings=s) as client:
            out.print(produce(client, args.events, model=args.model, rate=None, users=1000, wait=True))
            print_stats(client.stats(args.model))
    return 0


def cmd_failover(args: argparse.Namespace, settings: Settings) -> int:
    from worker.ops.failover import planned_failover

    url = settings.complete(settings.redis_url, "ITRAIN_REDIS_URL")
    result = planned_failover(
        url,
        pause_ms=args.pause_ms,
        timeout=args.timeout,
        say=lambda line: out.print(line, markup=False, highlight=False),
    )
    out.print(f"new master: {result.new[0]}:{result.new[1]}", markup=False, highlight=False)
    return 0


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from worker.devtools.bench import run_bench

    return run_bench(args, out)


# -- helpers -----------------------------------------------------------------------------------


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description:>9}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=out.console,
        transient=False,
    )


def _print_stack(stack: Any) -> None:
    plain = {"markup": False, "highlight": False, "soft_wrap": True}
    if stack.master_name:
        out.print(
            f"{stack.server}: master {stack.master_name} on 127.0.0.1:{stack.master_port}, "
            f"{stack.replicas} replica(s), {stack.sentinels} sentinels; to use it:",
            **plain,
        )
        # As shell lines to paste: the URL's `;` needs the quotes.
        out.print(f"export ITRAIN_REDIS_URL='{redact_url(stack.redis_url)}'", **plain)
        out.print(f"export ITRAIN_SENTINEL_MASTER={stack.master_name}", **plain)
    else:
        kind = f"embedded {stack.server or 'server'}" if stack.embedded else "Redis"
        out.print(f"{kind} at {redact_url(stack.redis_url)}", **plain)
    out.print(f"workers: {', '.join(stack.workers)} (logs in {stack.logs})")
    if stack.flower_url:
        out.print(f"Flower: {stack.flower_url}")
    if stack.exporter_url:
        out.print(f"Prometheus exporter: {stack.exporter_url}")


def _stop_on_signals() -> Callable[[], bool]:
    stopped = {"flag": False}

    def handler(signum: int, frame: Any) -> None:
        stopped["flag"] = True

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return lambda: stopped["flag"]


def _parse_kv(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--context takes key=value, got {text!r}")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    if value in ("true", "false"):
        return key, value == "true"
    return key, value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="itrain", description="Online training from user interactions.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="create a model (refuses to replace one without --force)")
    p.add_argument("--model", default="default")
    p.add_argument("--hidden", type=_positive_int, default=16)
    p.add_argument("--outputs", type=_positive_int, default=1)
    p.add_argument("--lr", type=_positive_float, default=0.05)
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm limit; 0 disables clipping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=["per_event", "minibatch"], default="per_event")
    p.add_argument("--force", action="store_true", help="replace an existing model")
    p.add_argument("--exist-ok", action="store_true", help="succeed without change when the model exists")
    p.add_argument(
        "--queue",
        default=None,
        metavar="Q",
        help="a queue of its own: <ITRAIN_QUEUE>.<suffix> (default: ITRAIN_QUEUE)",
    )
    p.add_argument(
        "--guard-window", type=_positive_int, default=None, metavar="W", help="guard: events measured"
    )
    p.add_argument("--guard-ratio", type=_positive_float, default=None, metavar="R", help="guard: loss ratio")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("stats", help="a model's statistics")
    p.add_argument("--model", default="default")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("models", help="every initialised model and its queue")
    p.add_argument(
        "--no-workers-check",
        action="store_true",
        help="do not ask the live workers which queues they consume (a second's wait)",
    )
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("dead-letters", help="a model's dead letters, newest first (no user ids)")
    p.add_argument("--model", required=True)
    p.add_argument("--json", action="store_true")
    p.add_argument("--limit", type=_positive_int, default=20, help="the newest this many (default 20)")
    p.set_defaults(func=cmd_dead_letters)
    p = sub.add_parser("route", help="move a model's events to another queue (the old one drains)")
    p.add_argument("--model", required=True)
    p.add_argument("--queue", required=True, metavar="Q", help="ITRAIN_QUEUE or <ITRAIN_QUEUE>.<suffix>")
    p.set_defaults(func=cmd_route)

    p = sub.add_parser("produce", help="send synthetic events")
    p.add_argument("--model", default="default")
    p.add_argument("--events", type=_positive_int, required=True)
    p.add_argument(
        "--rate", type=_positive_float, default=None, help="events per second (default: as fast as possible)"
    )
    p.add_argument("--users", type=_positive_int, default=1000)
    p.add_argument("--wait", action="store_true", help="wait for every result and count them")
    p.add_argument(
        "--flip-labels",
        action="store_true",
        help="label each event 1 - its action's target (a drill: a guarded model should trip)",
    )
    p.set_defaults(func=cmd_produce)

    p = sub.add_parser("plot", help="a model's per-event loss and its moving average, as a PNG")
    p.add_argument("--model", default="default")
    p.add_argument("--out", type=Path, required=True, metavar="FILE.png")
    p.add_argument("--window", type=_positive_int, default=50, help="events in the moving average")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("exporter", help="serve Prometheus metrics of every model (/metrics)")
    p.add_argument("--port", type=_positive_int, default=None, help="default 9810")
    p.add_argument("--address", default="127.0.0.1", help="the address to bind (default 127.0.0.1)")
    p.set_defaults(func=cmd_exporter)

    p = sub.add_parser("acl", help="print the ACL SETUSER lines of a least-privilege Redis user")
    p.add_argument("--role", choices=["producer", "reader", "monitor", "worker", "sentinel"], required=True)
    p.add_argument("--user", default=None, help="the user name (default itrain-<role>)")
    p.add_argument("--password", default=None, help="default: a random one, printed in the line")
    p.add_argument(
        "--queues",
        default=None,
        metavar="Q1,Q2",
        help="producer or reader: push to these queues only (default: every queue)",
    )
    p.set_defaults(func=cmd_acl)

    p = sub.add_parser("export", help="write a model to a portable file (.npz, no pickle)")
    p.add_argument("--model", default="default")
    p.add_argument("--out", type=Path, required=True, metavar="FILE")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="install an exported model as a new version")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--model", default=None, help="default: the name in the file")
    p.add_argument("--force", action="store_true", help="replace an existing model")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("snapshots", help="a model's kept snapshots")
    p.add_argument("--model", default="default")
    p.set_defaults(func=cmd_snapshots)

    p = sub.add_parser("rollback", help="restore a snapshot's weights as a new version")
    p.add_argument("--model", default="default")
    p.add_argument("--to", type=_positive_int, required=True, metavar="VERSION")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("guard", help="pause and roll back a model whose online log loss degrades")
    p.add_argument("--model", default="default")
    p.add_argument("--window", type=_positive_int, default=None, metavar="W", help="events measured")
    p.add_argument(
        "--ratio", type=_positive_float, default=None, metavar="R", help="times the best snapshot's"
    )
    p.add_argument("--off", action="store_true", help="remove the guard")
    p.set_defaults(func=cmd_guard)

    p = sub.add_parser("resume", help="re-enable training on a model its guard paused")
    p.add_argument("--model", default="default")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("delete", help="remove a model and every key it has")
    p.add_argument("--model", required=True)
    p.add_argument("--yes", action="store_true", help="confirm: the weights and history are lost")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("migrate", help="bring the store's layout up to this release's (idempotent)")
    p.add_argument("--dry-run", action="store_true", help="print the steps; write nothing")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("schema", help="print the event's JSON Schema")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("predict", help="the model's prediction for one interaction (needs a worker)")
    p.add_argument("--user", required=True)
    p.add_argument("--action", required=True)
    p.add_argument("--context", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--model", default="default")
    p.add_argument("--timeout", type=_positive_float, default=30.0)
    p.set_defaults(func=cmd_predict)

    for name, func, help_text in (
        ("up", cmd_up, "run a local stack (Redis, workers, Flower, exporter) until Ctrl-C"),
        ("demo", cmd_demo, "the quickstart: local stack, model, synthetic events trained, stats"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--workers", type=_positive_int, default=2)
        p.add_argument("--embedded-redis", action="store_true", help="always start a private redis-server")
        p.set_defaults(func=func)
        if name == "up":
            p.add_argument("--concurrency", type=_positive_int, default=2, help="pool processes per worker")
            p.add_argument("--no-flower", action="store_true")
            p.add_argument("--flower-port", type=_positive_int, default=5555)
            p.add_argument("--no-exporter", action="store_true")
            p.add_argument("--exporter-port", type=_positive_int, default=9810)
            p.add_argument(
                "--replicas",
                type=int,
                choices=range(6),
                default=0,
                metavar="N",
                help="a master with N replicas under three sentinels of its own (0: one Redis)",
            )
        else:
            p.add_argument("--model", default="default")
            p.add_argument("--events", type=_positive_int, default=20_000)

    p = sub.add_parser("failover", help="a planned failover under Sentinel that loses no acknowledged write")
    p.add_argument(
        "--pause-ms", type=_positive_int, default=5000, help="the write pause, renewed until it is done"
    )
    p.add_argument("--timeout", type=_positive_float, default=30.0, help="bound of each wait, seconds")
    p.set_defaults(func=cmd_failover)

    p = sub.add_parser("bench", help="the throughput benchmark (starts its own Redis and workers)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE")
    p.add_argument("--quick", action="store_true", help="a fifth of the events per scenario")
    p.add_argument(
        "--logs", type=Path, default=None, help="where the workers' logs go (default .itrain/logs)"
    )
    p.add_argument(
        "--only",
        default=None,
        metavar="KEYS",
        help="comma-separated scenario keys to run (e.g. c2,d); no message-path comparison",
    )
    p.add_argument(
        "--replicas",
        type=_positive_int,
        default=None,
        metavar="N",
        help="a master with N replicas; each scenario also runs with ITRAIN_MIN_REPLICAS=1",
    )
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = get_settings()
    except ValidationError as exc:
        bad = "; ".join(
            (f"ITRAIN_{'_'.join(str(p) for p in e['loc']).upper()}: " if e["loc"] else "") + e["msg"]
            for e in exc.errors(include_url=False)
        )
        err.print(f"itrain: invalid setting: {bad}", markup=False, highlight=False)
        return EXIT_USAGE
    try:
        if args.command not in _NO_VERSION_CHECK:
            check_server_versions(settings)
        if args.command not in _NO_LAYOUT_CHECK:
            check_store_layout(settings)
        code: int = args.func(args, settings)
        return code
    except ValidationError as exc:
        err.print(f"itrain: invalid input: {describe_validation_error(exc)}", markup=False, highlight=False)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (`itrain schema | head`): end quietly, as Unix tools do; stdout
        # goes to /dev/null so the interpreter's final flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (redis.ConnectionError, redis.TimeoutError, OperationalError) as exc:
        err.print(
            f"itrain: cannot reach {redact_url(settings.redis_url)}: {exc}", markup=False, highlight=False
        )
        return EXIT_FAIL
    except (ItrainError, ValueError, OSError, redis.RedisError) as exc:
        err.print(f"itrain: {exc}", markup=False, highlight=False)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
