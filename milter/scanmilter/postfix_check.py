"""`scanmilter postfix-check`: read Postfix's configuration (through `postconf`, so Postfix's own
defaults and $name expansion apply), clamd.conf and scanmilter's settings, and report every
mismatch with its fix. Exit 1 when there is an error, else 0."""
from __future__ import annotations

import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass

from . import config, policyfile

CONTENT_TIMEOUT_MARGIN = 5.0     # seconds Postfix should wait beyond scanmilter's slowest engine
_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}
_TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclass
class Finding:
    level: str        # error | warning
    text: str
    fix: str


def postconf(main_cf: str | None) -> dict[str, str]:
    """Effective Postfix parameters: of the running system, or of a given main.cf file."""
    binary = shutil.which("postconf") or "/usr/sbin/postconf"
    if main_cf is None:
        out = subprocess.run([binary], capture_output=True, text=True, timeout=30)
    else:
        with tempfile.TemporaryDirectory() as d:
            shutil.copy(main_cf, os.path.join(d, "main.cf"))
            master = os.path.join(os.path.dirname(os.path.abspath(main_cf)), "master.cf")
            if os.path.exists(master):
                shutil.copy(master, os.path.join(d, "master.cf"))
            out = subprocess.run([binary, "-c", d], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise config.ConfigError(f"postconf failed: {out.stderr.strip() or out.returncode}")
    params = {}
    for line in out.stdout.splitlines():
        name, sep, value = line.partition(" = ")
        if sep:
            params[name.strip()] = value.strip()
    return params


def master_services(master_cf: str) -> list[list[str]]:
    """master.cf entries as field lists (continuation lines joined)."""
    try:
        text = open(master_cf).read()
    except OSError:
        return []
    entries, current = [], ""
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line[0].isspace() and current:
            current += " " + line.strip()
        else:
            if current:
                entries.append(current.split())
            current = line.strip()
    if current:
        entries.append(current.split())
    return entries


def clamd_conf(path: str) -> dict[str, str]:
    values = {}
    try:
        for line in open(path):
            line = line.strip()
            if line and not line.startswith("#"):
                key, _, value = line.partition(" ")
                values[key] = value.strip()
    except OSError:
        pass
    return values


def size(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([kKmMgG]?)[bB]?", text.strip())
    if not m:
        raise ValueError(text)
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+)([smhdw]?)", text.strip())
    if not m:
        raise ValueError(text)
    return int(m.group(1)) * _TIME_UNITS[m.group(2) or "s"]


def _macros(value: str) -> set[str]:
    return {m.strip("{}") for m in value.replace(",", " ").split()}


def postfix_address(milter_socket: str, chroot: str | None) -> set[str]:
    """How Postfix may name scanmilter's socket."""
    kind, _, where = milter_socket.partition(":")
    if kind in ("unix", "local"):
        names = {f"unix:{where}", where}
        if chroot and where.startswith(chroot.rstrip("/") + "/"):
            inside = where[len(chroot.rstrip("/")):]
            names |= {f"unix:{inside}", inside}
        return names
    port, _, host = where.partition("@")
    return {f"inet:{host}:{port}"}


def check(params: dict[str, str], cfg, policy, clamd: dict[str, str], services: list[list[str]]) -> list[Finding]:
    out: list[Finding] = []

    def error(text, fix):
        out.append(Finding("error", text, fix))

    def warning(text, fix):
        out.append(Finding("warning", text, fix))

    queue_dir = params.get("queue_directory", "/var/spool/postfix")
    smtpd = [s for s in services if len(s) >= 8 and s[7] == "smtpd" and s[1] == "inet"]
    chrooted = [s[0] for s in smtpd if s[4] == "y"]
    wanted = postfix_address(cfg.milter_socket, queue_dir if chrooted else None)
    milters = params.get("smtpd_milters", "").replace(",", " ").split()
    if not set(milters) & wanted:
        error(f"smtpd_milters ({' '.join(milters) or 'empty'}) does not name scanmilter's socket",
              f"postconf -e 'smtpd_milters = {sorted(wanted)[0]}'")
    if chrooted and cfg.milter_socket.startswith(("unix:", "local:")):
        path = cfg.milter_socket.partition(":")[2]
        if not path.startswith(queue_dir.rstrip("/") + "/"):
            error(f"smtpd runs chrooted ({', '.join(chrooted)} in master.cf) but milter_socket {path} is "
                  f"outside {queue_dir}", f'milter_socket = "unix:{queue_dir}/scanmilter/scanmilter.sock" and '
                  "smtpd_milters = unix:/scanmilter/scanmilter.sock (or chroot n for smtpd in master.cf)")
    if not params.get("non_smtpd_milters", "").strip():
        warning("non_smtpd_milters is empty: mail submitted locally (sendmail, cron) is not scanned",
                "postconf -e 'non_smtpd_milters = $smtpd_milters'")
    action = params.get("milter_default_action", "tempfail")
    fail_open = all(policy.directions[d]["scan_failure_action"] == "accept" for d in policy.directions)
    if action == "accept" and not fail_open:
        error("milter_default_action = accept: while scanmilter is down Postfix delivers mail unscanned, "
              "but the policy tempfails when a scan fails", "postconf -e 'milter_default_action = tempfail'")
    elif action not in ("tempfail", "accept"):
        warning(f"milter_default_action = {action}: mail is {'rejected' if action == 'reject' else 'refused'} "
                "while scanmilter is down, instead of retried", "postconf -e 'milter_default_action = tempfail'")
    if int(params.get("milter_protocol", "6") or 6) < 6:
        warning("milter_protocol is below 6", "postconf -e 'milter_protocol = 6'")
    deadline = max([cfg.clamd_timeout if cfg.clamd_enabled else 0, cfg.spamd_timeout if cfg.spamd_enabled else 0])
    content_timeout = seconds(params.get("milter_content_timeout", "300s"))
    if content_timeout < deadline + CONTENT_TIMEOUT_MARGIN:
        error(f"milter_content_timeout ({content_timeout:.0f}s) is not above scanmilter's scan deadline "
              f"({deadline:.0f}s): Postfix gives up before the answer",
              f"postconf -e 'milter_content_timeout = {int(deadline + 60)}s' or lower clamd_timeout/spamd_timeout")
    mail_macros = _macros(params.get("milter_mail_macros", ""))
    mail_fix = ("postconf -e 'milter_mail_macros = i {auth_type} {auth_authen} {auth_author} {mail_addr} "
                "{mail_host} {mail_mailer}'")
    if policy.authenticated_is_outbound and "auth_authen" not in mail_macros:
        error("milter_mail_macros lacks {auth_authen}: authenticated senders would count as inbound", mail_fix)
    elif cfg.spamd_enabled and "auth_authen" not in mail_macros:
        warning("milter_mail_macros lacks {auth_authen}: spamd cannot see that a sender authenticated", mail_fix)
    if cfg.spamd_enabled and "j" not in _macros(params.get("milter_connect_macros", "")):
        warning("milter_connect_macros lacks j: the Received line spamd sees names this host 'localhost'",
                "postconf -e 'milter_connect_macros = j {daemon_name} {daemon_addr} v _'")
    if cfg.spamd_enabled and "tls_version" not in _macros(params.get("milter_helo_macros", "")):
        warning("milter_helo_macros lacks {tls_version}: spamd cannot see that a client used TLS",
                "postconf -e 'milter_helo_macros = {tls_version} {cipher} {cipher_bits} {cert_subject} "
                "{cert_issuer}'")
    if policy.outbound_services and "daemon_name" not in _macros(params.get("milter_connect_macros", "")):
        error("milter_connect_macros lacks {daemon_name}, but the policy uses outbound_services",
              "add {daemon_name} to milter_connect_macros")
    if "i" not in _macros(params.get("milter_end_of_data_macros", "")) | mail_macros:
        warning("the queue id macro i reaches scanmilter at no stage: its log lines cannot be matched to "
                "Postfix's", "postconf -e 'milter_end_of_data_macros = i'")
    postfix_limit = int(params.get("message_size_limit", "10240000") or 0)
    if postfix_limit == 0 or postfix_limit > cfg.message_size_limit:
        warning(f"Postfix accepts messages up to {postfix_limit or 'any size'} bytes, scanmilter stores "
                f"{cfg.message_size_limit}: larger ones get oversize_action "
                f"({policy.directions['inbound']['oversize_action']}), unscanned",
                f"message_size_limit = {postfix_limit} in scanmilter, or lower Postfix's message_size_limit")
    for gap in config.size_gaps(cfg):
        warning(f"{gap} (accepted marked unscanned with oversize_action = \"tag\")",
                "raise clamd_size_limit (and clamd's StreamMaxLength) to message_size_limit, use "
                "spamd_oversize_action = \"truncate\", or lower message_size_limit")
    if cfg.clamd_enabled and clamd and clamd.get("AlertExceedsMax", "no").lower() not in ("yes", "true", "on", "1"):
        error("clamd.conf lacks AlertExceedsMax yes: clamd answers OK for content over its MaxFileSize, "
              "MaxScanSize, MaxRecursion or MaxFiles, so an attachment past those limits passes unscanned",
              "AlertExceedsMax yes in clamd.conf (scanmilter then gives such mail oversize_action)")
    if cfg.clamd_enabled and "StreamMaxLength" in clamd:
        stream_max = size(clamd["StreamMaxLength"])
        if cfg.clamd_size_limit > stream_max:
            error(f"clamd_size_limit ({cfg.clamd_size_limit}) is above clamd's StreamMaxLength ({stream_max}): "
                  "clamd refuses those messages and they are tempfailed again and again",
                  f"clamd_size_limit = {stream_max}, or raise StreamMaxLength in clamd.conf")
    out += _socket_permissions(cfg)
    return out


def _socket_permissions(cfg) -> list[Finding]:
    kind, _, path = cfg.milter_socket.partition(":")
    if kind not in ("unix", "local"):
        return []
    try:
        postfix = pwd.getpwnam("postfix")
    except KeyError:
        return []
    mode = int(cfg.milter_socket_mode, 8)
    target = path if os.path.exists(path) else None
    if target:
        st = os.stat(target)
        mode, uid, gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
    else:
        uid, gid = -1, -1          # not created yet: judge by the mode scanmilter will give it
    writable = (uid == postfix.pw_uid and mode & 0o200) or (gid == postfix.pw_gid and mode & 0o020) \
        or mode & 0o002 or (not target and mode & 0o020)
    if not writable:
        return [Finding("error", f"Postfix (user postfix) cannot write to the milter socket {path} "
                                 f"(mode {mode:04o})",
                        'milter_socket_mode = "0660" with scanmilter running in group postfix (systemd: Group=postfix)')]
    return []


def run(config_path: str | None, main_cf: str | None, clamd_path: str, out=print) -> int:
    cfg = config.load(config_path)
    policy = policyfile.load(cfg.policy_file, quarantine_available=bool(cfg.quarantine_directory))
    params = postconf(main_cf)
    master = os.path.join(os.path.dirname(os.path.abspath(main_cf)) if main_cf else
                          params.get("config_directory", "/etc/postfix"), "master.cf")
    findings = check(params, cfg, policy, clamd_conf(clamd_path), master_services(master))
    for f in findings:
        out(f"{f.level}: {f.text}\n  fix: {f.fix}")
    errors = sum(f.level == "error" for f in findings)
    out(f"{errors} error(s), {len(findings) - errors} warning(s)" if findings else "OK: no mismatches found")
    return 1 if errors else 0
