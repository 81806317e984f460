"""The daemon's lifecycle: settings, logging, metrics, the milter loop, reload, the periodic
check and a bounded shutdown. Engines come from scanners.from_settings, the store from
quarantine.open_store; the operator commands never import this module.

libmilter's own signal thread treats SIGHUP like SIGTERM (it stops). So libmilter runs in a
thread of its own, where it blocks those signals, while the main thread keeps them and
handles them in Python: SIGHUP reloads, SIGTERM and SIGINT stop.

SECURITY: trusts its configuration and policy files (root's or the operator's) and the
process's own environment; a file that does not validate stops start-up, or keeps the old
configuration on reload. It trusts nothing that arrives over the milter socket: that is the
handler's business. The milter socket gets milter_socket_mode (Postfix's group), the umask for
it is set around its creation only, and the metrics endpoint listens where metrics_address says.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

from . import __version__, config, logs, nodelay, policyfile, quarantine, scanners, webhooks
from .logs import log
from .health import Health
from .metrics import Metrics
from .pipeline import Pipeline, SpamdUsers, scan_pool
from .scancache import ScanCache

DRAIN_POLL = 0.1          # seconds between checks of in-flight messages while draining
MAIN_LOOP_WAKEUP = 1.0    # seconds: the main thread also wakes this often to notice a dead milter loop

# Settings read once at start-up: a reload that changes them says they need a restart.
RESTART_SETTINGS = ("milter_socket", "milter_socket_mode", "milter_timeout", "scan_threads", "webhook_queue_size",
                    "log_target", "syslog_socket", "metrics_address", "shared_lists")


def check_milter_extension() -> None:
    """`import milter` must be pymilter's C extension, never a package of ours shadowing it."""
    import milter
    if not hasattr(milter, "register") or not str(getattr(milter, "__file__", "")).endswith(".so"):
        raise config.ConfigError(f"'import milter' found {getattr(milter, '__file__', milter)!r}, not "
                                 "pymilter's extension: a directory named milter/ with an __init__.py "
                                 "is shadowing it")


def build_pipeline(cfg, pool, health, metrics) -> Pipeline:
    return Pipeline(scanners.from_settings(cfg, health, metrics), pool, health, metrics,
                    ScanCache(cfg.scan_cache_seconds, cfg.scan_cache_entries, cfg.scan_cache_ignored_headers),
                    cfg.clamd_head_start, SpamdUsers(cfg.spamd_user, cfg.spamd_user_limit, cfg.spamd_user_fallback))


def with_socket_mode(open_socket, milter_socket: str, mode: int):
    """Wrap pymilter's milter.opensocket: create the socket under a umask that allows at most
    `mode`, then give a unix socket exactly `mode`; the process umask is restored at once."""
    import stat

    def wrapper(*args):
        old = os.umask(0o777 & ~mode)
        try:
            result = open_socket(*args)
        finally:
            os.umask(old)
        kind, _, path = milter_socket.partition(":")
        if kind in ("unix", "local") and stat.S_ISSOCK(os.lstat(path).st_mode):
            os.chmod(path, mode)
        return result
    return wrapper


def socket_problem(milter_socket: str) -> str:
    """Why a unix milter socket could not be created, as far as can be seen from outside
    (libmilter only says "cannot opensocket"); "" when nothing is seen."""
    kind, _, path = milter_socket.partition(":")
    if kind not in ("unix", "local"):
        return ""
    directory = os.path.dirname(path) or "/"
    if not os.path.isdir(directory):
        return f" ({milter_socket}: directory {directory} does not exist)"
    if not os.access(directory, os.W_OK | os.X_OK):
        return (f" ({milter_socket}: directory {directory} is not writable by uid {os.geteuid()}; "
                "under systemd it must be in ReadWritePaths=)")
    return ""


def open_store(cfg) -> quarantine.Store | None:
    what = "quarantine_backend postgresql" if cfg.quarantine_backend == "postgresql" else "quarantine_directory"
    try:
        store = quarantine.open_store(cfg)
    except quarantine.StoreError as e:
        raise config.ConfigError(f"{what}: {e}") from None
    if hasattr(store, "check_database"):
        # A schema behind or ahead of this scanmilter stops start-up (and a reload). A database that
        # does not answer does not: held mail is tempfailed or kept locally (quarantine_fallback)
        # until it does, and the schema is checked before its first use.
        state = store.check_database()
        if state["up"] and state["problem"]:
            store.close()
            raise config.ConfigError(f"{what}: {state['problem']}")
    return store


