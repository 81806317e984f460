"""A private, offline mail stack for scanmilter's integration tests and `make demo`.

Everything lives under one directory DIR (absolute path) and listens on 127.0.0.1 or unix sockets:

  clamd       DIR/clamd/clamd.sock (+ TCP port), a one-line .ndb database that detects EICAR
  spamd       127.0.0.1:SPAMD_PORT, Debian's rules + DIR/spamd/site/local.cf (no Bayes, no network,
              rule SCANMILTER_TAG_TEST: "scanmilter-tag-test" in Subject scores 8.0)
  sink        smtp-sink on 127.0.0.1:SINK_PORT, one file per delivered message in DIR/delivered/
  scanmilter  `python -m scanmilter serve -c DIR/scanmilter/scanmilter.toml`, milter on
              DIR/scanmilter/scanmilter.sock
  postfix     private instance (config DIR/postfix/etc) with smtpd on 127.0.0.1:SMTP_PORT, relays
              everything to the sink, smtpd_milters = the scanmilter socket; chroot off, or with
              --debian-master Debian's packaged master.cf (smtpd and cleanup chrooted in the queue
              directory, DIR/postfix/queue, which then holds the milter socket as well)

Every process is started through tools/procs.py, recorded in DIR/run/NAME.pid ("pid starttime"
per line) and stopped by pid: SIGTERM, wait (reading /proc/PID/stat, since zombies linger), then
SIGKILL after a bounded wait.
The postfix and debian-spamd users must be able to reach DIR: every parent directory must be
world-searchable (pytest's tmp_path under /tmp/pytest-of-root, mode 0700, is not; use mkdtemp).

Command line:  python tools/stack.py up|down|status --dir DIR [--smtp-port N] [--debian-master]
"""
import argparse, dataclasses, email, email.policy, json, os, pwd, shutil
import shlex, smtplib, socket, subprocess, sys, time
from pathlib import Path

import procs

REPO = Path(__file__).resolve().parent.parent
SERVICES = ("clamd", "spamd", "sink", "scanmilter", "postfix")  # start order
RSPAMD_SERVICES = ("redis", "rspamd")  # only with Stack(rspamd=True); see "rspamd" below
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL (libmilter notices shutdown every 5 s)
DEBIAN_MASTER_CF = Path("/usr/share/postfix/master.cf.dist")          # Debian installs it as master.cf
DEBIAN_CONFIGURE_INSTANCE = Path("/usr/lib/postfix/configure-instance.sh")  # fills the chroot
sys.path.insert(0, str(REPO / "milter"))
from scanmilter.config import toml_value  # noqa: E402
from scanmilter.commands.selftest import eicar  # noqa: E402  (one place builds the EICAR string at run time)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StackError(procs.ProcsError):
    pass


@dataclasses.dataclass
class Delivery:
    """One message received by the sink."""
    path: Path
    sender: str
    recipients: list
    data: bytes          # the message as delivered (header + body, LF line ends)
    client_addr: str

    def message(self):
        return email.message_from_bytes(self.data, policy=email.policy.default)


# ---------------------------------------------------------------- helpers
def _chown(path, user):
    pw = pwd.getpwnam(user)
    os.chown(path, pw.pw_uid, pw.pw_gid)


def write_settings(path, settings: dict) -> None:
    """A scanmilter configuration file: one `name = value` line per setting."""
    Path(path).write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in settings.items()))


SPAMD_LOCAL_CF = """\
bayes_auto_learn 0
skip_rbl_checks 1
dns_available no
report_safe 0
header   SCANMILTER_TAG_TEST Subject =~ /scanmilter-tag-test/
describe SCANMILTER_TAG_TEST scanmilter test rule, tags without reaching reject
score    SCANMILTER_TAG_TEST 8.0
header   SCANMILTER_RELAY_TEST X-Spam-Relays-Untrusted =~ /^\\[ ip=203\\.0\\.113\\.7 /
describe SCANMILTER_RELAY_TEST scanmilter test rule: spamd sees the outside test client as the first relay
score    SCANMILTER_RELAY_TEST 0.001
"""

