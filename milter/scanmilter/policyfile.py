"""Read a policy file into a Policy, checking every key, value and rule with its file and line.

The layout (policies/default.toml spells out every default):
  [directions]                   internal_networks, authenticated_is_outbound, outbound_services
  [inbound] / [outbound]         the direction settings (config.DIRECTION_SETTINGS)
  [inbound.domains."example.org"]       overrides for recipients in a domain
  [inbound.recipients."a@example.org"]  overrides for one recipient
  [lists]                        allow_* / block_* lists
  [virus_classes]                "Heuristics.*" = "tag", ...
  [[header_rewrite]]             direction, action (add/remove/replace), name, match, value
Errors stop start-up (and a reload); warnings point at rules that can never matter.
"""
from __future__ import annotations

import ipaddress
import math
import re
from typing import Any

from . import config, quarantine
from .config import ConfigError
from .policy import INBOUND, OUTBOUND, VERDICT_HEADER_PREFIXES, VIRUS_ACTIONS, HeaderRewrite, Policy

TOP_LEVEL = ("directions", INBOUND, OUTBOUND, "lists", "virus_classes", "header_rewrite")
_DIRECTION_KEYS = {s.name for s in config.DIRECTION_SETTINGS}
_HEADER_NAME = re.compile(r"[!-9;-~]+")     # RFC 5322 field name: printable ASCII but ':'


def direction_defaults(direction: str) -> dict[str, Any]:
    values = {s.name: s.default for s in config.DIRECTION_SETTINGS}
    if direction == OUTBOUND:
        values.update(config.OUTBOUND_DEFAULTS)
    return values


def load_settings_and_policy(config_path: str | None) -> tuple[config.Values, Policy, list[str]]:
    """The settings of `config_path` (None: the defaults), the policy they name, and the warnings
    about both. Raises ConfigError."""
    cfg = config.load(config_path)
    policy, warnings = check(cfg.policy_file, quarantine_available=bool(quarantine.location(cfg)))
    return cfg, policy, warnings + [f"{cfg.source}: {gap}" for gap in config.size_gaps(cfg)]


def load(path: str, quarantine_available: bool = False) -> Policy:
    return check(path, quarantine_available)[0]


def check(path: str, quarantine_available: bool = False) -> tuple[Policy, list[str]]:
    """(policy, warnings) from `path` ("": the built-in defaults). Raises ConfigError."""
    data = config.read_toml(path) if path else {}
    text = config.read_text(path) if path else None
    source = path or "default policy"

    def where(table: tuple[str, ...], key: str | None = None) -> str:
        return config.locate(source, text, table, key)

    for key in data:
        if key not in TOP_LEVEL:
            raise ConfigError(f"{where((), key)}: unknown table or setting {key!r}; known: {', '.join(TOP_LEVEL)}")
        if key != "header_rewrite" and not isinstance(data[key], dict):
            raise ConfigError(f"{where((), key)}: {key} must be a table ([{key}])")

    dirs = config.validate(config.DIRECTIONS_SETTINGS, data.get("directions", {}),
                           lambda k: where(("directions",), k))
    dirs = {s.name: s.default for s in config.DIRECTIONS_SETTINGS} | dirs
    lists = config.validate(config.LISTS_SETTINGS, data.get("lists", {}), lambda k: where(("lists",), k))
    lists = {s.name: s.default for s in config.LISTS_SETTINGS} | lists

    directions, domains, recipients = {}, {}, {}
    for d in (INBOUND, OUTBOUND):
        table = dict(data.get(d, {}))
        doms, rcpts = table.pop("domains", {}), table.pop("recipients", {})
        directions[d] = direction_defaults(d) | _direction_settings(table, (d,), where)
        domains[d] = {}
        for name, override in doms.items():
            if "@" in name or not re.fullmatch(r"[A-Za-z0-9.-]+", name):
                raise ConfigError(f"{where((d, 'domains', name))}: {name!r} is not a domain")
            domains[d][name.lower()] = _direction_settings(override, (d, "domains", name), where)
        recipients[d] = {}
        for name, override in rcpts.items():
            if not re.fullmatch(r"[^@\s]+@[A-Za-z0-9.-]+", name):
                raise ConfigError(f"{where((d, 'recipients', name))}: {name!r} is not an address")
            recipients[d][name.lower()] = _direction_settings(override, (d, "recipients", name), where)

    virus_classes = []
    for pattern, action in data.get("virus_classes", {}).items():
        if action not in VIRUS_ACTIONS:
            raise ConfigError(f"{where(('virus_classes',), pattern)}: {pattern!r} must be one of "
                              f"{', '.join(VIRUS_ACTIONS)}, not {action!r}")
        virus_classes.append((pattern, action))

    rewrites = tuple(_rewrite(rule, n, source, text) for n, rule in enumerate(data.get("header_rewrite", []), 1))

    policy = Policy(
        source=source, directions=directions, domains=domains, recipients=recipients,
        internal_networks=_networks(dirs["internal_networks"]),
        authenticated_is_outbound=dirs["authenticated_is_outbound"],
        outbound_services=frozenset(dirs["outbound_services"]),
        allow_senders=_addresses(lists["allow_senders"]), allow_clients=_networks(lists["allow_clients"]),
        allow_senders_clients=_networks(lists["allow_senders_clients"]),
        allow_recipients=_addresses(lists["allow_recipients"]),
        block_senders=_addresses(lists["block_senders"]), block_clients=_networks(lists["block_clients"]),
        block_recipients=_addresses(lists["block_recipients"]),
        allow_skips_virus_scan=lists["allow_skips_virus_scan"],
        virus_classes=tuple(virus_classes), rewrites=rewrites, quarantine_available=quarantine_available)
    warnings = _check_rules(policy, data, where)
    return policy, warnings


