"""Process lifecycle: settings, logging, engines, the milter loop, and a bounded shutdown."""
from __future__ import annotations

import logging
import os
import sys
import time

from . import __version__, config, logs
from .logs import log
from .pipeline import Pipeline
from .scanners.clamd import ClamdScanner
from .scanners.spamd import SpamdScanner

DRAIN_POLL = 0.1     # seconds between checks of in-flight messages while draining


def check_milter_extension() -> None:
    """`import milter` must be pymilter's C extension, never a package of ours shadowing it."""
    import milter
    if not hasattr(milter, "register") or not str(getattr(milter, "__file__", "")).endswith(".so"):
        raise config.ConfigError(f"'import milter' found {getattr(milter, '__file__', milter)!r}, not "
                                 "pymilter's extension: a directory named milter/ with an __init__.py "
                                 "is shadowing it")


def build_engines(cfg) -> list:
    """The engines that are on, slowest first (the calling thread runs the first one)."""
    engines = []
    if cfg.spamd_enabled:
        engines.append(SpamdScanner(config.parse_client_socket(cfg.spamd_socket), cfg.spamd_connect_timeout,
                                    cfg.spamd_timeout, cfg.spamd_size_limit, cfg.spamd_oversize_action,
                                    cfg.spamd_user))
    if cfg.clamd_enabled:
        engines.append(ClamdScanner(config.parse_client_socket(cfg.clamd_socket), cfg.clamd_connect_timeout,
                                    cfg.clamd_timeout, cfg.clamd_size_limit))
    return engines


def serve(config_path: str | None) -> int:
    try:
        cfg = config.load(config_path)
        policy = config.load_policy(cfg.policy_file)
        check_milter_extension()
    except config.ConfigError as e:
        print(f"scanmilter: fatal: {e}", file=sys.stderr)
        return 1
    logs.setup(cfg.log_target, cfg.log_level, cfg.syslog_socket)

    import Milter   # only now: check_milter_extension() has vouched for the extension
    from .handler import Handler, Runtime

    pipeline = Pipeline(build_engines(cfg), cfg.scan_threads)
    runtime = Runtime(cfg, policy, pipeline)
    Milter.factory = lambda: Handler(runtime)
    Milter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS)
    # libmilter creates the socket with the process umask; this gives it milter_socket_mode.
    os.umask(0o777 & ~int(cfg.milter_socket_mode, 8))
    log.info("starting scanmilter %s on %s (engines: %s; policy: %s)", __version__, cfg.milter_socket,
             ", ".join(e.name for e in pipeline.engines) or "none", policy.source)
    try:
        Milter.runmilter("scanmilter", cfg.milter_socket, timeout=cfg.milter_timeout)
    except Exception as e:  # libmilter could not open the socket, or ran out of threads
        log.critical("milter loop failed: %s", e)
        return 1
    return drain(runtime, cfg.shutdown_timeout)


def drain(runtime, timeout: float) -> int:
    """libmilter stopped accepting (SIGTERM/SIGINT); let in-flight messages finish, bounded."""
    end = time.monotonic() + timeout
    while runtime.in_flight > 0 and time.monotonic() < end:
        time.sleep(DRAIN_POLL)
    if runtime.in_flight:
        log.warning("stopping with %d message(s) still in flight; Postfix applies milter_default_action",
                    runtime.in_flight)
    log.info("stopped")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # libmilter's session threads may still be waiting on Postfix; interpreter teardown
    # under them is not safe, so leave without it.
    os._exit(0)