def watch_store(store, metrics) -> None:
    """Let a database store report its latency and its fallback to the metrics."""
    database = getattr(store, "pg", store)
    if hasattr(database, "check_database"):
        database.observe = lambda operation, seconds, ok: \
            metrics.quarantine_backend_seconds.labels(operation).observe(seconds)
    if hasattr(store, "move_waiting"):
        store.on_fallback = metrics.quarantine_fallback_stored.inc
        store.on_moved = metrics.quarantine_fallback_moved.inc


def mover(runtime) -> None:
    """quarantine_fallback = "local": move what waits in the local store into PostgreSQL."""
    while True:
        time.sleep(runtime.cfg.quarantine_fallback_interval)
        store = runtime.store
        if not hasattr(store, "move_waiting") or store.down:
            continue
        failed: list[tuple[str, str]] = []
        before = store.moved        # a run the database cuts short has moved some all the same
        try:
            store.move_waiting(failed)
        except quarantine.StoreError as e:
            log.warning("quarantine: moving the local fallback store into PostgreSQL: %s; trying again in %.0fs",
                        logs.escape(str(e), 1000), runtime.cfg.quarantine_fallback_interval)
        except Exception:   # the mover must never take the daemon down
            log.exception("quarantine: moving the local fallback store failed")
        moved = store.moved - before
        if moved:
            log.info("quarantine: moved %d entries from the local fallback store into PostgreSQL", moved)
        for entry_id, reason in failed:
            log.warning("quarantine: entry %s stays in the local fallback store: %s", entry_id,
                        logs.escape(reason, 1000))


class Signals:
    """What the signal handlers asked for; acted on by the main loop."""

    def __init__(self):
        self.wake = threading.Event()
        self.stop = False
        self.reload = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGHUP, self._reload)

    def _stop(self, signum, frame):
        self.stop = True
        self.wake.set()

    def _reload(self, signum, frame):
        self.reload = True
        self.wake.set()