def _direction_settings(table: dict, path: tuple[str, ...], where) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where(path)}: [{'.'.join(path)}] must be a table")
    nested = [k for k, v in table.items() if isinstance(v, dict)]
    if nested:
        k = nested[0]
        raise ConfigError(f"{where(path + (k,))}: unknown table {k!r} in [{'.'.join(path)}]; "
                          "overrides go in [DIRECTION.domains.\"example.org\"] or [DIRECTION.recipients.\"a@b\"]")
    return config.validate(config.DIRECTION_SETTINGS, table, lambda k: where(path, k))


def _networks(items: list[str]) -> tuple:
    return tuple(ipaddress.ip_network(i, strict=False) for i in items)


def _addresses(items: list[str]) -> frozenset:
    return frozenset(i.lower() for i in items)


def _rewrite(rule: Any, n: int, source: str, text: str | None) -> HeaderRewrite:
    here = _nth_array_table(source, text, "header_rewrite", n)
    if not isinstance(rule, dict):
        raise ConfigError(f"{here}: [[header_rewrite]] entries must be tables")
    unknown = set(rule) - {"direction", "action", "name", "match", "value"}
    if unknown:
        raise ConfigError(f"{here}: unknown key {sorted(unknown)[0]!r} in [[header_rewrite]] "
                          "(known: direction, action, name, match, value)")
    direction, action = rule.get("direction", "any"), rule.get("action")
    name, match, value = rule.get("name", ""), rule.get("match"), rule.get("value", "")
    if direction not in (INBOUND, OUTBOUND, "any"):
        raise ConfigError(f"{here}: direction must be inbound, outbound or any, not {direction!r}")
    if action not in config.HEADER_REWRITE_ACTIONS:
        raise ConfigError(f"{here}: action must be one of add, remove, replace, not {action!r}")
    if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
        raise ConfigError(f"{here}: name must be a header field name, not {name!r}")
    if name.lower().startswith(VERDICT_HEADER_PREFIXES) and action != "remove":
        raise ConfigError(f"{here}: {name} is a verdict header scanmilter owns; it can only be removed")
    if action in ("add", "replace") and (not isinstance(value, str) or not value.strip()):
        raise ConfigError(f"{here}: action {action} needs a value")
    if action == "add" and match is not None:
        raise ConfigError(f"{here}: match means nothing for action add")
    try:
        pattern = re.compile(match) if match is not None else None
    except (re.error, TypeError) as e:
        raise ConfigError(f"{here}: match is not a valid regular expression: {e}") from None
    return HeaderRewrite(direction, action, name, pattern, value, here)


