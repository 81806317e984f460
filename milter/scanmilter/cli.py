"""Command line: scanmilter serve | check-config | version. Never imports Milter itself."""
from __future__ import annotations

import argparse
import sys

from . import __version__, config


def _check_config(args) -> int:
    try:
        cfg = config.load(args.config)
        policy = config.load_policy(cfg.policy_file)
    except config.ConfigError as e:
        print(f"scanmilter: fatal: {e}", file=sys.stderr)
        return 1
    print(f"# {cfg.source}: OK")
    print(config.render(cfg, only_changed=args.changed, defaults=args.defaults))
    print(f"\n# policy: {policy.source}")
    print(config.render(policy, only_changed=args.changed, defaults=args.defaults))
    return 0


def _serve(args) -> int:
    from .app import serve
    return serve(args.config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scanmilter", description="Mail content filter for Postfix "
                                     "(clamd and spamd over the milter protocol)")
    parser.add_argument("--version", action="version", version=f"scanmilter {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the milter daemon")
    p.add_argument("-c", "--config", help="configuration file (TOML); without it, all defaults")
    p.set_defaults(func=_serve)

    p = sub.add_parser("check-config", help="validate the configuration and print the effective settings")
    p.add_argument("-c", "--config", help="configuration file (TOML)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-n", dest="changed", action="store_true", help="only settings changed from the defaults")
    g.add_argument("-d", dest="defaults", action="store_true", help="the defaults, ignoring the file")
    p.set_defaults(func=_check_config)

    args = parser.parse_args(argv)
    return args.func(args)