def serve(config_path: str | None) -> int:
    try:
        cfg, policy, warnings = policyfile.load_settings_and_policy(config_path)
        store = open_store(cfg)
        check_milter_extension()
        hooks = webhooks.hooks_from(cfg)        # their secret files: unreadable stops start-up
    except config.ConfigError as e:
        print(f"scanmilter: fatal: {e}", file=sys.stderr)
        return 1
    logs.setup(cfg.log_target, cfg.log_level, cfg.syslog_socket)
    for w in warnings:
        log.warning("%s", w)

    import Milter   # only now: check_milter_extension() has vouched for the extension
    import milter
    import prometheus_client
    from .handler import Handler, Runtime

    # The default registry also carries the process collector (RSS, CPU seconds, open fds).
    metrics = Metrics(prometheus_client.REGISTRY)
    if cfg.metrics_address:
        try:
            metrics.serve(cfg.metrics_address)
        except (OSError, ValueError) as e:
            log.critical("metrics_address %s: %s", cfg.metrics_address, e)
            return _exit(1)
    webhooks.start(cfg, hooks, metrics)     # one thread; events are queued, never waited for
    health = Health(metrics, cfg.engine_failure_threshold, cfg.engine_retry_interval)

    if store is not None:
        removed = store.recover(min_age=0)    # no writer of ours is running yet
        if removed:
            log.warning("quarantine: removed %d file(s) left by an interrupted write", removed)
        if getattr(store, "problem", ""):
            log.warning("quarantine: %s: held mail is %s until the database answers", logs.escape(store.problem, 1000),
                        f"kept in {cfg.quarantine_directory}" if cfg.quarantine_fallback == "local" else "tempfailed")
        watch_store(store, metrics)
    pipeline = build_pipeline(cfg, scan_pool(cfg.scan_threads), health, metrics)
    runtime = Runtime(cfg, policy, pipeline, store, metrics)
    runtime.shared = None
    if cfg.shared_lists:
        # read before the first message; then kept current in a thread of its own (sharedlists.py)
        from . import db, sharedlists
        try:
            runtime.shared = sharedlists.start(cfg, policy, runtime, metrics)
        except db.DatabaseError as e:       # no usable connection string, or a schema that does not match
            log.critical("shared lists: %s", e)
            return _exit(1)
    Milter.factory = lambda: Handler(runtime)
    # QUARANTINE: quarantine_backend = "hold" puts held mail on Postfix's hold queue; asked for always, so
    # that a reload may switch backends
    Milter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS | Milter.DELRCPT | Milter.QUARANTINE)
    if nodelay.is_tcp(cfg.milter_socket):
        def opened(count):
            if count:
                log.info("milter socket is TCP: TCP_NODELAY set, every stage answered")
            else:
                log.warning("milter socket is TCP but TCP_NODELAY could not be set: expect a 40 ms stall "
                            "per message; a unix socket avoids it")
        milter.opensocket = nodelay.set_nodelay_on_new_listeners(milter.opensocket, opened)
    # libmilter creates a unix socket with the process umask. That umask (from milter_socket_mode)
    # is set around the call only: quarantine directories made later, on a reload, must not get it.
    milter.opensocket = with_socket_mode(milter.opensocket, cfg.milter_socket, int(cfg.milter_socket_mode, 8))
    signals = Signals()
    signals.install()      # before the milter thread exists, so only the main thread takes them
    failure: list[BaseException] = []

    def run_milter():
        try:
            Milter.runmilter("scanmilter", cfg.milter_socket, timeout=cfg.milter_timeout)
        except BaseException as e:  # libmilter could not open the socket, or ran out of threads
            failure.append(e)
        finally:
            signals.wake.set()

    log.info("starting scanmilter %s on %s (engines: %s; policy: %s)", __version__, cfg.milter_socket,
             ", ".join(e.name for e in runtime.pipeline.engines) or "none", policy.source)
    loop = threading.Thread(target=run_milter, name="milter", daemon=True)
    loop.start()
    threading.Thread(target=monitor, args=(runtime,), name="monitor", daemon=True).start()
    threading.Thread(target=mover, args=(runtime,), name="mover", daemon=True).start()
    while not signals.stop and loop.is_alive():
        signals.wake.wait(MAIN_LOOP_WAKEUP)
        signals.wake.clear()
        if signals.reload:
            signals.reload = False
            reload(runtime, config_path)
    if failure:
        log.critical("milter loop failed: %s%s", failure[0], socket_problem(cfg.milter_socket))
        return _exit(1)
    milter.stop()
    return drain(runtime, runtime.cfg.shutdown_timeout)


def reload(runtime, config_path: str | None) -> bool:
    """Swap in new settings, engines and policy, or keep the old ones if anything is wrong.
    Messages in flight finish with the policy they started with."""
    try:
        cfg, policy, warnings = policyfile.load_settings_and_policy(config_path)
        hooks = webhooks.hooks_from(cfg)
        store = open_store(cfg) if quarantine.location(cfg) != quarantine.location(runtime.cfg) else runtime.store
        if getattr(runtime, "shared", None) is not None:    # the database's lists stay merged in
            policy = runtime.shared.adopt(policy)
    except config.ConfigError as e:
        log.error("reload refused, old configuration and policy stay in force: %s", e)
        runtime.metrics.reloads.labels("failed").inc()
        return False
    for w in warnings:
        log.warning("%s", w)
    for name in RESTART_SETTINGS:
        if getattr(cfg, name) != getattr(runtime.cfg, name):
            log.warning("reload: %s changed; it takes effect after a restart", name)
    # Plain attribute swaps: a message reads each once, so it sees the old or the new whole.
    old = runtime.pipeline
    old.health.failure_threshold, old.health.retry_interval = cfg.engine_failure_threshold, cfg.engine_retry_interval
    runtime.pipeline = build_pipeline(cfg, old.pool, old.health, old.metrics)   # an empty cache too
    if store is not runtime.store:
        watch_store(store, runtime.metrics)
    runtime.cfg, runtime.policy, runtime.store = cfg, policy, store
    webhooks.configure(cfg, hooks)
    logging.getLogger("scanmilter").setLevel(cfg.log_level.upper())
    runtime.metrics.reloads.labels("ok").inc()
    log.info("reloaded configuration %s and policy %s", config_path or "(defaults)", policy.source)
    return True


