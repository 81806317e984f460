"""Command line: scanmilter serve | check-config | explain | quarantine | lists | web | selftest | postfix-check.

Never imports Milter: only `serve` loads the daemon (app.py), when it is asked for; the operator
commands live in commands/."""
from __future__ import annotations

import argparse
import os
import signal
import sys

from . import __version__, config, policyfile
from .commands import lists as lists_command
from .commands import quarantine as quarantine_command
from .commands.postfix_check import CONNECT_TIMEOUT
from .policy import FILE_PREFIX, INBOUND, OUTBOUND
from .web import command as web_command


def _fatal(e: Exception) -> int:
    print(f"scanmilter: fatal: {e}", file=sys.stderr)
    return 1


def render_policy(policy, only_changed: bool) -> str:
    """The effective policy as TOML, marking what differs from the shipped defaults."""
    out = []
    for d in (INBOUND, OUTBOUND):
        defaults = policyfile.direction_defaults(d)
        lines = [f"{k} = {config.toml_value(v)}" + ("  # changed, default " + config.toml_value(defaults[k])
                                                    if v != defaults[k] else "")
                 for k, v in policy.directions[d].items() if not only_changed or v != defaults[k]]
        out += [f"[{d}]", *lines]
        for kind in ("domains", "recipients"):
            for key, override in getattr(policy, kind)[d].items():
                out.append(f'[{d}.{kind}."{key}"]')
                out += [f"{k} = {config.toml_value(v)}" for k, v in override.items()]
    lists = {s.name: getattr(policy, s.name) for s in config.LISTS_SETTINGS}
    shown = {k: (sorted(map(str, v)) if not isinstance(v, bool) else v) for k, v in lists.items()}
    out.append("[lists]")
    out += [f"{k} = {config.toml_value(v)}" for k, v in shown.items() if not only_changed or v]
    if policy.virus_classes:
        out.append("[virus_classes]")
        out += [f'"{p}" = "{a}"' for p, a in policy.virus_classes]
    for d in (INBOUND, OUTBOUND):
        actions = policy.file_actions.get(d, {})
        if actions:
            out.append(f"[{d}.files]")
            out += [f"{config.toml_value(k.removeprefix(FILE_PREFIX))} = {config.toml_value(v)}"
                    for k, v in actions.items()]
    for rule in policy.file_rules:
        out.append(f"[files.rules.{config.toml_value(rule.name)}]  # {rule.where}")
        for key in ("names", "extensions", "declared_types", "detected_types", "macros", "encrypted", "name_tricks"):
            value = getattr(rule, key)
            if value:
                value = sorted(value) if isinstance(value, frozenset) else value
                out.append(f"{key} = {config.toml_value(list(value) if isinstance(value, tuple) else value)}")
    n = policy.notify
    out += ["[notify]", f"send = {config.toml_value(n.send)}",
            f"admin_only_reasons = {config.toml_value(sorted(n.admin_only_reasons))}"]
    out += [f"# [notify.domains] {config.toml_value(k)} = {config.toml_value(v)}" for k, v in n.domains.items()]
    out += [f"# [notify.recipients] {config.toml_value(k)} = {config.toml_value(v)}" for k, v in n.recipients.items()]
    for r in policy.rewrites:
        out.append(f"# {r.where}: header_rewrite {r.direction} {r.action} {r.name}"
                   + (f" match /{r.match.pattern}/" if r.match else "") + (f' value "{r.value}"' if r.value else ""))
    return "\n".join(out)


def _check_config(args) -> int:
    try:
        cfg, policy, warnings = policyfile.load_settings_and_policy(args.config)
    except config.ConfigError as e:
        return _fatal(e)
    print(f"# {cfg.source}: OK")
    print(config.render(cfg, only_changed=args.changed, defaults=args.defaults))
    print(f"\n# policy {policy.source}: OK" + (f", {len(warnings)} warning(s)" if warnings else ""))
    for w in warnings:
        print(f"# warning: {w}")
    print(render_policy(policy, only_changed=args.changed))
    return 0


def _serve(args) -> int:
    from .app import serve
    return serve(args.config)


def _postfix_check(args) -> int:
    from .commands.postfix_check import run
    try:
        return run(quarantine_command.config_path(args.config), args.main_cf, args.clamd_conf,
                   connect=not args.no_connect, timeout=args.timeout)
    except config.ConfigError as e:
        return _fatal(e)


def _selftest(args) -> int:
    from . import scanners
    from .commands.selftest import run
    try:
        cfg = None if args.socket else config.load(quarantine_command.config_path(args.config))
    except config.ConfigError as e:
        return _fatal(e)
    # the members of each engine's pool are pinged as the configuration names them
    return run(args.socket or cfg.milter_socket, args.timeout, engines=scanners.from_settings(cfg) if cfg else (),
               cfg=cfg)


