"""Read a policy file into a Policy, checking every key, value and rule with its file and line.

The layout (policies/default.toml spells out every default):
  [directions]                   internal_networks, authenticated_is_outbound, outbound_services
  [inbound] / [outbound]         the direction settings (config.DIRECTION_SETTINGS)
  [inbound.domains."example.org"]       overrides for recipients in a domain
  [inbound.recipients."a@example.org"]  overrides for one recipient
  [lists]                        allow_* / block_* lists
  [virus_classes]                "Heuristics.*" = "tag", ...
  [[header_rewrite]]             direction, action (add/remove/replace), name, match, value
  [files.rules.NAME]             what an attachment rule matches (names, extensions, types, macros, ...)
  [inbound.files]                NAME = "reject" | "quarantine" | "discard" | "tag" | "accept", per rule;
                                 also in the domain and recipient overrides ([inbound.domains."x".files])
  [notify]                       send, admin_only_reasons; [notify.domains], [notify.recipients]: true/false
Errors stop start-up (and a reload); warnings point at rules that can never matter.
"""
from __future__ import annotations

import difflib
import ipaddress
import math
import re
from typing import Any

from . import config, quarantine
from .config import ConfigError
from .policy import (ACCEPT, FILE_ACTIONS, FILE_PREFIX, INBOUND, OUTBOUND, PROBLEM_SETTINGS, QUARANTINE,
                     VERDICT_HEADER_PREFIXES, VIRUS_ACTIONS, FileRule, HeaderRewrite, NotifyRules, Policy)

TOP_LEVEL = ("directions", INBOUND, OUTBOUND, "lists", "virus_classes", "header_rewrite", "notify", "files")
_DIRECTION_KEYS = {s.name for s in config.DIRECTION_SETTINGS}
_HEADER_NAME = re.compile(r"[!-9;-~]+")     # RFC 5322 field name: printable ASCII but ':'


def direction_defaults(direction: str) -> dict[str, Any]:
    values = {s.name: s.default for s in config.DIRECTION_SETTINGS}
    if direction == OUTBOUND:
        values.update(config.OUTBOUND_DEFAULTS)
    return values


# ---- the attachment rules ([files]) ---------------------------------------------------------------
# The built-in rules, as policies/default.toml spells them out (policies/README.md gives the
# sources: Amavis's stock $banned_filename_re and rspamd's mime_types `bad_extensions`).
DEFAULT_FILE_RULES: dict[str, dict[str, Any]] = {
    "executable": {
        "description": "Windows programs, installers, libraries, shortcuts, help files and Office or Access "
                       "objects that run code",
        "extensions": ["exe", "com", "scr", "pif", "cpl", "dll", "ocx", "sys", "drv", "vxd", "lib", "msi", "msp",
                       "mst", "msu", "msc", "app", "gadget", "jar", "jnlp", "xbap", "lnk", "hta", "chm", "hlp",
                       "cnt", "hpj", "diagcab", "ade", "adp", "ins", "isp", "its", "mad", "maf", "mag", "mam",
                       "maq", "mar", "mas", "mat", "mau", "mav", "maw", "mcf", "mda", "mdb", "mde", "mdt", "mdw",
                       "mdz", "xll", "crt"],
        "declared_types": ["application/x-msdownload", "application/x-msdos-program", "application/x-dosexec",
                           "application/x-ms-dos-executable", "application/vnd.microsoft.portable-executable",
                           "application/hta", "application/x-ms-shortcut", "application/x-msi"],
        "detected_types": ["application/vnd.microsoft.portable-executable", "application/x-dosexec",
                           "application/x-msdownload", "application/x-msi", "application/x-ms-shortcut",
                           "application/vnd.ms-htmlhelp", "application/java-archive"],
    },
    "script": {
        "description": "scripts and command files Windows runs or imports when they are opened (JScript, "
                       "VBScript, Windows Script Host, PowerShell, batch, registry and setup files, Internet "
                       "shortcuts)",
        "extensions": ["js", "jse", "vb", "vbe", "vbs", "vbp", "wsc", "wsf", "wsh", "ws", "sct", "shb", "shs",
                       "bat", "cmd", "bas", "ps1", "ps1xml", "ps2", "ps2xml", "psc1", "psc2", "psd1", "psdm1",
                       "msh", "msh1", "msh2", "mshxml", "msh1xml", "msh2xml", "reg", "inf", "scf", "url",
                       "website", "theme", "printerexport", "prf", "plg", "ops", "osd", "pcd", "grp", "fxp",
                       "prg", "pst", "xnk", "vsmacros", "vsw", "webpnp", "nsh", "asp", "csh", "ksh", "pl"],
        "detected_types": ["text/x-msdos-batch"],
    },
    "disk-image": {
        "description": "disk images (Windows opens them as a drive, and their files lose the mark of the web)",
        "extensions": ["iso", "img", "vhd", "vhdx"],
        "detected_types": ["application/x-iso9660-image"],
    },
    "deceptive-name": {
        "description": "names that hide what they are: bidi overrides, invisible or control characters, "
                       "letters of another script that look like Latin ones",
        "name_tricks": ["bidi controls", "invisible characters", "control characters", "look-alike letters"],
    },
    "office-macros": {
        "description": "Office documents with VBA macros (OLE and Office Open XML)",
        "macros": True,
    },
    "encrypted": {
        "description": "encrypted archives, archive members and Office documents: nothing inside can be checked",
        "encrypted": True,
    },
}
# What each direction does with the built-in rules: inbound executables, scripts and disk images
# are refused; outbound mail (your own users) is only marked in the log and the metrics.
DEFAULT_FILE_ACTIONS = {
    INBOUND: {"executable": "reject", "script": "reject", "disk-image": "reject", "deceptive-name": "tag",
              "office-macros": "tag", "encrypted": "tag"},
    OUTBOUND: {"executable": "tag", "script": "tag", "disk-image": "tag", "deceptive-name": "tag",
               "office-macros": "accept", "encrypted": "accept"},
}
# What the normal form of a name can undo (attachments/names.py), for `name_tricks`.
NAME_TRICKS = ("bidi controls", "invisible characters", "control characters", "trailing dots or spaces",
               "compatibility characters", "mixed scripts", "look-alike letters", "directory part")
