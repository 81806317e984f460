"""`scanmilter postfix-check`: read Postfix's configuration (through `postconf`, so Postfix's own
defaults, $name expansion and master.cf parsing apply), clamd.conf and scanmilter's settings, and
report every mismatch with its fix. Then, unless --no-connect, meet the running daemon as Postfix
would: the socket exists, Postfix's user may connect to it, and a milter answers the negotiation;
and ping each member of an engine's pool of servers. Exit 1 when there is an error, else 0."""
from __future__ import annotations

import errno
import grp
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass, field

from .. import config, policyfile
from . import miltertalk

CONTENT_TIMEOUT_MARGIN = 5.0     # seconds Postfix should wait beyond scanmilter's slowest engine
CONNECT_TIMEOUT = 10.0           # seconds the live check waits to connect and for the milter's answer
TRANSPORTS = ("unix", "inet", "local")   # what Postfix's milter client accepts before the ':'
_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}


@dataclass
class Finding:
    level: str        # error | warning
    text: str
    fix: str


@dataclass
class Service:
    """One master.cf entry, as `postconf -M` and `postconf -P` read it."""
    name: str                    # e.g. smtp/inet
    chroot: bool
    command: str                 # smtpd, cleanup, ...
    overrides: dict[str, str] = field(default_factory=dict)     # -o name=value, expanded


def _parse_params(text: str) -> dict[str, str]:
    params = {}
    for line in text.splitlines():
        name, sep, value = line.partition(" =")      # "name =" when the value is empty
        if sep:
            params[name.strip()] = value.strip()
    return params