# main.cf of the private Postfix; {relay}, {milter} and the directories are filled in
POSTFIX_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {queue_dir}
data_directory = {data_dir}
mail_owner = postfix
setgid_group = postdrop
maillog_file = /dev/stdout
myhostname = scanmilter.test
mydomain = scanmilter.test
myorigin = $myhostname
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
biff = no
append_dot_mydomain = no
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_domains = example.com
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_authorized_xclient_hosts = 127.0.0.0/8
smtpd_peername_lookup = no
default_transport = {relay}
relay_transport = {relay}
smtp_dns_support_level = disabled
# deliver long lines as they came: the tests compare bodies byte for byte
smtp_line_length_limit = 0
smtp_host_lookup = native
smtputf8_enable = no
message_size_limit = 104857600
mailbox_size_limit = 0
virtual_mailbox_limit = 0
queue_run_delay = 1s
# A deferred message is due again minimal_backoff_time later (whole seconds), and a queue scan takes
# up files due within the next second. At 1s a scan can take one up while the smtp client that
# deferred it still holds it open: qmgr then logs "skipped, still being delivered" and parks it
# in the incoming queue, looked at again only when new mail arrives or qmgr wakes (300 s). 3s
# leaves the client over a second to let go.
minimal_backoff_time = 3s
maximal_backoff_time = 3s
smtpd_milters = {milter}
non_smtpd_milters = {milter}
milter_default_action = tempfail
milter_protocol = 6
milter_connect_macros = {connect_macros}
milter_helo_macros = {{tls_version}} {{cipher}} {{cipher_bits}} {{cert_subject}} {{cert_issuer}}
milter_mail_macros = i {{auth_type}} {{auth_authen}} {{auth_author}} {{mail_addr}} {{mail_host}} {{mail_mailer}}
milter_rcpt_macros = i {{rcpt_addr}} {{rcpt_host}} {{rcpt_mailer}}
"""
MILTER_CONNECT_MACROS = "j {daemon_name} {daemon_addr} v _ {client_addr} {client_name} {client_port}"

# master.cf of the private Postfix (name type private unpriv chroot wakeup maxproc command): chroot
# always off; {smtp_port} and {release_port} are filled in
POSTFIX_SERVICES = (
    "127.0.0.1:{smtp_port} inet n - n - - smtpd",
    "127.0.0.1:{release_port} inet n - n - - smtpd -o smtpd_milters= -o non_smtpd_milters="
    " -o smtputf8_enable=yes",  # quarantine releases of mail with UTF-8 addresses
    "pickup unix n - n 60 1 pickup",
    "cleanup unix n - n - 0 cleanup", "qmgr unix n - n 300 1 qmgr",
    "rewrite unix - - n - - trivial-rewrite", "bounce unix - - n - 0 bounce",
    "defer unix - - n - 0 bounce", "trace unix - - n - 0 bounce", "verify unix - - n - 1 verify",
    "flush unix n - n 1000? 0 flush", "proxymap unix - - n - - proxymap",
    "proxywrite unix - - n - 1 proxymap", "smtp unix - - n - - smtp", "relay unix - - n - - smtp",
    "showq unix n - n - - showq", "error unix - - n - - error", "retry unix - - n - - error",
    "discard unix - - n - - discard", "anvil unix - - n - 1 anvil", "scache unix - - n - 1 scache",
    "postlog unix-dgram n - n - 1 postlogd")


# ---------------------------------------------------------------- the stack
class Stack:
    def __init__(self, root, *, smtp_port=2525, with_milter=True, milter_cmd=None,
                 scanmilter_settings=None, policy_text=None, spamd_children=2, clamd_settings=None,
                 milter_inet_port=None, spamd_learning=False, debian_master=False, queue_dir=None,
                 milter_socket=None, postfix_settings=None, before_start=None, quarantine=False,
                 rspamd=False, clamd_members=1, spamd_members=1, spamd_virtual_users=None,
                 rspamd_milter=False, rspamd_workers=1, spamd_member_children=None, queue_in_front=False):
        self.root = Path(root).resolve()
        self.smtp_port, self.with_milter, self.spamd_children = smtp_port, with_milter, spamd_children
        self.milter_cmd = milter_cmd  # list of str; "{socket}", "{config}", "{root}" are filled in
        self.scanmilter_settings = dict(scanmilter_settings or {})
        self.clamd_settings = dict(clamd_settings or {})
        self.policy_text = policy_text
        self.spamd_learning = spamd_learning   # Bayes on and TELL allowed (quarantine learning tests)
        # ---- per-user spamd: {user: user_prefs text}; spamd then reads DIR/spamd/users/USER/user_prefs
        # for a request with "User: USER" (--virtual-config-dir: virtual users, no system accounts).
        # None (the default): spamd as before, every user with the site configuration only.
        self.spamd_virtual_users = dict(spamd_virtual_users or {})
        # quarantine: scanmilter keeps held mail in DIR/quarantine
        self.quarantine_dir = self.root / "quarantine" if quarantine else None
        self.sink_port, self.spamd_port, self.clamd_port = free_port(), free_port(), free_port()
        # quarantine releases re-inject here: an smtpd without milters, as the README documents
        self.release_port = free_port()
        # queue_in_front: an smtpd on FRONT_PORT without milter, whose mail Postfix queues and hands to
        # the milter's smtpd with its own smtp client (content_filter), as a sending MTA would: a
        # message the milter tempfails stays in Postfix's queue and is retried (queue_run_delay)
        self.front_port = free_port() if queue_in_front else None
        self.metrics_port = free_port()
        r = self.root
        self.run_dir, self.delivered_dir = r / "run", r / "delivered"
        self.clamd_socket = r / "clamd" / "clamd.sock"
        # debian_master: Debian's packaged master.cf (smtpd, cleanup and most services chrooted in
        # the queue directory), its smtp service moved to 127.0.0.1:SMTP_PORT, and the chroot filled
        # as Debian's init does; the milter socket then defaults to QUEUE/scanmilter/scanmilter.sock
        self.debian_master = debian_master
        self.postfix_conf = r / "postfix" / "etc"
        self.queue_dir = Path(queue_dir).resolve() if queue_dir else r / "postfix" / "queue"
        default_socket = self.queue_dir / "scanmilter" if debian_master else r / "scanmilter"
        self.milter_socket = Path(milter_socket) if milter_socket else default_socket / "scanmilter.sock"
        # milter_inet_port: the milter talks TCP on 127.0.0.1:PORT instead of the unix socket
        self.milter_inet_port = milter_inet_port
        if milter_inet_port:
            self.milter_address = f"inet:{milter_inet_port}@127.0.0.1"      # libmilter's spelling
            self.postfix_milter = f"inet:127.0.0.1:{milter_inet_port}"      # Postfix's spelling
        else:
            self.milter_address = self.postfix_milter = f"unix:{self.milter_socket}"
            if debian_master and self.milter_socket.is_relative_to(self.queue_dir):
                # chrooted smtpd and cleanup name the socket from inside the queue directory
                self.postfix_milter = f"unix:/{self.milter_socket.relative_to(self.queue_dir)}"
        self.milter_config = r / "scanmilter" / "scanmilter.toml"
        self.postfix_settings = dict(postfix_settings or {})   # main.cf parameters that replace ours
        self.before_start = before_start   # called with the stack once its files exist, before any service
        self.logs = {name: r / name / f"{name}.log" for name in SERVICES}
        self._procs = {}
        self._init_rspamd(rspamd, rspamd_milter, rspamd_workers)
        self._init_members(clamd_members, spamd_members, spamd_member_children)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------ configuration files
    def _write_configs(self):
        self._make_directories()
        self._write_clamd()
        self._write_spamd()
        self._write_members()
        self._write_scanmilter()
        self._write_postfix()
        if self.rspamd:
            self._write_rspamd()

    # ------------------------------------------------------------ pools: several clamd and spamd
    # clamd_members=N, spamd_members=N: members past the first are services of their own, named
    # clamd-2, spamd-2, ..., each with its directory DIR/NAME, socket or port, pid file and log;
    # scanmilter's clamd_socket and spamd_socket then list every member. spamd_member_children:
    # spamd's -m for the members past the first (default: spamd_children, as the first has).
    def _init_members(self, clamd_members, spamd_members, spamd_member_children=None):
        self.spamd_member_children = spamd_member_children or self.spamd_children
        self.member_services = ([f"clamd-{i}" for i in range(2, clamd_members + 1)]
                                + [f"spamd-{i}" for i in range(2, spamd_members + 1)])
        self.member_ports = {name: free_port() for name in self.member_services}
        for name in self.member_services:
            self.logs[name] = self.root / name / f"{name}.log"

    def member_clamd_socket(self, name):
        return self.clamd_socket if name == "clamd" else self.root / name / "clamd.sock"

    def member_port(self, name):
        """The TCP port of a member: spamd's only one, clamd's besides its unix socket."""
        if name == "spamd":
            return self.spamd_port
        return self.clamd_port if name == "clamd" else self.member_ports[name]

    def members(self, engine):
        """The service names of an engine's members, the first being the plain service."""
        return [engine] + [n for n in self.member_services if n.startswith(f"{engine}-")]

    def member_address(self, name):
        """A member's address as scanmilter's settings name it."""
        if name.startswith("clamd"):
            return f"unix:{self.member_clamd_socket(name)}"
        return f"inet:127.0.0.1:{self.member_port(name)}"

    def _write_members(self):
        base = (self.root / "clamd/clamd.conf").read_text().splitlines()
        for name in self.member_services:
            d = self.root / name
            (d / "tmp").mkdir(parents=True, exist_ok=True)
            if name.startswith("clamd"):
                own = {"LocalSocket": self.member_clamd_socket(name), "TCPSocket": self.member_ports[name],
                       "TemporaryDirectory": d / "tmp", "PidFile": d / "clamd.pid", "LogFile": self.logs[name]}
                lines = [f"{k} {own[k]}" if k in own else ln for ln in base for k in [ln.partition(" ")[0]]]
                (d / "clamd.conf").write_text("\n".join(lines) + "\n")

    def _member_command(self, name):
        d = self.root / name
        if name.startswith("clamd"):
            return [procs.binary("clamd"), "-c", str(d / "clamd.conf")]
        cmd = self._command("spamd")
        for flag, value in (("-p", self.member_ports[name]), ("-r", d / "spamd.pid"), ("-s", self.logs[name]),
                            ("-m", self.spamd_member_children)):
            cmd[cmd.index(flag) + 1] = str(value)
        return cmd

    def _member_ready(self, name):
        if name.startswith("clamd"):
            return (procs.chat(self.member_clamd_socket(name), b"zPING\0") or b"").startswith(b"PONG")
        return b"SPAMD/1.5 0 PONG" in (procs.chat(self.member_ports[name], b"PING SPAMC/1.5\r\n\r\n") or b"")

    def _member_settings(self):
        """clamd_socket and spamd_socket as lists when an engine has several members."""
        out = {}
        for engine in ("clamd", "spamd"):
            if len(self.members(engine)) > 1:
                out[f"{engine}_socket"] = [self.member_address(n) for n in self.members(engine)]
        return out
    # ------------------------------------------------------------ end of pools

    def _make_directories(self):
        r = self.root
        r.mkdir(parents=True, exist_ok=True)
        os.chmod(r, 0o755)  # mkdtemp makes 0700
        for parent in r.parents:
            if parent.stat().st_mode & 0o001 == 0:
                raise StackError(f"{parent} is not world-searchable (mode {parent.stat().st_mode & 0o777:o}):"
                                 f" the postfix and debian-spamd users cannot reach {r}."
                                 " Use a directory made with tempfile.mkdtemp() (not pytest's tmp_path).")
        for d in ("run", "clamd/db", "clamd/tmp", "spamd/site", "spamd/home", "sink", "scanmilter",
                  "postfix/etc", "postfix/data", "postfix/queue", "delivered"):
            (r / d).mkdir(parents=True, exist_ok=True)
        self.queue_dir.mkdir(parents=True, exist_ok=True)
        self.milter_socket.parent.mkdir(parents=True, exist_ok=True)
        _chown(r / "postfix/data", "postfix")
        _chown(r / "delivered", "postfix")
        _chown(r / "spamd/home", "debian-spamd")

    def _write_clamd(self):
        """A one-signature database, the signature's hex made by sigtool, and clamd.conf."""
        r = self.root
        hexsig = subprocess.run([procs.binary("sigtool"), "--hex-dump"], input=eicar(), capture_output=True,
                                check=True).stdout.decode().strip()
        (r / "clamd/db/scanmilter-test.ndb").write_text(f"Eicar-Test-Signature:0:*:{hexsig}\n")
        clamd = {"Foreground": "yes", "LocalSocket": self.clamd_socket, "LocalSocketMode": "666",
                 "FixStaleSocket": "yes", "TCPSocket": self.clamd_port, "TCPAddr": "127.0.0.1",
                 "DatabaseDirectory": r / "clamd/db", "TemporaryDirectory": r / "clamd/tmp",
                 "PidFile": r / "clamd/clamd.pid", "LogFile": self.logs["clamd"], "LogTime": "yes",
                 "StreamMaxLength": "25M", "MaxThreads": 4, "SelfCheck": 3600,
                 # content over clamd's own limits is reported, not passed as OK (see the README)
                 "AlertExceedsMax": "yes", **self.clamd_settings}
        # no "User": run as root clamd stays root, which can read anything under DIR
        (r / "clamd/clamd.conf").write_text("".join(f"{k} {v}\n" for k, v in clamd.items()))

    def _write_spamd(self):
        """Debian's .pre files (they load the plugins, Check among them) + our local.cf;
        Razor2/Pyzor/DCC and DNS tests are off through spamd --local."""
        r = self.root
        site = r / "spamd/site"
        for pre in Path("/etc/spamassassin").glob("*.pre"):
            shutil.copy(pre, site / pre.name)
        bayes = f"use_bayes 1\nbayes_path {r}/spamd/home/bayes/bayes\n" if self.spamd_learning else "use_bayes 0\n"
        (site / "local.cf").write_text(bayes + SPAMD_LOCAL_CF)
        for user, prefs in self.spamd_virtual_users.items():     # per-user spamd (see __init__)
            (r / "spamd/users" / user).mkdir(parents=True, exist_ok=True)
            (r / "spamd/users" / user / "user_prefs").write_text(prefs)

    def engine_settings(self) -> dict:
        """The scanmilter settings that reach this stack's clamd, spamd and release smtpd."""
        return {"clamd_socket": f"unix:{self.clamd_socket}",
                "spamd_socket": f"inet:127.0.0.1:{self.spamd_port}",
                "quarantine_release_address": f"inet:127.0.0.1:{self.release_port}",
                **self.rspamd_settings(), **self._member_settings()}

    def _write_scanmilter(self):
        settings = {"milter_socket": self.milter_address, "milter_socket_mode": "0666",
                    **self.engine_settings(), "metrics_address": f"127.0.0.1:{self.metrics_port}"}
        if self.quarantine_dir:
            settings["quarantine_directory"] = str(self.quarantine_dir)
        if self.policy_text is not None:
            policy = self.root / "scanmilter/policy.toml"
            policy.write_text(self.policy_text)
            settings["policy_file"] = str(policy)
        settings.update(self.scanmilter_settings)
        write_settings(self.milter_config, settings)

    def _write_postfix(self):
        main = POSTFIX_MAIN_CF.format(queue_dir=self.queue_dir, data_dir=self.root / "postfix/data",
                                      relay=f"smtp:[127.0.0.1]:{self.sink_port}",
                                      milter=self.postfix_milter if self.with_milter else "",
                                      connect_macros=MILTER_CONNECT_MACROS)
        for name, value in self.postfix_settings.items():
            main = "".join(ln for ln in main.splitlines(True) if ln.partition("=")[0].strip() != name)
            main += f"{name} = {value}\n"
        if self.debian_master:
            services = self._debian_services()
        else:
            services = [s.format(smtp_port=self.smtp_port, release_port=self.release_port) for s in POSTFIX_SERVICES]
        if self.front_port:
            services += [f"127.0.0.1:{self.front_port} inet n - n - - smtpd -o smtpd_milters= -o non_smtpd_milters= "
                         f"-o content_filter=scanned:[127.0.0.1]:{self.smtp_port}",
                         # another name than the milter's smtpd greets with: not a mail loop to itself
                         "scanned unix - - n - - smtp -o myhostname=front.scanmilter.test"]
        (self.postfix_conf / "main.cf").write_text(main)
        (self.postfix_conf / "master.cf").write_text("\n".join(services) + "\n")
        if self.debian_master:
            self._fill_chroot()

    def _debian_services(self):
        """Debian's packaged master.cf, as installed in /etc/postfix: only the smtp service moves to
        127.0.0.1:SMTP_PORT, and the release service is added in the same style (chrooted)."""
        lines = DEBIAN_MASTER_CF.read_text().splitlines()
        smtpd = [i for i, ln in enumerate(lines) if ln.split()[:2] == ["smtp", "inet"]]
        if len(smtpd) != 1:
            raise StackError(f"{DEBIAN_MASTER_CF}: expected one 'smtp inet' line")
        fields = lines[smtpd[0]].split()
        lines[smtpd[0]] = " ".join([f"127.0.0.1:{self.smtp_port}"] + fields[1:])
        release = " ".join([f"127.0.0.1:{self.release_port}"] + fields[1:])
        return lines + [f"{release} -o smtpd_milters= -o non_smtpd_milters= -o smtputf8_enable=yes"]

    def _fill_chroot(self):
        """What Debian's postfix service does before start: copy etc/services, hosts, resolv.conf,
        nsswitch.conf, localtime and the NSS libraries into the queue directory (the chroot)."""
        out = subprocess.run(["sh", str(DEBIAN_CONFIGURE_INSTANCE), "-"], capture_output=True, text=True,
                             env={**os.environ, "MAIL_CONFIG": str(self.postfix_conf)}, timeout=120)
        if out.returncode != 0:
            raise StackError(f"{DEBIAN_CONFIGURE_INSTANCE} failed: {out.stdout}{out.stderr}")

    # ------------------------------------------------------------ one service
    def _command(self, name):
        r = self.root
        if name in self.member_services:
            return self._member_command(name)
        if name == "clamd":
            return [procs.binary("clamd"), "-c", str(r / "clamd/clamd.conf")]
        if name == "spamd":
            return [procs.binary("spamd"), "--local", "-4", "-i", "127.0.0.1", "-p", str(self.spamd_port),
                    "-A", "127.0.0.1", "-m", str(self.spamd_children), "-u", "debian-spamd",
                    "--nouser-config", "-H", str(r / "spamd/home"), "--siteconfigpath", str(r / "spamd/site"),
                    "-r", str(r / "spamd/spamd.pid"), "-s", str(self.logs["spamd"])] \
                + (["--allow-tell"] if self.spamd_learning else []) \
                + ([f"--virtual-config-dir={r}/spamd/users/%u"] if self.spamd_virtual_users else [])
        if name == "sink":
            return [procs.binary("smtp-sink"), "-u", "postfix", "-d", f"{self.delivered_dir}/%Y%m%d%H%M%S.",
                    f"127.0.0.1:{self.sink_port}", "256"]
        if name == "scanmilter":
            cmd = self.milter_cmd or [sys.executable, "-m", "scanmilter", "serve", "-c", "{config}"]
            return [a.format(socket=self.milter_address, config=self.milter_config, root=r)
                    for a in cmd]
        if name == "postfix":
            return [procs.binary("postfix"), "-c", str(self.postfix_conf), "start-fg"]
        if name in RSPAMD_SERVICES:
            return self._rspamd_command(name)
        raise ValueError(f"unknown service {name!r}")

    def _pidfile(self, name):
        return procs.PidFile(self.run_dir / f"{name}.pid")

    def pids(self, name):
        """[(pid, starttime)] of a service as recorded in its pid file (Postfix: also its master)."""
        return self._pidfile(name).entries()

    def process(self, name):
        """The subprocess.Popen of a service this Stack object started last."""
        return self._procs[name]

    def postfix_master_pid(self):
        """The pid Postfix's master wrote into the queue directory."""
        return int((self.queue_dir / "pid/master.pid").read_text().split()[0])

    def _spawn(self, name):
        if name == "scanmilter":
            self.milter_socket.unlink(missing_ok=True)
        env = dict(os.environ)
        if name == "scanmilter" and not self.milter_cmd:
            env["PYTHONPATH"] = str(REPO / "milter")      # the checkout's scanmilter, not an installed one
        self._pidfile(name).remove()
        self._procs[name] = procs.start(self._command(name), self._outfile(name), self.root / name,
                                        self._pidfile(name), env=env)

    def _outfile(self, name):
        """Where stdout+stderr go: clamd and spamd copy their log there, so keep it apart."""
        return self.root / name / f"{name}.out" if name in ("clamd", "spamd", "rspamd", *self.member_services) \
            else self.logs[name]

    def _tails(self, name):
        files = dict.fromkeys([self.logs[name], self._outfile(name)])
        return "".join(f"\n{f}:\n{procs.tail(f)}" for f in files)

    def _ready(self, name):
        """True once the service answers; raises StackError if its process died."""
        proc = self._procs[name]
        if proc.poll() is not None:
            raise StackError(f"{name} exited with status {proc.returncode};{self._tails(name)}")
        try:
            if name in self.member_services:
                return self._member_ready(name)
            if name == "clamd":
                return (procs.chat(self.clamd_socket, b"zPING\0") or b"").startswith(b"PONG")
            if name == "spamd":
                return b"SPAMD/1.5 0 PONG" in (procs.chat(self.spamd_port, b"PING SPAMC/1.5\r\n\r\n") or b"")
            if name == "scanmilter":
                return procs.accepts(self.milter_inet_port or self.milter_socket)
            if name == "sink":
                return (procs.chat(self.sink_port) or b"").startswith(b"220")
            if name in RSPAMD_SERVICES:
                return self._rspamd_ready(name)
            if name == "postfix":
                if not (procs.chat(self.smtp_port) or b"").startswith(b"220"):
                    return False
                # start-fg runs master as a child of a shell: record master's pid too
                master = self.postfix_master_pid()
                if not procs.alive(master):
                    return False  # still the pid file of a master stopped before
                if master not in [p for p, _ in self.pids("postfix")]:
                    self._pidfile("postfix").record(master)
                return True
        except (OSError, ValueError, IndexError):
            return False

    def _wait_ready(self, names, timeout=60):
        pending = list(names)

        def ready():
            pending[:] = [n for n in pending if not self._ready(n)]
            return not pending
        if not procs.wait_until(ready, timeout):
            raise StackError(f"{', '.join(pending)} not ready after {timeout}s;"
                             + "".join(self._tails(n) for n in pending))

    def start_service(self, name, timeout=60):
        self.stop_service(name)
        self._spawn(name)
        self._wait_ready([name], timeout)

    def stop_service(self, name, timeout=STOP_TIMEOUT):
        left = procs.stop(self.pids(name), timeout, reap=[p for p in [self._procs.get(name)] if p])
        if left:
            raise StackError(f"{name}: pids {left} survived SIGKILL")
        self._pidfile(name).remove()

    # ------------------------------------------------------------ rspamd (Stack(rspamd=True))
    # rspamd from Debian's package with a private configuration that keeps it on this machine:
    # the modules that fetch maps or ask DNS are off, the shipped maps replace remote ones, DNS
    # goes to a port where nothing listens, and rspamd runs in a network namespace of its own
    # (unshare -n: not even lo is up), reached through unix sockets only. redis-server (no TCP)
    # holds Bayes statistics, so that learning through the controller can be seen. DBDIR (the
    # compiled hyperscan cache: ~7 s cold) survives a restart of the same stack.
    RSPAMD_OFF = ("rbl", "surbl", "spf", "dkim", "dmarc", "arc", "asn", "emails", "hfilter", "fuzzy_check",
                  "multimap", "phishing", "whitelist", "dcc", "mx_check", "rspamd_update", "url_redirector",
                  "reputation", "neural", "ratelimit", "greylist", "replies", "history_redis",
                  "external_services", "metadata_exporter", "clickhouse", "elastic", "p0f", "bimi", "aws_s3",
                  "spamtrap", "dkim_signing")
    RSPAMD_PASSWORD = "scanmilter-test-controller"

    # rspamd_milter=True (the benchmark's peer): rspamd's own milter as well, its proxy worker in
    # self-scan mode on DIR/rspamd/run/proxy.sock (rspamd_milter_socket; Postfix reaches it across the
    # network namespace), with its antivirus module on this stack's clamd, rejecting what clamd finds.
    # rspamd_workers: processes of the normal worker (and of that proxy worker).
    def _init_rspamd(self, rspamd, rspamd_milter=False, rspamd_workers=1):
        self.rspamd, self.rspamd_milter, self.rspamd_workers = rspamd, rspamd_milter, rspamd_workers
        self.rspamd_services = RSPAMD_SERVICES if rspamd else ()
        d = self.root / "rspamd"
        self.rspamd_dir, self.redis_socket = d, self.root / "redis" / "redis.sock"
        self.rspamd_socket, self.rspamd_controller = d / "run" / "normal.sock", d / "run" / "controller.sock"
        self.rspamd_password_file = d / "controller.password"
        self.rspamd_milter_socket = d / "run" / "proxy.sock"
        self.logs.update({"rspamd": d / "log" / "rspamd.log", "redis": self.root / "redis" / "redis.log"})

    def rspamd_settings(self) -> dict:
        if not self.rspamd:
            return {}
        return {"rspamd_socket": f"unix:{self.rspamd_socket}",
                "rspamd_controller_address": f"unix:{self.rspamd_controller}",
                "rspamd_password_file": str(self.rspamd_password_file)}

    def _write_rspamd(self):
        d = self.rspamd_dir
        for sub in ("local.d", "override.d", "db", "run", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "redis").mkdir(exist_ok=True)
        for sub in ("db", "run", "log"):
            _chown(d / sub, "_rspamd")
        for module in self.RSPAMD_OFF:
            (d / "local.d" / f"{module}.conf").write_text("enabled = false;\n")
        conf = {
            "override.d/mime_types.conf": 'file = ["${CONFDIR}/maps.d/mime_types.inc"];\n',
            "override.d/mid.conf": 'source { url = ["${CONFDIR}/maps.d/mid.inc"]; }\n',
            "local.d/options.inc": 'dns { nameserver = ["127.0.0.1:5353"]; timeout = 0.2s; retransmits = 1; }\n',
            "override.d/worker-normal.inc": f'bind_socket = "{self.rspamd_socket} mode=0666"; '
                                            f'count = {self.rspamd_workers};\n',
            "override.d/worker-controller.inc": f'bind_socket = "{self.rspamd_controller} mode=0666"; count = 1;\n'
                                                f'password = "{self.RSPAMD_PASSWORD}"; '
                                                f'enable_password = "{self.RSPAMD_PASSWORD}";\n',
            "override.d/worker-proxy.inc": f'bind_socket = "{self.rspamd_milter_socket} mode=0600"; '
                                           'enabled = false;\n',
            "local.d/redis.conf": f'servers = "{self.redis_socket}";\n',
            "local.d/classifier-bayes.conf": f'backend = "redis"; servers = "{self.redis_socket}"; '
                                             'min_learns = 1; autolearn = false;\n',
            "override.d/logging.inc": 'level = "info";\n',
        }
        if self.rspamd_milter:
            conf["override.d/worker-proxy.inc"] = (
                f'bind_socket = "{self.rspamd_milter_socket} mode=0666"; milter = yes; timeout = 120s; '
                f'count = {self.rspamd_workers}; upstream "local" {{ default = yes; self_scan = yes; }}\n')
            conf["local.d/antivirus.conf"] = (
                f'clamav {{ type = "clamav"; servers = "{self.clamd_socket}"; symbol = "CLAM_VIRUS"; '
                'action = "reject"; }\n')
        else:
            (d / "local.d" / "antivirus.conf").unlink(missing_ok=True)   # DIR may hold an earlier stack's
        for name, text in conf.items():
            (d / name).write_text(text)
        self.rspamd_password_file.write_text(self.RSPAMD_PASSWORD + "\n")
        os.chmod(self.rspamd_password_file, 0o600)
        (self.root / "redis" / "redis.conf").write_text(
            f"port 0\nunixsocket {self.redis_socket}\nunixsocketperm 777\ndir {self.root / 'redis'}\n"
            f"save \"\"\nappendonly no\nlogfile {self.logs['redis']}\nprotected-mode no\n")

    def _rspamd_command(self, name):
        d = self.rspamd_dir
        if name == "redis":
            return [procs.binary("redis-server"), str(self.root / "redis" / "redis.conf")]
        return [procs.binary("unshare"), "-n", procs.binary("rspamd"), "-f", "-c", "/etc/rspamd/rspamd.conf",
                f"--var=LOCAL_CONFDIR={d}", f"--var=RUNDIR={d / 'run'}", f"--var=DBDIR={d / 'db'}",
                f"--var=LOGDIR={d / 'log'}", "-u", "_rspamd", "-g", "_rspamd", "-p", str(d / "run" / "rspamd.pid")]

    def _rspamd_ready(self, name):
        if name == "redis":
            return b"+PONG" in (procs.chat(self.redis_socket, b"PING\r\nQUIT\r\n") or b"")
        if self.rspamd_milter and not procs.accepts(self.rspamd_milter_socket):
            return False
        return b"pong" in (procs.chat(self.rspamd_socket, b"GET /ping HTTP/1.0\r\n\r\n") or b"")

    def rspamd_stat(self) -> dict:
        """The controller's /stat (learned counts), as JSON."""
        raw = procs.chat(self.rspamd_controller, f"GET /stat HTTP/1.0\r\nPassword: {self.RSPAMD_PASSWORD}"
                         "\r\n\r\n".encode()) or b""
        return json.loads(raw.partition(b"\r\n\r\n")[2] or b"{}")

    # ------------------------------------------------------------ the whole stack
    def start(self):
        """Stop any stack left running in this directory, then start all and wait until ready."""
        t0 = time.monotonic()
        self.stop()
        if procs.accepts(self.smtp_port):
            raise StackError(f"port 127.0.0.1:{self.smtp_port} is in use by another program")
        for d in (self.delivered_dir, self.queue_dir):  # a fresh start: no old mail
            shutil.rmtree(d, ignore_errors=True)
        self._write_configs()
        if self.before_start:
            self.before_start(self)
        for name in SERVICES:
            self.logs[name].write_bytes(b"")
            self._outfile(name).write_bytes(b"")
        try:
            for name in ("clamd", "spamd", "sink", "postfix", *self.rspamd_services, *self.member_services):
                self._spawn(name)
            if self.with_milter:
                # scanmilter may check its scanners at start-up
                self._wait_ready(["clamd", "spamd", *self.rspamd_services, *self.member_services])
                self._spawn("scanmilter")
            self._wait_ready([n for n in SERVICES + self.rspamd_services if n in self._procs])
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        (self.run_dir / "stack.json").write_text(json.dumps(self.describe(), indent=1))

    def stop(self):
        """Stop everything recorded under DIR/run, all at once."""
        entries = [e for n in SERVICES + RSPAMD_SERVICES + tuple(self.member_services) for e in self.pids(n)]
        left = procs.stop(entries, STOP_TIMEOUT, reap=list(self._procs.values()))
        for name in SERVICES + RSPAMD_SERVICES + tuple(self.member_services):
            self._pidfile(name).remove()
        (self.run_dir / "stack.json").unlink(missing_ok=True)
        if left:
            raise StackError(f"pids {left} survived SIGKILL")

    def status(self):
        """{service: [(pid, alive)]} from the pid files."""
        return {n: [(p, procs.alive(p, s)) for p, s in self.pids(n)] for n in SERVICES}

    def describe(self):
        return {"root": str(self.root), "smtp": f"127.0.0.1:{self.smtp_port}",
                "sink": f"127.0.0.1:{self.sink_port}", "spamd": f"127.0.0.1:{self.spamd_port}",
                "clamd": f"unix:{self.clamd_socket} / 127.0.0.1:{self.clamd_port}",
                "milter": self.postfix_milter if self.with_milter else "(off)",
                "delivered": str(self.delivered_dir), "postfix_config": str(self.postfix_conf),
                "logs": {n: str(p) for n, p in self.logs.items()}}

    # ------------------------------------------------------------ mail helpers
    def send(self, msg_bytes, sender, recipients, xclient_addr=None, xclient_name="mail.outside.test",
             timeout=300, xclient_login=None, port=None):
        """Send over SMTP; {"code", "reply", "stage"} of the DATA answer or of the first refusal.
        xclient_login: present the session as SASL-authenticated with this login (XCLIENT LOGIN).
        port: another smtpd of this Postfix instead of SMTP_PORT."""
        def result(code, reply, stage):
            reply = reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)
            return {"code": code, "reply": reply, "stage": stage}
        stage = "connect"
        try:
            with smtplib.SMTP("127.0.0.1", port or self.smtp_port, timeout=timeout) as smtp:
                smtp.ehlo("client.test")
                if xclient_addr or xclient_login:
                    stage = "xclient"
                    attrs = f"ADDR={xclient_addr} NAME={xclient_name}" if xclient_addr else ""
                    if xclient_login:
                        attrs += f" LOGIN={xclient_login}"
                    code, reply = smtp.docmd("XCLIENT", attrs.strip())
                    if code != 220:
                        return result(code, reply, stage)
                    smtp.ehlo_resp = smtp.helo_resp = None  # XCLIENT restarts the session
                    smtp.ehlo("client.test")
                stage = "mail"
                code, reply = smtp.mail(sender)
                if code != 250:
                    return result(code, reply, stage)
                stage = "rcpt"
                for rcpt in [recipients] if isinstance(recipients, str) else recipients:
                    code, reply = smtp.rcpt(rcpt)
                    if code not in (250, 251):
                        return result(code, reply, stage)
                stage = "data"
                code, reply = smtp.data(msg_bytes)
                return result(code, reply, stage)
        except smtplib.SMTPResponseException as e:
            return result(e.smtp_code, e.smtp_error, stage)
        except smtplib.SMTPServerDisconnected as e:
            return result(0, f"disconnected: {e}", stage)

    def _open_dumps(self):
        """Dump files the sink still has open (mail in progress)."""
        open_files = set()
        for pid, _ in self.pids("sink"):
            try:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    open_files.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                pass
        return open_files

    def delivered(self):
        """Completely received messages in the sink, oldest first."""
        # list first, then ask which are still open: a dump created after the question would
        # otherwise pass as complete while the sink is still writing it
        paths = list(self.delivered_dir.glob("*.*"))
        busy = self._open_dumps()
        paths = [p for p in paths if str(p) not in busy]
        paths.sort(key=lambda p: (p.stat().st_mtime_ns, p.name))
        return [parse_dump(p) for p in paths]

    def wait_delivered(self, count, timeout=30):
        got = []

        def enough():
            got[:] = self.delivered()
            return len(got) >= count
        if not procs.wait_until(enough, timeout, interval=0.1):
            raise StackError(f"{len(got)} of {count} messages delivered after {timeout}s; "
                             f"postfix log:\n{procs.tail(self.logs['postfix'])}")
        return got

    def postfix_log(self):
        return self.logs["postfix"].read_text(errors="replace")

    def flush(self):
        subprocess.run([procs.binary("postqueue"), "-c", str(self.postfix_conf), "-f"], check=True)

    def queue_empty(self):
        for sub in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _, _, files in os.walk(self.queue_dir / sub):
                if files:
                    return False
        return True

    def drained(self):
        """True when Postfix holds no mail and the sink has finished writing every message."""
        return self.queue_empty() and not any(f.startswith(f"{self.delivered_dir}/") for f in self._open_dumps())

    def wait_logged(self, text, count=1, service="scanmilter", timeout=30):
        """Wait until `service`'s log has at least `count` lines containing `text`; return them."""
        lines = []

        def enough():
            lines[:] = [ln for ln in self.logs[service].read_text(errors="replace").splitlines() if text in ln]
            return len(lines) >= count
        if not procs.wait_until(enough, timeout):
            raise StackError(f"{len(lines)} of {count} lines with {text!r} in the {service} log after "
                             f"{timeout}s;{self._tails(service)}")
        return lines

    def wait_drained(self, timeout=60, logged=None):
        """Wait until Postfix is done with everything sent so far (delivered, bounced or dropped:
        nothing queued, nothing half-written in the sink), so that a message that is absent now
        stays absent and a count of copies is final. `logged`: also wait for a scanmilter log line
        containing this text, such as "QUEUEID: action=" for a message's summary line."""
        deadline = time.monotonic() + timeout
        if logged is not None:
            self.wait_logged(logged, timeout=timeout)
        if not procs.wait_until(self.drained, deadline - time.monotonic()):
            raise StackError(f"Postfix queue not empty after {timeout}s; postfix log:\n"
                             f"{procs.tail(self.logs['postfix'])}")