_RULE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")
_TYPE_PATTERN = re.compile(r"[a-z0-9.+_*?\[\]!-]+/[a-z0-9.+_*?\[\]!-]+")
_RULE_KEYS = {"description": str, "names": list, "extensions": list, "declared_types": list,
              "detected_types": list, "macros": bool, "encrypted": bool, "name_tricks": list}


def file_rule(name: str, table: Any, where) -> FileRule:
    """One [files.rules.NAME] table, checked; `where(key)` names its file and line."""
    if not _RULE_NAME.fullmatch(name):
        raise ConfigError(f"{where(None)}: rule name {name!r}: use lower-case letters, digits and '-' "
                          "(at most 40; it labels metrics and replies)")
    if not isinstance(table, dict):
        raise ConfigError(f"{where(None)}: [files.rules.{name}] must be a table")
    for key, value in table.items():
        kind = _RULE_KEYS.get(key)
        if kind is None:
            raise ConfigError(f"{where(key)}: unknown key {key!r} in [files.rules.{name}]; known: "
                              f"{', '.join(_RULE_KEYS)}")
        if not isinstance(value, kind) or kind is list and not all(isinstance(v, str) and v for v in value):
            what = {str: "a string", bool: "true or false", list: "a list of non-empty strings"}[kind]
            raise ConfigError(f"{where(key)}: {key} in [files.rules.{name}] must be {what}, not {value!r}")
    extensions = [e.strip().lstrip(".").casefold() for e in table.get("extensions", [])]
    bad = [e for e in extensions if not e or "." in e or "/" in e or "*" in e]
    if bad:
        raise ConfigError(f"{where('extensions')}: {bad[0]!r} is not an extension (write \"exe\", not \"*.exe\"; "
                          "patterns go in names)")
    types = {}
    for key in ("declared_types", "detected_types"):
        types[key] = [v.strip().lower() for v in table.get(key, [])]
        bad = [v for v in types[key] if not _TYPE_PATTERN.fullmatch(v)]
        if bad:
            raise ConfigError(f"{where(key)}: {bad[0]!r} is not a content type or a pattern of them "
                              "(\"application/x-msdownload\", \"application/x-ms*\")")
    tricks = table.get("name_tricks", [])
    unknown = [x for x in tricks if x not in NAME_TRICKS]
    if unknown:
        raise ConfigError(f"{where('name_tricks')}: unknown name trick {unknown[0]!r}; known: "
                          f"{', '.join(NAME_TRICKS)}")
    rule = FileRule(name, table.get("description", ""), tuple(n.casefold() for n in table.get("names", [])),
                    frozenset(extensions), tuple(types["declared_types"]), tuple(types["detected_types"]),
                    table.get("macros", False), table.get("encrypted", False), frozenset(tricks), where(None))
    if not (rule.names or rule.extensions or rule.declared_types or rule.detected_types or rule.macros
            or rule.encrypted or rule.name_tricks):
        raise ConfigError(f"{where(None)}: [files.rules.{name}] matches nothing: give it names, extensions, "
                          "declared_types, detected_types, name_tricks, macros or encrypted")
    return rule