def read_postfix(main_cf: str | None) -> tuple[dict[str, str], dict[str, str], list[Service], str]:
    """Postfix's parameters, effective ($names expanded) and as written, master.cf services, and
    "" or why master.cf could not be read: of the running system, or of a given main.cf with the
    master.cf beside it."""
    binary = shutil.which("postconf") or "/usr/sbin/postconf"

    def postconf(*args):
        out = subprocess.run([binary, *args], capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise config.ConfigError(f"postconf failed: {out.stderr.strip() or out.returncode}")
        return out.stdout

    def read(*where):
        params, written = _parse_params(postconf(*where, "-x")), _parse_params(postconf(*where))
        services = {}
        for line in postconf(*where, "-M").splitlines():
            fields = line.split(None, 7)
            if len(fields) == 8:
                name = f"{fields[0]}/{fields[1]}"
                services[name] = Service(name, fields[4] == "y", fields[7].split()[0])   # "-": n since Postfix 3.0
        for key, value in _parse_params(postconf(*where, "-Px")).items():
            service, _, param = key.rpartition("/")
            if service in services:
                services[service].overrides[param] = value
        return params, written, list(services.values())

    if main_cf is None:
        return (*read(), "")
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(main_cf, os.path.join(d, "main.cf"))
        master = os.path.join(os.path.dirname(os.path.abspath(main_cf)), "master.cf")
        unread = ""
        try:
            shutil.copy(master, os.path.join(d, "master.cf"))
        except OSError as e:
            unread = f"{master}: {e.strerror or e}"
            open(os.path.join(d, "master.cf"), "w").close()
        # postconf waits for a file written within the last second to settle; these copies will not change
        for name in ("main.cf", "master.cf"):
            os.utime(os.path.join(d, name), (0, 0))
        return (*read("-c", d), unread)


def clamd_conf(path: str) -> tuple[dict[str, str], str]:
    """clamd.conf's settings, and "" or why the file could not be read."""
    values = {}
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    key, _, value = line.partition(" ")
                    values[key] = value.strip()
    except OSError as e:
        return {}, f"{path}: {e.strerror or e}"
    return values, ""


def size(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([kKmMgG]?)[bB]?", text.strip())
    if not m:
        raise ValueError(text)
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def _macros(value: str) -> set[str]:
    return {m.strip("{}") for m in value.replace(",", " ").split()}


# ---------------------------------------------------------------- milter lists

def milter_entries(value: str) -> list[tuple[str, str]]:
    """The entries of a Postfix milter list as (text, address): separated by space or comma; a
    group "{ address, option = value ... }" names its address first."""
    out = []
    for m in re.finditer(r"\{([^}]*)\}?|[^\s,{}]+", value):
        group = (m.group(1) or "").replace(",", " ").split()
        out.append((m.group(0), group[0] if group else m.group(0)))
    return out


def _bad_transport(address: str) -> bool:
    """Postfix refuses the whole milter list for this entry ("needs transport:endpoint")."""
    transport, sep, endpoint = address.partition(":")
    return not sep or not endpoint or transport not in TRANSPORTS


def _normal(address: str) -> str:
    """One spelling per endpoint: local: is unix:, paths without // or /./."""
    transport, _, endpoint = address.partition(":")
    if transport in ("unix", "local"):
        return "unix:" + os.path.normpath(endpoint)
    return address


def postfix_name(milter_socket: str, chroot_dir: str | None) -> str | None:
    """How a Postfix process, chrooted in chroot_dir or not, must name scanmilter's socket in its
    milter list; None when a chrooted process cannot reach it."""
    kind, _, where = milter_socket.partition(":")
    if kind in ("unix", "local"):
        path = os.path.normpath(where)
        if chroot_dir is None:
            return f"unix:{path}"
        root = os.path.normpath(chroot_dir)
        return f"unix:{path[len(root):]}" if path.startswith(root + "/") else None
    port, _, host = where.partition("@")
    return f"inet:{'[' + host + ']' if kind == 'inet6' else host}:{port}"


def _ours(address: str, milter_socket: str, queue_dir: str) -> bool:
    """Whether an entry means scanmilter's socket in any spelling: bare path, local:, or as seen
    from inside or outside the chroot."""
    transport, sep, endpoint = address.partition(":")
    if not sep and address.startswith("/"):
        transport, endpoint = "unix", address
    names = {postfix_name(milter_socket, None), postfix_name(milter_socket, queue_dir)}
    return _normal(f"{transport}:{endpoint}") in names


@dataclass
class _Use:
    """Services that read one milter list value, with the same chroot."""
    param: str                  # smtpd_milters | non_smtpd_milters
    value: str
    where: str                  # "main.cf", or the service whose -o sets it
    chroot: bool
    services: list[str]


def _uses(params: dict[str, str], services: list[Service]) -> list[_Use]:
    uses: dict[tuple, _Use] = {}
    for param, command, default in (("smtpd_milters", "smtpd", "smtp/inet"),
                                    ("non_smtpd_milters", "cleanup", "cleanup/unix")):
        # a master.cf without the service (a fragment): Postfix's default entry, not chrooted
        for s in [s for s in services if s.command == command] or [Service(default, False, command)]:
            if param in s.overrides:
                if not s.overrides[param].strip():
                    continue            # this service runs no milter on purpose (e.g. quarantine releases)
                value, where = s.overrides[param], s.name
            else:
                value, where = params.get(param, ""), "main.cf"
            key = (param, where, value, s.chroot)
            uses.setdefault(key, _Use(param, value, where, s.chroot, [])).services.append(s.name)
    return list(uses.values())


def _set(use: _Use, value: str) -> str:
    if use.where == "main.cf":
        return f"postconf -e '{use.param} = {value}'"
    return f"postconf -P '{use.where}/{use.param}={value}'"


def _fixed_list(use: _Use, wanted: str, cfg, queue_dir: str) -> str:
    """The list with scanmilter's entry spelled as `wanted` and every path given its transport."""
    out = []
    for text, address in milter_entries(use.value):
        if _ours(address, cfg.milter_socket, queue_dir):
            text = text.replace(address, wanted, 1)
        elif _bad_transport(address) and address.startswith("/"):
            text = text.replace(address, "unix:" + address, 1)
        if text not in out:
            out.append(text)
    if wanted not in [_normal(a) for t in out for _, a in milter_entries(t)]:
        out.append(wanted)
    return " ".join(out)


def _check_milters(params: dict[str, str], written: dict[str, str], services: list[Service], cfg) -> list[Finding]:
    """Every milter list Postfix uses names scanmilter's socket as that process sees it: smtpd
    reads smtpd_milters, cleanup non_smtpd_milters, each inside its chroot or not."""
    out: list[Finding] = []
    queue_dir = params.get("queue_directory", "/var/spool/postfix")
    uses = _uses(params, services)
    for use in uses:
        if (use.param == "non_smtpd_milters" and use.where == "main.cf"
                and re.fullmatch(r"\$(smtpd_milters|\{smtpd_milters\}|\(smtpd_milters\))",
                                 written.get("non_smtpd_milters", "").strip())
                and any(u.param == "smtpd_milters" and u.where == "main.cf" and u.chroot == use.chroot for u in uses)):
            continue        # what is said of smtpd_milters, and its fix, covers it
        daemons = ", ".join(use.services)
        wanted = postfix_name(cfg.milter_socket, queue_dir if use.chroot else None)
        entries = milter_entries(use.value)
        if wanted is None:          # a chrooted process and a socket outside the chroot: move the socket
            inside = "unix:/scanmilter/scanmilter.sock"
            fix = (f'milter_socket = "unix:{queue_dir}/scanmilter/scanmilter.sock" in scanmilter\'s configuration, '
                   f"then {_set(use, _fixed_list(use, inside, cfg, queue_dir))} (or chroot n for {daemons} in "
                   "master.cf)")
        else:
            fix = _set(use, _fixed_list(use, wanted, cfg, queue_dir))
        bad = [a for _, a in entries if _bad_transport(a)]
        for address in bad:
            out.append(Finding(
                "error", f"{use.param} entry {address!r} ({use.where}) is not transport:endpoint (unix:, inet: or "
                         "local:): Postfix refuses the whole list and answers '451 4.3.5 Server configuration "
                         "problem' to every message", fix))
        if wanted is None:
            path = cfg.milter_socket.partition(":")[2]
            daemon = "smtpd" if use.param == "smtpd_milters" else "cleanup"
            out.append(Finding("error", f"{daemon} runs chrooted ({daemons} in master.cf) but milter_socket {path} "
                                        f"is outside {queue_dir}: it cannot reach the socket", fix))
            continue
        if wanted in [_normal(a) for _, a in entries] or any(_ours(a, cfg.milter_socket, queue_dir) for a in bad):
            continue        # right, or already reported with its fix
        twins = [u for u in uses if (u.param, u.where, u.value) == (use.param, use.where, use.value)
                 and u.chroot != use.chroot]
        if twins:
            chrooted, free = (use, twins[0]) if use.chroot else (twins[0], use)
            text = (f"{use.param} ({use.where}) serves chrooted ({', '.join(chrooted.services)}) and unchrooted "
                    f"({', '.join(free.services)}) services: one unix path cannot name the socket for both")
            if text not in [f.text for f in out]:       # once for the pair
                out.append(Finding("error", text, "the same chroot column for these services in master.cf, or "
                                                  f"-o {use.param}=... for one of them"))
            continue
        if use.param == "non_smtpd_milters" and not entries:
            same = wanted in [_normal(a) for _, a in milter_entries(params.get("smtpd_milters", ""))]
            out.append(Finding("warning", "non_smtpd_milters is empty: mail submitted locally (sendmail, cron) "
                                          "is not scanned", _set(use, "$smtpd_milters" if same else wanted)))
            continue
        seen_as = [a for _, a in entries if _ours(a, cfg.milter_socket, queue_dir)]
        if seen_as:
            one = len(use.services) == 1
            view = (f"run{'s' * one} chrooted in {queue_dir}" if use.chroot
                    else f"do{'es' * one} not run chrooted")
            text = (f"{use.param} ({use.where}) names {seen_as[0]}, but {daemons} {view}: "
                    f"{'it reaches' if one else 'they reach'} scanmilter's socket as {wanted}")
        else:
            text = f"{use.param} ({use.value or 'empty'}) does not name scanmilter's socket"
        out.append(Finding("error", text, fix))
    return out


def kind_of(milter_socket: str) -> str:
    """unix or inet, whatever libmilter's spelling."""
    return "unix" if milter_socket.startswith(("unix:", "local:")) else "inet"


# ---------------------------------------------------------------- the checks of the configuration

def check(params: dict[str, str], written: dict[str, str], cfg, policy, clamd: dict[str, str],
          services: list[Service], socket_checked_live: bool = False) -> list[Finding]:
    out: list[Finding] = _check_milters(params, written, services, cfg)

    def error(text, fix):
        out.append(Finding("error", text, fix))

    def warning(text, fix):
        out.append(Finding("warning", text, fix))

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
    # the spam engine in force (spam_engine) judges the client and sets the deadline beside clamd
    spam_on = getattr(cfg, f"{cfg.spam_engine}_enabled")
    deadline = max([cfg.clamd_timeout if cfg.clamd_enabled else 0,
                    getattr(cfg, f"{cfg.spam_engine}_timeout") if spam_on else 0])
    content_timeout = config.duration(params.get("milter_content_timeout", "300s"), default_unit="s")
    if content_timeout < deadline + CONTENT_TIMEOUT_MARGIN:
        error(f"milter_content_timeout ({content_timeout:.0f}s) is not above scanmilter's scan deadline "
              f"({deadline:.0f}s): Postfix gives up before the answer",
              f"postconf -e 'milter_content_timeout = {int(deadline + 60)}s' or lower clamd_timeout/spamd_timeout")
    mail_macros = _macros(params.get("milter_mail_macros", ""))
    mail_fix = ("postconf -e 'milter_mail_macros = i {auth_type} {auth_authen} {auth_author} {mail_addr} "
                "{mail_host} {mail_mailer}'")
    if policy.authenticated_is_outbound and "auth_authen" not in mail_macros:
        error("milter_mail_macros lacks {auth_authen}: authenticated senders would count as inbound", mail_fix)
    elif spam_on and "auth_authen" not in mail_macros:
        warning("milter_mail_macros lacks {auth_authen}: spamd cannot see that a sender authenticated", mail_fix)
    if spam_on and "j" not in _macros(params.get("milter_connect_macros", "")):
        warning("milter_connect_macros lacks j: the Received line spamd sees names this host 'localhost'",
                "postconf -e 'milter_connect_macros = j {daemon_name} {daemon_addr} v _'")
    if spam_on and "tls_version" not in _macros(params.get("milter_helo_macros", "")):
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
    if not socket_checked_live:
        out += _socket_permissions(cfg, _postfix_user(params))
    return out


def unread_files(cfg, master_unread: str, clamd_unread: str) -> list[Finding]:
    """A warning for each file that could not be read, naming the checks left out for it."""
    out = []
    if master_unread:
        out.append(Finding("warning", f"cannot read master.cf ({master_unread}): which services run chrooted, and "
                                      "their milter overrides, were not checked",
                           "put main.cf and master.cf side by side, readable by this user (or run as root)"))
    if clamd_unread and cfg.clamd_enabled:
        out.append(Finding("warning", f"cannot read clamd.conf ({clamd_unread}): StreamMaxLength and "
                                      "AlertExceedsMax were not checked",
                           "--clamd-conf with the clamd.conf of the clamd that clamd_socket names (or run as root)"))
    return out


# ---------------------------------------------------------------- who may connect to the socket

def _postfix_user(params: dict[str, str]) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(params.get("mail_owner") or "postfix")
    except KeyError:
        return None


def _allows(st: os.stat_result, user: pwd.struct_passwd, bits: int) -> bool:
    """Whether the mode lets the user, with its primary group only, do `bits` (2: write, 1: search).
    Postfix's processes drop every supplementary group (set_ugid: setgroups(1, &gid))."""
    mode = stat.S_IMODE(st.st_mode)
    if user.pw_uid == 0:
        return True
    if st.st_uid == user.pw_uid:
        return (mode >> 6) & bits == bits
    if st.st_gid == user.pw_gid:
        return (mode >> 3) & bits == bits
    return mode & bits == bits


_FIX_MODE = 'milter_socket_mode = "0660" with scanmilter running in group postfix (systemd: Group=postfix)'


def _blocked_by(path: str, user: pwd.struct_passwd) -> str:
    """Why the modes keep `user` from connecting to the unix socket at `path` ("" if they do not,
    or cannot be read)."""
    parent = os.path.dirname(path)
    while True:
        try:
            st = os.stat(parent)
        except OSError:
            st = None
        if st and not _allows(st, user, 1):
            return f"the directory {parent} (mode {stat.S_IMODE(st.st_mode):04o}) is closed to it"
        if parent == "/":
            break
        parent = os.path.dirname(parent)
    try:
        st = os.stat(path)
    except OSError:
        return ""
    if not _allows(st, user, 2):
        return f"the socket's mode {stat.S_IMODE(st.st_mode):04o} (owner {_owner(st)}) does not let it write"
    return ""


def _owner(st: os.stat_result) -> str:
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{user}:{group}"


def _socket_permissions(cfg, user: pwd.struct_passwd | None) -> list[Finding]:
    """Judged from modes: of the socket when it exists, else of milter_socket_mode (the unit runs
    scanmilter in group postfix)."""
    kind, _, path = cfg.milter_socket.partition(":")
    if kind not in ("unix", "local") or user is None:
        return []
    path = os.path.normpath(path)
    why = _blocked_by(path, user)
    if not why and not os.path.exists(path):
        mode = int(cfg.milter_socket_mode, 8)
        why = "" if mode & 0o022 else f"milter_socket_mode {mode:04o} gives its group no write permission"
    if why:
        return [Finding("error", f"Postfix (user {user.pw_name}) cannot write to the milter socket {path}: {why}",
                        _FIX_MODE)]
    return []


# ---------------------------------------------------------------- the live checks

def _probe(address: str, timeout: float) -> tuple[str, str, int]:
    """Connect and negotiate: ("ok", "", 0), ("connect", reason, errno) or ("protocol", reason, 0)."""
    try:
        sock = miltertalk.connect(address, timeout)
    except OSError as e:
        return "connect", e.strerror or str(e), e.errno or 0
    try:
        miltertalk.negotiate_on(sock)
    except (OSError, miltertalk.MilterError) as e:
        return "protocol", str(e) or type(e).__name__, 0
    return "ok", "", 0


def in_child_as(user: pwd.struct_passwd, func) -> tuple[int, bytes]:
    """func(fd) in a forked child with the user's uid and primary group and no other group (the
    identity Postfix's smtpd and cleanup run with); (its exit status, what it wrote to fd). A fork
    keeps the modules already imported: the interpreter itself may sit where that user cannot read."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                  # the child: never returns into the caller
        status = 255
        try:
            os.close(r)
            os.setgroups([user.pw_gid])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            status = func(w)
        finally:
            os._exit(status if isinstance(status, int) else 255)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), data


def _probe_as(user: pwd.struct_passwd, address: str, timeout: float) -> tuple[str, str, int]:
    """_probe as `user`, in a child process (see in_child_as)."""
    def probe(fd: int) -> int:
        os.write(fd, json.dumps(_probe(address, timeout)).encode())
        return 0
    _, data = in_child_as(user, probe)
    if not data:
        return "protocol", f"the check as user {user.pw_name} could not run", 0
    kind, text, number = json.loads(data)
    return kind, text, number


def live_checks(cfg, params: dict[str, str], timeout: float) -> tuple[list[Finding], str]:
    """What the running daemon looks like to Postfix: (findings, a line saying what passed)."""
    address = cfg.milter_socket
    kind, _, path = address.partition(":")
    start_fix = "systemctl start scanmilter (journalctl -u scanmilter says why it stopped)"
    user = _postfix_user(params)
    out: list[Finding] = []
    as_postfix = False
    if kind in ("unix", "local"):
        path = os.path.normpath(path)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return [Finding("error", f"scanmilter's socket {path} does not exist: scanmilter is not running, or "
                                     "runs with another milter_socket", start_fix)], ""
        except OSError as e:
            return [Finding("error", f"cannot look at scanmilter's socket {path}: {e.strerror}",
                            "run postfix-check as root")], ""
        if not stat.S_ISSOCK(st.st_mode):
            return [Finding("error", f"{path} is not a socket", f"remove it; {start_fix}")], ""
        if user and os.geteuid() == 0:
            as_postfix = True
            result = _probe_as(user, address, timeout)
        else:
            if user:
                why = _blocked_by(path, user)
                if why:
                    out.append(Finding("error", f"Postfix (user {user.pw_name}) cannot connect to the milter "
                                                f"socket {path}: {why}", _FIX_MODE))
                out.append(Finding("warning", f"not run as root: whether user {user.pw_name} may connect was judged "
                                              "from modes only", "run postfix-check as root to connect as Postfix"))
            result = _probe(address, timeout)
    else:
        result = _probe(address, timeout)
    as_whom = f"as user {user.pw_name}" if as_postfix else "as this user"
    outcome, reason, number = result
    if outcome == "connect" and number in (errno.ECONNREFUSED, errno.ENOENT):
        out.append(Finding("error", f"nobody accepts connections at {address}: scanmilter is not running (a "
                                    "socket file can outlive the daemon)", start_fix))
    elif outcome == "connect" and number in (errno.EACCES, errno.EPERM) and as_postfix:
        out.append(Finding("error", f"Postfix (user {user.pw_name}) cannot connect to the milter socket {path}: "
                                    f"{reason} (mode {stat.S_IMODE(st.st_mode):04o}, owner {_owner(st)})",
                           _FIX_MODE))
    elif outcome == "connect" and number in (errno.EACCES, errno.EPERM):
        out.append(Finding("warning", f"cannot connect to {address} {as_whom}: {reason}; whether a milter answers "
                                      "there was not checked", "run postfix-check as root"))
    elif outcome == "connect":
        out.append(Finding("error", f"cannot connect to {address} {as_whom}: {reason}", start_fix))
    elif outcome == "protocol":
        out.append(Finding("error", f"something accepts connections at {address}, but no milter answered the "
                                    f"negotiation: {reason}",
                           "milter_socket must be scanmilter's own socket: stop what else listens there, then "
                           + start_fix))
    return out, (f"a milter answered at {address} ({as_whom})" if outcome == "ok" else "")


def engine_checks(cfg) -> tuple[list[Finding], list[str]]:
    """Ping each member of every engine that is on with a pool of servers: (findings, lines saying
    how many answered). A pool none of whose members answers is an error (every message is
    tempfailed, or passes unscanned); a dead member while others answer is a warning (mail flows,
    with less to spare). An engine with one server is left to the daemon's own checks, as before
    pools."""
    from .. import scanners
    out: list[Finding] = []
    passed: list[str] = []
    for engine in scanners.from_settings(cfg):
        members = getattr(engine, "members", [])
        if len(members) < 2:
            continue
        dead = [(m.name, p) for m in members if (p := m.scanner.ping())]
        for name, problem in dead:
            out.append(Finding("error" if len(dead) == len(members) else "warning",
                               f"{engine.name} member {name} does not answer: {problem}",
                               f"start it again, or take it out of {engine.name}_socket (while others answer, "
                               "they take its mail)"))
        passed.append(f"{engine.name}: {len(members) - len(dead)} of {len(members)} members answered")
    return out, passed


def _policy_scopes(policy) -> list[tuple[str, dict]]:
    """(where, settings) of every table of the policy that may set a direction setting."""
    out = [(f"[{d}]", values) for d, values in policy.directions.items()]
    for kind in ("domains", "recipients"):
        for d, table in getattr(policy, kind).items():
            out += [(f'[{d}.{kind}."{key}"]', values) for key, values in table.items()]
    return out


def hold_checks(cfg, policy=None, params: dict[str, str] | None = None, live: bool = True,
                timeout: float = CONNECT_TIMEOUT) -> tuple[list[Finding], list[str]]:
    """quarantine_backend = "hold": what Postfix must send, what the policy cannot have, and (live)
    that postqueue and postsuper run as this user against postfix_config_directory's instance,
    that the index takes a write (as the daemon's user too, when run as root) and that the
    daemon asks for the quarantine action. (findings, lines saying what passed)."""
    if cfg.quarantine_backend != "hold" or not cfg.quarantine_directory:
        return [], []
    out: list[Finding] = []
    passed: list[str] = []
    if params is not None and "i" not in _macros(params.get("milter_end_of_data_macros", "i")):
        out.append(Finding("error", "milter_end_of_data_macros lacks i: with quarantine_backend = \"hold\" the verdict "
                                    "is recorded by queue id, so every message the policy holds is tempfailed",
                           "postconf -e 'milter_end_of_data_macros = i'"))
    if policy is not None:
        rejecting = [where for where, values in _policy_scopes(policy) if values.get("quarantine_action") == "reject"]
        if rejecting:
            out.append(Finding("warning", f"quarantine_action = \"reject\" in {', '.join(rejecting)}: on Postfix's hold "
                                          "queue a held message is accepted, so its sender is not told",
                               'quarantine_action = "discard" there, or quarantine_backend = "files"'))
    if not live:
        return out, passed
    from .. import quarantine
    from .selftest import SMFIF_QUARANTINE, milter_actions
    instance = cfg.postfix_config_directory or "Postfix's default configuration"
    root_fix = ("run the quarantine commands as root (postsuper and postcat need it), with postfix_config_directory "
                "naming the instance's configuration directory")
    try:
        store = quarantine.open_store(cfg, command=True)
        queue = store.queue()
        passed.append(f"hold: postqueue -j of {instance}: {sum(q.queue_name == 'hold' for q in queue.values())} "
                      f"of {len(queue)} queued message(s) on hold")
        store.check_postsuper()
        passed.append(f"hold: postsuper runs against {instance}")
        store.probe()
        passed.append(f"hold: the index {store.index_path} takes a write")
    except quarantine.StoreError as e:
        out.append(Finding("error", f"quarantine_backend = \"hold\": {e}", root_fix))
    owner = _index_owner(cfg.quarantine_directory)
    if owner is not None and os.geteuid() == 0 and owner.pw_uid != 0:
        def probe(fd: int) -> int:
            try:
                quarantine.open_store(cfg).probe()
            except quarantine.StoreError as e:
                os.write(fd, str(e).encode())
                return 1
            return 0
        status, said = in_child_as(owner, probe)
        if status:
            out.append(Finding("error", f"the daemon's user {owner.pw_name} cannot write the hold index: "
                                        f"{said.decode(errors='replace') or status}",
                               f"chown -R {owner.pw_name} {cfg.quarantine_directory}"))
        else:
            passed.append(f"hold: the index takes a write as {owner.pw_name}, the quarantine directory's owner")
    try:
        asked = milter_actions(cfg.milter_socket, timeout)
    except (OSError, miltertalk.MilterError):
        return out, passed           # said by the live check of the socket
    if asked & SMFIF_QUARANTINE:
        passed.append("hold: the daemon asks for the quarantine action (SMFIF_QUARANTINE)")
    else:
        out.append(Finding("error", "the daemon at milter_socket does not ask for the quarantine action "
                                    "(SMFIF_QUARANTINE): held mail is tempfailed",
                           "restart scanmilter (a version with quarantine_backend = \"hold\")"))
    return out, passed


def database_checks(cfg, live: bool = True) -> tuple[list[Finding], list[str]]:
    """quarantine_backend = "postgresql" (live): the database answers from this host, its schema is
    this scanmilter's, and a probe entry can be written and read back (then rolled back, so
    nothing stays). (findings, lines saying what passed)."""
    if cfg.quarantine_backend != "postgresql" or not live:
        return [], []
    from .. import quarantine
    try:
        store = quarantine.open_store(cfg, command=True)
    except quarantine.StoreError as e:
        return [Finding("error", f"quarantine_backend = \"postgresql\": {e}",
                        "set database_dsn_file to a file whose first line is the connection string")], []
    out: list[Finding] = []
    passed: list[str] = []
    try:
        database = getattr(store, "pg", store)          # quarantine_fallback = "local" wraps it
        state = database.check_database()
        if not state["up"]:
            out.append(Finding("error", f"the quarantine database does not answer: {state['problem']}",
                               "check database_dsn_file, that PostgreSQL runs and that pg_hba.conf lets this host in"))
            return out, passed
        if state["problem"]:
            out.append(Finding("error", state["problem"], "scanmilter quarantine migrate (once, from any host), or "
                                                          "upgrade this host's scanmilter"))
            return out, passed
        passed.append(f"database: {database.describe()} answers in {state['seconds'] * 1000:.0f} ms, schema "
                      f"version {state['version']}")
        try:
            seconds = database.check_write()
            passed.append(f"database: a probe entry was written, read back and rolled back in {seconds * 1000:.0f} ms")
        except quarantine.StoreError as e:
            out.append(Finding("error", f"the quarantine database does not take a write: {e}",
                               "GRANT INSERT, SELECT, UPDATE, DELETE on the quarantine_* tables to scanmilter's role"))
    finally:
        store.close()
    return out, passed


def _index_owner(directory: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwuid(os.stat(directory).st_uid)
    except (OSError, KeyError):
        return None


def run(config_path: str | None, main_cf: str | None, clamd_path: str, out=print, connect: bool = True,
        timeout: float = CONNECT_TIMEOUT) -> int:
    cfg, policy, _ = policyfile.load_settings_and_policy(config_path)
    params, written, services, master_unread = read_postfix(main_cf)
    clamd, clamd_unread = clamd_conf(clamd_path)
    # a socket that is not there yet is judged by milter_socket_mode, one that is by connecting
    live_socket = connect and kind_of(cfg.milter_socket) == "unix" and os.path.exists(
        cfg.milter_socket.partition(":")[2])
    findings = unread_files(cfg, master_unread, clamd_unread)
    findings += check(params, written, cfg, policy, clamd, services, socket_checked_live=live_socket)
    passed = ""
    engines_passed: list[str] = []
    if connect:
        live, passed = live_checks(cfg, params, timeout)
        findings += live
        live, engines_passed = engine_checks(cfg)
        findings += live
    hold, hold_passed = hold_checks(cfg, policy, params, connect, timeout)
    findings += hold
    database, database_passed = database_checks(cfg, connect)
    findings += database
    hold_passed += database_passed
    for f in findings:
        out(f"{f.level}: {f.text}\n  fix: {f.fix}")
    if passed:
        out(f"live: {passed}")
    for line in engines_passed + hold_passed:
        out(f"live: {line}")
    errors = sum(f.level == "error" for f in findings)
    out(f"{errors} error(s), {len(findings) - errors} warning(s)" if findings else "OK: no mismatches found")
    return 1 if errors else 0
