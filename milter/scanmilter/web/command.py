"""`scanmilter web`: serve the review page (web_address, 127.0.0.1:8025 by default) with waitress;
`scanmilter web passwd LOGIN`: set a postmaster's password in web_password_file.

Flask and waitress are the `web` extra (pip install 'scanmilter[web]'): they are imported only
here, when the page is served, so the milter and the other commands run without them.
"""
from __future__ import annotations

import argparse
import getpass
import ipaddress
import signal
import sys

from .. import config
from ..logs import escape

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _host_port(address: str, setting: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise config.ConfigError(f"{setting} must be HOST:PORT, not {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(config_path: str | None) -> int:
    from .. import logs, policyfile, quarantine
    from .auth import read_passwords
    from .links import Keys
    try:
        import waitress
        from .app import WebMetrics, create_app
    except ImportError as e:
        print(f"scanmilter: web: {e.name} is not installed (pip install 'scanmilter[web]')", file=sys.stderr)
        return EXIT_USAGE
    try:
        cfg, policy, _ = policyfile.load_settings_and_policy(config_path)
        host, port = _host_port(cfg.web_address, "web_address")
        if not cfg.web_cookie_secure and not _loopback(host):
            raise config.ConfigError("web_cookie_secure = false is allowed only with web_address on loopback "
                                     f"(tests over plain http), not {cfg.web_address}")
        keys = Keys.from_file(cfg.web_key_file)
        if cfg.web_password_file:
            read_passwords(cfg.web_password_file)
        store = quarantine.open_store(cfg, command=True)
        if store is None:
            raise config.ConfigError(f"{cfg.source}: quarantine_directory is not set; there is no quarantine")
    except (config.ConfigError, quarantine.StoreError) as e:
        print(f"scanmilter: web: {escape(str(e), 2000)}", file=sys.stderr)
        return EXIT_USAGE
    logs.setup(cfg.log_target, cfg.log_level, cfg.syslog_socket)
    metrics = WebMetrics()
    if cfg.web_metrics_address:
        from prometheus_client import start_http_server
        metrics_host, metrics_port = _host_port(cfg.web_metrics_address, "web_metrics_address")
        start_http_server(metrics_port, addr=metrics_host, registry=metrics.registry)
    app = create_app(cfg, store, policy.notify, keys, metrics)
    proxy = {"trusted_proxy": cfg.web_trusted_proxy, "trusted_proxy_count": 1,
             "trusted_proxy_headers": {"x-forwarded-for", "x-forwarded-proto"}} if cfg.web_trusted_proxy else {}
    server = waitress.create_server(app, host=host, port=port, threads=cfg.web_threads, ident="scanmilter",
                                    clear_untrusted_proxy_headers=True, max_request_body_size=1024 * 1024,
                                    **proxy)

    def stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    logs.log.info("web: serving %s on http://%s:%d/%s", cfg.source, host, port,
                  f" (behind {cfg.web_trusted_proxy})" if cfg.web_trusted_proxy else "")
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        if hasattr(store, "close"):
            store.close()
    return EXIT_OK


def passwd(config_path: str | None, login: str, from_stdin: bool) -> int:
    from .auth import write_password
    try:
        cfg = config.load(config_path)
    except config.ConfigError as e:
        print(f"scanmilter: web passwd: {escape(str(e), 2000)}", file=sys.stderr)
        return EXIT_USAGE
    if not cfg.web_password_file:
        print(f"scanmilter: web passwd: {cfg.source}: web_password_file is not set", file=sys.stderr)
        return EXIT_USAGE
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"New password for {login}: ")
        if getpass.getpass("Again: ") != password:
            print("scanmilter: web passwd: the passwords differ; nothing changed", file=sys.stderr)
            return EXIT_FAILED
    try:
        new = write_password(cfg.web_password_file, login, password)
    except ValueError as e:
        print(f"scanmilter: web passwd: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"scanmilter: web passwd: {cfg.web_password_file}: {e.strerror}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{'added' if new else 'changed the password of'} {login} in {cfg.web_password_file}")
    return EXIT_OK


def run(args) -> int:
    from ..commands.quarantine import config_path
    path = config_path(args.config)
    if args.web_action == "passwd":
        return passwd(path, args.login, args.password_stdin)
    return serve(path)


def add_parser(sub) -> None:
    help_config = "configuration file (default $SCANMILTER_CONFIG or /etc/scanmilter/scanmilter.toml)"
    p = sub.add_parser("web", help="the review web page for held mail (recipients' links, postmasters' list)")
    p.add_argument("-c", "--config", help=help_config)
    actions = p.add_subparsers(dest="web_action")
    w = actions.add_parser("passwd", help="set a postmaster's password in web_password_file")
    w.add_argument("login")
    w.add_argument("-c", "--config", default=argparse.SUPPRESS, help=help_config)
    w.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    p.set_defaults(func=run)