def _file_rules(data: dict, where) -> tuple[FileRule, ...]:
    """The built-in rules, each replaced whole by a file's rule of the same name, then the file's
    own new rules in the order written."""
    files = data.get("files", {})
    if not isinstance(files, dict):
        raise ConfigError(f"{where((), 'files')}: files must be a table ([files])")
    unknown = [k for k in files if k != "rules"]
    if unknown:
        raise ConfigError(f"{where(('files',), unknown[0])}: unknown key {unknown[0]!r} in [files]; rules go in "
                          "[files.rules.NAME], their actions in [inbound.files] and [outbound.files]")
    written = files.get("rules", {})
    if not isinstance(written, dict):
        raise ConfigError(f"{where(('files',), 'rules')}: rules must be tables: [files.rules.NAME]")
    rules = {name: file_rule(name, table, lambda k, n=name: where(("files", "rules", n), k))
             for name, table in written.items()}
    builtin = [rules.pop(name, None) or file_rule(name, table, lambda k, n=name: f"built-in rule {n}")
               for name, table in DEFAULT_FILE_RULES.items()]
    return tuple(builtin) + tuple(rules.values())


def _file_actions(table: Any, path: tuple[str, ...], rules: tuple[FileRule, ...], where) -> dict[str, str]:
    """[DIRECTION.files] (or an override's .files): rule name -> action, as scope keys "files.NAME"."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where(path)}: [{'.'.join(path)}] must be a table of rule = action")
    names = {r.name for r in rules}
    out = {}
    for name, action in table.items():
        if name not in names:
            near = difflib.get_close_matches(name, names, n=1)
            raise ConfigError(f"{where(path, name)}: no rule {name!r} in [files.rules]"
                              + (f" (did you mean {near[0]}?)" if near else f"; known: {', '.join(sorted(names))}"))
        if action not in FILE_ACTIONS:
            raise ConfigError(f"{where(path, name)}: {name} must be one of {', '.join(FILE_ACTIONS)}, not {action!r}")
        out[FILE_PREFIX + name] = action
    return out


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

    rules = _file_rules(data, where)
    directions, domains, recipients, file_actions = {}, {}, {}, {}
    for d in (INBOUND, OUTBOUND):
        table = dict(data.get(d, {}))
        doms, rcpts = table.pop("domains", {}), table.pop("recipients", {})
        settings = _direction_settings(table, (d,), where, rules)
        directions[d] = direction_defaults(d) | {k: v for k, v in settings.items() if not k.startswith(FILE_PREFIX)}
        file_actions[d] = {FILE_PREFIX + r.name: DEFAULT_FILE_ACTIONS[d].get(r.name, ACCEPT) for r in rules} | \
            {k: v for k, v in settings.items() if k.startswith(FILE_PREFIX)}
        domains[d] = {}
        for name, override in doms.items():
            if "@" in name or not re.fullmatch(r"[A-Za-z0-9.-]+", name):
                raise ConfigError(f"{where((d, 'domains', name))}: {name!r} is not a domain")
            domains[d][name.lower()] = _direction_settings(override, (d, "domains", name), where, rules)
        recipients[d] = {}
        for name, override in rcpts.items():
            if not re.fullmatch(r"[^@\s]+@[A-Za-z0-9.-]+", name):
                raise ConfigError(f"{where((d, 'recipients', name))}: {name!r} is not an address")
            recipients[d][name.lower()] = _direction_settings(override, (d, "recipients", name), where, rules)

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
        virus_classes=tuple(virus_classes), rewrites=rewrites, quarantine_available=quarantine_available,
        notify=_notify(data.get("notify", {}), where), file_rules=rules, file_actions=file_actions)
    warnings = _check_rules(policy, data, where)
    return policy, warnings


def _direction_settings(table: dict, path: tuple[str, ...], where, rules: tuple[FileRule, ...] = ()) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where(path)}: [{'.'.join(path)}] must be a table")
    table = dict(table)
    files = table.pop("files", {})
    nested = [k for k, v in table.items() if isinstance(v, dict)]
    if nested:
        k = nested[0]
        raise ConfigError(f"{where(path + (k,))}: unknown table {k!r} in [{'.'.join(path)}]; "
                          "overrides go in [DIRECTION.domains.\"example.org\"] or [DIRECTION.recipients.\"a@b\"], "
                          "attachment rule actions in [DIRECTION.files]")
    return (config.validate(config.DIRECTION_SETTINGS, table, lambda k: where(path, k))
            | _file_actions(files, path + ("files",), rules, where))


def _notify(table: dict, where) -> NotifyRules:
    """[notify]: send (the default), admin_only_reasons, and true/false per domain and recipient."""
    unknown = set(table) - {"send", "admin_only_reasons", "domains", "recipients"}
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"{where(('notify',), key)}: unknown key {key!r} in [notify] "
                          "(known: send, admin_only_reasons, domains, recipients)")
    send, reasons = table.get("send", False), table.get("admin_only_reasons", ["virus"])
    if not isinstance(send, bool):
        raise ConfigError(f"{where(('notify',), 'send')}: send must be true or false, not {send!r}")
    if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
        raise ConfigError(f"{where(('notify',), 'admin_only_reasons')}: admin_only_reasons must be a list of "
                          f"reasons such as [\"virus\"], not {reasons!r}")
    chosen = {}
    for kind, pattern in (("domains", r"[A-Za-z0-9.-]+"), ("recipients", r"[^@\s]+@[A-Za-z0-9.-]+")):
        names = table.get(kind, {})
        if not isinstance(names, dict):
            raise ConfigError(f"{where(('notify', kind))}: [notify.{kind}] must be a table")
        for name, value in names.items():
            if not re.fullmatch(pattern, name) or not isinstance(value, bool):
                raise ConfigError(f"{where(('notify', kind), name)}: [notify.{kind}] takes "
                                  f"\"{'example.org' if kind == 'domains' else 'a@example.org'}\" = true or false, "
                                  f"not {name!r} = {value!r}")
        chosen[kind] = {name.lower(): value for name, value in names.items()}
    return NotifyRules(send, chosen["domains"], chosen["recipients"], frozenset(reasons))


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
    scopes = [((d,), policy.directions[d] | policy.file_actions.get(d, {})) for d in (INBOUND, OUTBOUND)]
    for d in (INBOUND, OUTBOUND):
        for kind, table in (("domains", policy.domains[d]), ("recipients", policy.recipients[d])):
            for key, override in table.items():
                base = policy.directions[d] | policy.file_actions.get(d, {})
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
        holding = [k for k in [a for _, a in PROBLEM_SETTINGS] + [k for k in s if k.startswith(FILE_PREFIX)]
                   if s.get(k) == QUARANTINE]
        if holding and not policy.quarantine_available:
            key = holding[0]
            shown, table = (key[len(FILE_PREFIX):], path + ("files",)) if key.startswith(FILE_PREFIX) else (key, path)
            raise ConfigError(f"{where(table, shown)}: {shown} = \"quarantine\" in {name} needs the quarantine "
                              "store: set quarantine_directory")
    for pattern, action in policy.virus_classes:
        if action == "quarantine" and not policy.quarantine_available:
            raise ConfigError(f"{where(('virus_classes',), pattern)}: quarantine needs the quarantine store: "
                              "set quarantine_directory")
    for kind in ("senders", "clients", "recipients"):
        allow, block = getattr(policy, f"allow_{kind}"), getattr(policy, f"block_{kind}")
        for entry in sorted(set(map(str, allow)) & set(map(str, block))):
            warnings.append(f"{where(('lists',), f'allow_{kind}')}: {entry} is in both allow_{kind} and "
                            f"block_{kind}: the block list wins")
    for rule in policy.file_rules:
        actions = [policy.file_actions.get(d, {}).get(FILE_PREFIX + rule.name, ACCEPT) for d in (INBOUND, OUTBOUND)]
        actions += [o.get(FILE_PREFIX + rule.name, ACCEPT) for d in (INBOUND, OUTBOUND)
                    for table in (policy.domains[d], policy.recipients[d]) for o in table.values()]
        if all(a == ACCEPT for a in actions):
            warnings.append(f"{rule.where}: rule {rule.name} has no action but accept in any [DIRECTION.files] "
                            "table: it never acts")
    for d in (INBOUND, OUTBOUND):
        for address in policy.recipients[d]:
            if address in policy.block_recipients:
                warnings.append(f"{where((d, 'recipients', address))}: rules for {address} never apply: "
                                "the address is in block_recipients")
    return warnings