def parse_dump(path):
    """smtp-sink's dump: X-Client-*/X-Mail-Args/X-Rcpt-Args, a 3-line Received:, the message, ""."""
    raw = path.read_bytes()
    fields, pos, in_received = {}, 0, False
    while pos < len(raw):
        end = raw.find(b"\n", pos) + 1 or len(raw)
        line = raw[pos:end].rstrip(b"\r\n")
        if in_received and not line[:1].isspace():
            break  # first line after the sink's Received: header
        if line.startswith(b"Received:"):
            in_received = True
        elif not in_received:
            key, _, value = line.decode(errors="replace").partition(": ")
            fields.setdefault(key, []).append(value)
        pos = end
    data = raw[pos:]
    if data.endswith(b"\n\n"):
        data = data[:-1]  # the sink appends an empty line

    def addr(args):
        return args.partition("<")[2].partition(">")[0]
    return Delivery(path=path, sender=addr(fields.get("X-Mail-Args", [""])[0]),
                    recipients=[addr(a) for a in fields.get("X-Rcpt-Args", [])],
                    data=data, client_addr=fields.get("X-Client-Addr", [""])[0])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("action", choices=["up", "down", "status"])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--smtp-port", type=int, default=2525)
    ap.add_argument("--no-milter", action="store_true", help="bare Postfix (no smtpd_milters)")
    ap.add_argument("--milter-cmd", help="command instead of scanmilter; {socket} {config} {root} filled in")
    ap.add_argument("--debian-master", action="store_true",
                    help="Debian's packaged master.cf: smtpd and cleanup chrooted, the milter socket inside")
    args = ap.parse_args(argv)
    stack = Stack(args.dir, smtp_port=args.smtp_port, with_milter=not args.no_milter,
                  milter_cmd=shlex.split(args.milter_cmd) if args.milter_cmd else None,
                  debian_master=args.debian_master)
    try:
        if args.action == "up":
            stack.start()
            print(f"stack up in {stack.startup_seconds:.1f}s")
            print(json.dumps(stack.describe(), indent=1))
        elif args.action == "down":
            stack.stop()
            print("stack down")
        else:
            info = stack.run_dir / "stack.json"
            if info.exists():
                print(info.read_text())
            for name, pids in stack.status().items():
                print(f"{name:11} " + (" ".join(f"{p}:{'alive' if a else 'dead'}" for p, a in pids) or "-"))
    except procs.ProcsError as e:
        print(f"stack {args.action} failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