def _explain(args) -> int:
    from . import scanners, sharedlists
    from .commands.explain import explain
    from .policy import Envelope
    try:
        cfg, policy, warnings = policyfile.load_settings_and_policy(args.config)
        policy, lists_note = sharedlists.for_command(cfg, policy)      # shared_lists: the database's too
        with open(args.message, "rb") as f:
            data = f.read()
    except config.ConfigError as e:
        return _fatal(e)
    except OSError as e:
        return _fatal(f"{args.message}: {e.strerror}")
    envelope = Envelope(args.client_ip, args.auth_user, args.daemon, args.sender, tuple(args.rcpt))
    if lists_note:
        print(lists_note)
    print(explain(data, envelope, policy, scanners.from_settings(cfg), cfg.message_size_limit, args.score,
                  tuple(args.virus)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scanmilter", description="Mail content filter for Postfix "
                                     "(clamd and spamd over the milter protocol)")
    parser.add_argument("--version", action="version", version=f"scanmilter {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the milter daemon")
    p.add_argument("-c", "--config", help="configuration file (TOML); without it, all defaults")
    p.set_defaults(func=_serve)

    p = sub.add_parser("check-config", help="validate configuration and policy; print the effective settings")
    p.add_argument("-c", "--config", help="configuration file (TOML)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-n", dest="changed", action="store_true", help="only settings changed from the defaults")
    g.add_argument("-d", dest="defaults", action="store_true", help="the defaults, ignoring the file")
    p.set_defaults(func=_check_config)

    p = sub.add_parser("explain", help="show how the policy decides for one message file")
    p.add_argument("message", help="the message (RFC 5322 file, as Postfix would receive it)")
    p.add_argument("-c", "--config", help="configuration file (TOML)")
    p.add_argument("--client-ip", default="192.0.2.1", help="the SMTP client's address (default 192.0.2.1)")
    p.add_argument("--auth-user", default="", help="SASL login of the sender, if any")
    p.add_argument("--daemon", default="", help="Postfix service name ({daemon_name}), e.g. submission")
    p.add_argument("--from", dest="sender", default="", help="envelope sender")
    p.add_argument("--rcpt", action="append", default=[], help="envelope recipient (repeat for more)")
    p.add_argument("--score", type=float, help="use this spam score instead of asking spamd")
    p.add_argument("--virus", action="append", default=[], help="pretend clamd found this (repeatable)")
    p.set_defaults(func=_explain)

    quarantine_command.add_parser(sub)
    lists_command.add_parser(sub)
    web_command.add_parser(sub)

    p = sub.add_parser("postfix-check", help="compare Postfix's and clamd's settings with scanmilter's, and "
                       "check that Postfix can reach the running daemon")
    p.add_argument("-c", "--config", help=f"scanmilter configuration file (default $SCANMILTER_CONFIG or "
                                          f"{quarantine_command.DEFAULT_CONFIG})")
    p.add_argument("--main-cf", help="a Postfix main.cf to check (default: the running system's, via postconf)")
    p.add_argument("--clamd-conf", default="/etc/clamav/clamd.conf", help="clamd.conf (default %(default)s)")
    p.add_argument("--no-connect", action="store_true",
                   help="only compare the files: do not look for the socket, connect as Postfix, or negotiate")
    p.add_argument("--timeout", type=float, default=CONNECT_TIMEOUT,
                   help="seconds to wait for the milter to connect and answer (default %(default)s)")
    p.set_defaults(func=_postfix_check)

    p = sub.add_parser("selftest", help="send a clean message, GTUBE and EICAR to a running scanmilter")
    p.add_argument("-c", "--config", help=f"configuration file, whose milter_socket is used (default "
                                          f"$SCANMILTER_CONFIG or {quarantine_command.DEFAULT_CONFIG})")
    p.add_argument("--socket", help="milter address instead, e.g. unix:/run/scanmilter/scanmilter.sock")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per case (default 60)")
    p.set_defaults(func=_selftest)

    args = parser.parse_args(argv)
    if args.command == "explain" and not args.rcpt:
        parser.error("explain needs at least one --rcpt")
    try:
        status = args.func(args)
        sys.stdout.flush()          # a closed pipe shows here, not in the flush at exit
    except BrokenPipeError:
        return _output_closed()
    return status


def _output_closed() -> int:
    """The reader of our output went away (`| head`). End quietly with the status of a Unix tool
    killed by SIGPIPE, 141, so that `set -o pipefail` sees what it sees for `cat`; SIGPIPE itself
    stays ignored, as Python sets it, so that a peer closing a socket never kills a release."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())       # the interpreter's last flush then goes nowhere
    except (OSError, ValueError):
        pass                                        # no file descriptor (output captured in-process)
    return 128 + signal.SIGPIPE