def monitor(runtime) -> None:
    """Between messages: ping the engines (every member of a pool), read clamd's database version,
    size up the quarantine."""
    while True:
        try:
            check(runtime)
        except Exception:   # monitoring must never take the daemon down
            log.exception("periodic check failed")
        time.sleep(runtime.cfg.engine_check_interval)


def check(runtime) -> None:
    pipeline, m = runtime.pipeline, runtime.metrics
    for engine in pipeline.engines:
        # a pool pings every member, dead ones too (they rejoin when they answer); the engine is
        # up while any member is
        problem = engine.ping()
        pipeline.health.mark(engine.name, not problem, problem)
        if engine.name == "clamd" and not problem:
            version = engine.version()
            if version:
                if runtime.clamd_db_version not in (None, version[0]):
                    gone = pipeline.cache.forget("clamd")
                    log.info("clamd signature database %s -> %s: %d cached clamd result(s) dropped",
                             runtime.clamd_db_version, version[0], gone)
                runtime.clamd_db_version = version[0]
                m.clamav_db_version.set(version[0])
                m.clamav_db_time.set(version[1])
                runtime.database_age.observe(version[0], version[1], runtime.cfg.clamd_database_age_limit)
    store = runtime.store
    if store is not None and hasattr(store, "check_database") and not check_database(runtime, store):
        return
    if store is not None:
        # an index write that failed (locked, disk full) left a marker: rebuild, so that no held
        # entry stays missing from `list` and `purge`
        skipped: list[tuple[str, str]] = []
        try:
            rebuilt = store.repair_index(skipped)
        except quarantine.StoreError as e:
            log.warning("quarantine: %s; trying again at the next check", logs.escape(str(e), 1000))
            return
        if rebuilt is not None:
            log.info("quarantine: index rebuilt from the entry files: %d entries", rebuilt)
        for entry_id, reason in skipped:
            log.warning("quarantine: entry %s left out of the index: %s", entry_id, logs.escape(reason, 1000))
        stats = store.stats()
        m.quarantine_entries.clear()
        m.quarantine_bytes.clear()
        for reason, v in stats["by_reason"].items():
            m.quarantine_entries.labels(reason).set(v["entries"])
            m.quarantine_bytes.labels(reason).set(v["bytes"])
        m.quarantine_oldest.set(time.time() - stats["oldest"] if stats["oldest"] else 0)
        m.quarantine_released.set(stats["released"])
        m.quarantine_actions.set(store.tallies())


def check_database(runtime, store) -> bool:
    """The quarantine's database: reachable, with the right schema (a change is logged once), and
    what waits in the local fallback store. True when the database can be asked for its stats."""
    m, state = runtime.metrics, store.check_database()
    problem = state["problem"]
    m.quarantine_backend_up.labels("postgresql").set(0 if problem else 1)
    if hasattr(store, "waiting"):
        try:
            m.quarantine_fallback_entries.set(store.waiting())
        except quarantine.StoreError as e:
            log.warning("quarantine: local fallback store: %s", logs.escape(str(e), 1000))
    before = getattr(runtime, "database_problem", "")
    runtime.database_problem = problem
    if problem and problem != before:
        log.warning("quarantine: the database is not usable: %s", logs.escape(problem, 1000))
    elif before and not problem:
        log.info("quarantine: the database is back (%.0f ms)", state["seconds"] * 1000)
    return not problem


def drain(runtime, timeout: float) -> int:
    """Stop accepting; let in-flight messages finish, bounded by shutdown_timeout."""
    end = time.monotonic() + timeout
    while runtime.in_flight > 0 and time.monotonic() < end:
        time.sleep(DRAIN_POLL)
    if runtime.in_flight:
        log.warning("stopping with %d message(s) still in flight; Postfix applies milter_default_action",
                    runtime.in_flight)
    webhooks.finish()       # what is still queued: sent within webhook_flush_timeout, or dropped
    log.info("stopped")
    return _exit(0)


def _exit(code: int) -> int:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # libmilter's session threads may still be waiting on Postfix; interpreter teardown
    # under them is not safe, so leave without it.
    os._exit(code)