def _nth_array_table(source: str, text: str | None, name: str, n: int) -> str:
    if text:
        count = 0
        for number, line in enumerate(text.splitlines(), 1):
            if re.fullmatch(rf"\s*\[\[\s*{name}\s*\]\]\s*(#.*)?", line):
                count += 1
                if count == n:
                    return f"{source}:{number}"
    return f"{source} ([[{name}]] #{n})"


def _check_rules(policy: Policy, data: dict, where) -> list[str]:
    """Thresholds out of order are errors; rules that can never matter are warnings."""
    warnings = []
    scopes = [((d,), policy.directions[d]) for d in (INBOUND, OUTBOUND)]
    for d in (INBOUND, OUTBOUND):
        for kind, table in (("domains", policy.domains[d]), ("recipients", policy.recipients[d])):
            for key, override in table.items():
                base = dict(policy.directions[d])
                if kind == "recipients":
                    base.update(policy.domains[d].get(key.rpartition("@")[2], {}))
                scopes.append(((d, kind, key), base | override))
    for path, s in scopes:
        name = f'[{path[0]}.{path[1]}."{path[2]}"]' if len(path) == 3 else f"[{path[0]}]"
        levels = {k: s[k] for k in ("tag_level", "subject_tag_level", "quarantine_level", "reject_level")
                  if s[k] != "spamd"}
        if "tag_level" in levels and levels["tag_level"] > levels["reject_level"]:
            raise ConfigError(f"{where(path, 'tag_level')}: thresholds out of order in {name}: "
                              f"tag_level {levels['tag_level']} is above reject_level {levels['reject_level']}")
        if "subject_tag_level" in levels and "tag_level" in levels and \
                levels["subject_tag_level"] < levels["tag_level"]:
            raise ConfigError(f"{where(path, 'subject_tag_level')}: thresholds out of order in {name}: "
                              f"subject_tag_level {levels['subject_tag_level']} is below tag_level "
                              f"{levels['tag_level']} (a tagged Subject without X-Spam-Flag)")
        if not math.isinf(s["quarantine_level"]) and s["quarantine_level"] >= s["reject_level"]:
            warnings.append(f"{where(path, 'quarantine_level')}: quarantine_level {s['quarantine_level']} is not "
                            f"below reject_level {s['reject_level']} in {name}: spam is never quarantined")
        if s["subject_tag"] and levels.get("subject_tag_level", 0) >= s["reject_level"]:
            warnings.append(f"{where(path, 'subject_tag_level')}: subject_tag_level is not below reject_level "
                            f"in {name}: no Subject is ever tagged")
        uses_quarantine = s["virus_action"] == "quarantine" or not math.isinf(s["quarantine_level"])
        if uses_quarantine and not policy.quarantine_available:
            key = "virus_action" if s["virus_action"] == "quarantine" else "quarantine_level"
            raise ConfigError(f"{where(path, key)}: {key} in {name} needs the quarantine store: "
                              "set quarantine_directory")
    for pattern, action in policy.virus_classes:
        if action == "quarantine" and not policy.quarantine_available:
            raise ConfigError(f"{where(('virus_classes',), pattern)}: quarantine needs the quarantine store: "
                              "set quarantine_directory")
    for kind in ("senders", "clients", "recipients"):
        allow, block = getattr(policy, f"allow_{kind}"), getattr(policy, f"block_{kind}")
        for entry in sorted(set(map(str, allow)) & set(map(str, block))):
            warnings.append(f"{where(('lists',), f'allow_{kind}')}: {entry} is in both allow_{kind} and "
                            f"block_{kind}: the block list wins")
    for d in (INBOUND, OUTBOUND):
        for address in policy.recipients[d]:
            if address in policy.block_recipients:
                warnings.append(f"{where((d, 'recipients', address))}: rules for {address} never apply: "
                                "the address is in block_recipients")
    return warnings
