"""rspamd: its normal worker over HTTP (`POST /checkv2`), and its controller for learning.

One `requests.Session` per rspamd address keeps connections alive between messages; requests
never retries on its own (max_retries=0: a retry belongs to the caller, within its deadline).
The message is streamed from the spool with its Content-Length, never copied. The client is
described as rspamd's own milter describes it (IP, Helo, Hostname, From, Rcpt, Queue-Id, User)
and the direction goes in `Settings-ID: inbound|outbound`, so an rspamd configuration can treat
the two differently (settings { inbound { id = "inbound"; ... } outbound { ... } }).

SECURITY: the reply is untrusted. It is read within one deadline and REPLY_LIMIT bytes, must be
the JSON object rspamd writes (numbers where numbers belong, a known action, symbols with
numeric scores and names in rspamd's alphabet), and anything else is a protocol error, never a
clean result. Header values built from what the client sent are reduced to one safe word.
"""
from __future__ import annotations

import functools
import json
import math
import re
import socket
import threading
import time

import requests
import urllib3
from requests.adapters import HTTPAdapter

from . import (CLEAN, FOUND, PROTOCOL, REFUSED, SIZE, SKIPPED, TIMEOUT, Deadline, EngineError, ScanResult,
               parse_client_socket, run)

CHUNK = 64 * 1024
REPLY_LIMIT = 1024 * 1024      # bytes; a /checkv2 reply lists symbols, a larger one is garbage
POOL_CONNECTIONS = 64          # kept-alive connections per address (scan threads share them)

# rspamd's actions, as /checkv2 names them, and what each means when rspamd_follow_action is on
ACTIONS = ("no action", "greylist", "add header", "rewrite subject", "soft reject", "reject")

_SYMBOL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_TOKEN_UNSAFE = re.compile(r"[^A-Za-z0-9._:@+=\[\]-]")


def _word(text: str) -> str:
    """A client-supplied value (HELO, address, login) as one header-safe word."""
    return _TOKEN_UNSAFE.sub("_", text)[:255]


# ------------------------------------------------------------------ one deadline for a whole exchange
# requests' timeouts bound each socket operation, so an rspamd that dribbles its answer a byte at
# a time could hold a scan for ever. The socket of each connection bounds every send and receive
# by the deadline of the exchange under way in its thread as well (requests is synchronous: the
# thread that sends a request reads its answer).
_exchange = threading.local()


class _DeadlineSocket(socket.socket):
    _wanted: float | None = None

    @classmethod
    def wrap(cls, sock: socket.socket) -> _DeadlineSocket:
        timeout = sock.gettimeout()
        wrapped = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        wrapped.settimeout(timeout)
        return wrapped

    def settimeout(self, value):
        self._wanted = value
        super().settimeout(value)

    def _bound(self):
        end = getattr(_exchange, "end", None)
        if end is not None:
            left = end - time.monotonic()
            if left <= 0:
                raise socket.timeout("deadline passed")
            super().settimeout(left if self._wanted is None else min(left, self._wanted))

    def recv_into(self, *args, **kwargs):
        self._bound()
        return super().recv_into(*args, **kwargs)

    def recv(self, *args, **kwargs):
        self._bound()
        return super().recv(*args, **kwargs)

    def sendall(self, *args, **kwargs):
        self._bound()
        return super().sendall(*args, **kwargs)

    def send(self, *args, **kwargs):
        self._bound()
        return super().send(*args, **kwargs)


class _Connection(urllib3.connection.HTTPConnection):
    def _new_conn(self) -> socket.socket:
        return _DeadlineSocket.wrap(super()._new_conn())


class _Pool(urllib3.HTTPConnectionPool):
    ConnectionCls = _Connection


class _UnixConnection(urllib3.connection.HTTPConnection):
    def __init__(self, *args, unix_path: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.unix_path = unix_path

    def _new_conn(self) -> socket.socket:
        sock = _DeadlineSocket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.unix_path)
        except socket.timeout:
            sock.close()
            raise urllib3.exceptions.ConnectTimeoutError(self, f"connect to {self.unix_path} timed out") from None
        except OSError as e:
            sock.close()
            raise urllib3.exceptions.NewConnectionError(self, f"connect to {self.unix_path}: {e.strerror or e}") \
                from None
        return sock


class _UnixPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _UnixConnection


class _Adapter(HTTPAdapter):
    """requests keeps one value per header name; rspamd wants one Rcpt header per recipient.
    The recipients travel as one space-separated Rcpt value (each is one word) and leave as
    repeated headers."""

    def init_poolmanager(self, connections, maxsize, block=False, **kwargs):
        super().init_poolmanager(connections, maxsize, block, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _Pool}

    def send(self, request, **kwargs):
        rcpts = request.headers.pop("Rcpt", None)
        if rcpts:
            headers = urllib3.HTTPHeaderDict(request.headers)
            for rcpt in rcpts.split(" "):
                headers.add("Rcpt", rcpt)
            request.headers = headers
        return super().send(request, **kwargs)


class _UnixAdapter(_Adapter):
    """Every http:// URL goes to one unix socket."""

    def __init__(self, path: str, **kwargs):
        self.unix_path = path
        super().__init__(**kwargs)

    def init_poolmanager(self, connections, maxsize, block=False, **kwargs):
        HTTPAdapter.init_poolmanager(self, connections, maxsize, block, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": functools.partial(_UnixPool, unix_path=self.unix_path)}


def session_for(address) -> tuple[requests.Session, str]:
    """A Session and the base URL for ("inet", (host, port)) or ("unix", path)."""
    kind, where = address
    s = requests.Session()
    s.trust_env = False          # no proxy or netrc from the environment: rspamd is ours
    if kind == "unix":
        adapter: HTTPAdapter = _UnixAdapter(where, pool_connections=1, pool_maxsize=POOL_CONNECTIONS, max_retries=0)
        base = "http://localhost"
    else:
        adapter = _Adapter(pool_connections=1, pool_maxsize=POOL_CONNECTIONS, max_retries=0)
        host, port = where
        base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    s.mount("http://", adapter)
    return s, base


class _Body:
    """`size` bytes of a reader as a request body: has a length (so requests sends Content-Length,
    not chunks) and stops at the deadline."""

    def __init__(self, reader, size: int, deadline: Deadline):
        self.reader, self.left, self.deadline = reader, size, deadline

    def __len__(self) -> int:
        return self.left

    def read(self, n: int = -1) -> bytes:
        self.deadline.left()
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self.reader.read(n) if n else b""
        self.left -= len(data)
        return data


def _call(session: requests.Session, url: str, headers: dict, data, connect_timeout: float,
          deadline: Deadline, what: str) -> tuple[int, bytes]:
    """One POST within `deadline`: (status, body of at most REPLY_LIMIT bytes)."""
    _exchange.end = deadline.end
    try:
        left = deadline.left()
        with session.post(url, data=data, headers=headers, stream=True,
                          timeout=(min(connect_timeout, left), left)) as reply:
            body = b""
            for chunk in reply.iter_content(CHUNK):
                body += chunk
                if len(body) > REPLY_LIMIT:
                    raise EngineError(PROTOCOL, f"{what} reply over {REPLY_LIMIT} bytes")
                deadline.left()        # a dribbling server cannot stretch the deadline
            return reply.status_code, body
    except requests.exceptions.ConnectTimeout:
        raise EngineError(TIMEOUT, f"connect to {what} timed out") from None
    except requests.exceptions.ConnectionError as e:
        cause = e.args[0] if e.args else e
        if isinstance(cause, urllib3.exceptions.ReadTimeoutError) or "timed out" in str(cause):
            raise EngineError(TIMEOUT, f"{what} did not answer in time") from None
        if isinstance(cause, urllib3.exceptions.ProtocolError):
            raise EngineError(PROTOCOL, f"{what} broke the connection: {str(cause)[:200]}") from None
        raise EngineError(REFUSED, f"{what}: {str(cause)[:200]}") from None
    except requests.exceptions.Timeout:
        raise EngineError(TIMEOUT, f"{what} did not answer in time") from None
    except requests.exceptions.RequestException as e:
        raise EngineError(PROTOCOL, f"{what}: {type(e).__name__}: {str(e)[:200]}") from None
    finally:
        _exchange.end = None


def from_settings(cfg) -> RspamdScanner:
    return RspamdScanner(parse_client_socket(cfg.rspamd_socket), cfg.rspamd_connect_timeout, cfg.rspamd_timeout,
                         cfg.rspamd_size_limit, follow_action=cfg.rspamd_follow_action,
                         virus_symbols=tuple(cfg.rspamd_virus_symbols), check_timeout=cfg.engine_check_timeout)


class RspamdScanner:
    name = "rspamd"

    def __init__(self, address, connect_timeout: float, timeout: float, size_limit: int,
                 follow_action: bool = False, virus_symbols: tuple[str, ...] = ("CLAM_VIRUS",),
                 check_timeout: float | None = None):
        self.address, self.connect_timeout, self.timeout = address, connect_timeout, timeout
        self.size_limit, self.follow_action, self.virus_symbols = size_limit, follow_action, virus_symbols
        self.check_timeout = timeout if check_timeout is None else min(timeout, check_timeout)
        self.session, self.base = session_for(address)

    def scan(self, spool) -> ScanResult:
        return run(self.name, lambda: self._scan(spool))

    def _scan(self, spool) -> ScanResult:
        size = spool.stored
        if size > self.size_limit:
            return ScanResult(self.name, SKIPPED, SIZE)
        deadline = Deadline(self.timeout)
        with spool.reader(size) as reader:
            status, body = _call(self.session, self.base + "/checkv2", request_headers(spool),
                                 _Body(reader, size, deadline), self.connect_timeout, deadline, "rspamd")
        if status != 200:
            raise EngineError(PROTOCOL, f"rspamd answered HTTP {status}: {_error_text(body)}")
        return parse_reply(body, self.virus_symbols, self.follow_action)

    def ping(self) -> str:
        """"" when rspamd's worker answers /ping with pong."""
        _exchange.end = time.monotonic() + self.check_timeout
        try:
            with self.session.get(self.base + "/ping", timeout=(self.connect_timeout, self.check_timeout),
                                  stream=True) as r:
                text = r.raw.read(80)          # "pong": a longer answer is not rspamd's anyway
        except requests.exceptions.RequestException as e:
            return f"{type(e).__name__}: {str(e)[:200]}"
        finally:
            _exchange.end = None
        return "" if r.status_code == 200 and text.strip() == b"pong" else f"unexpected reply {r.status_code} {text!r}"


def request_headers(spool) -> dict[str, str]:
    """What rspamd's own milter tells rspamd about a message, from the Submission's origin."""
    headers = {"Accept-Encoding": "identity"}     # no compressed reply: REPLY_LIMIT counts what is read
    origin = getattr(spool, "origin", None)
    if origin is None:
        return headers
    ip = origin.client_address.removeprefix("IPv6:")
    for name, value in (("IP", ip), ("Helo", origin.helo), ("Queue-Id", origin.queue_id),
                        ("User", origin.auth_user), ("MTA-Name", origin.hostname)):
        if value:
            headers[name] = _word(value)
    if origin.client_name and not origin.client_name.startswith("[") and origin.client_name != "unknown":
        headers["Hostname"] = _word(origin.client_name)
    sender = getattr(origin, "sender", None)
    if sender is not None:
        headers["From"] = f"<{_word(sender)}>" if sender else "<>"
    recipients = getattr(origin, "recipients", ())
    if recipients:
        headers["Rcpt"] = " ".join(f"<{_word(r)}>" for r in recipients)     # one header each: _Adapter
    direction = getattr(origin, "direction", "")
    if direction:
        headers["Settings-ID"] = _word(direction)
    return headers


def _error_text(body: bytes) -> str:
    try:
        text = json.loads(body).get("error", "")
    except (ValueError, AttributeError):
        text = ""
    return str(text or body[:100])[:200].encode("ascii", "backslashreplace").decode()


def _number(value, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EngineError(PROTOCOL, f"rspamd reply: {field} is not a number: {str(value)[:50]!r}")
    return float(value)


def parse_reply(body: bytes, virus_symbols: tuple[str, ...] = ("CLAM_VIRUS",),
                follow_action: bool = False) -> ScanResult:
    """Read rspamd's /checkv2 JSON:

        {"is_skipped": false, "score": 2.1, "required_score": 15, "action": "no action",
         "symbols": {"NAME": {"name": "NAME", "score": 0.1, "options": [...]}, ...}, ...}

    into a result: the score, rspamd's required score, its action and its symbols with their
    scores; viruses are the options of the antivirus symbols `virus_symbols`. Anything else is
    a protocol error."""
    try:
        reply = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise EngineError(PROTOCOL, f"rspamd reply is not JSON: {body[:100]!r}") from None
    if not isinstance(reply, dict):
        raise EngineError(PROTOCOL, f"rspamd reply is not a JSON object: {body[:100]!r}")
    # is_skipped says rspamd stopped early (GTUBE, a pre-filter's verdict): score and action stand
    for key in ("score", "required_score", "action", "symbols"):
        if key not in reply:
            raise EngineError(PROTOCOL, f"rspamd reply without {key!r}: {body[:100]!r}")
    score, required = _number(reply["score"], "score"), _number(reply["required_score"], "required_score")
    action = reply["action"]
    if action not in ACTIONS:
        raise EngineError(PROTOCOL, f"rspamd reply: unknown action {str(action)[:50]!r}")
    symbols = reply["symbols"]
    if not isinstance(symbols, dict):
        raise EngineError(PROTOCOL, "rspamd reply: symbols is not an object")
    rules, scores, viruses = [], [], []
    for name, symbol in symbols.items():
        if not _SYMBOL.fullmatch(name) or not isinstance(symbol, dict):
            raise EngineError(PROTOCOL, f"rspamd reply names a symbol that cannot exist: {name[:100]!r}")
        rules.append(name)
        scores.append(_number(symbol.get("score"), f"score of {name}"))
        if name in virus_symbols:
            options = symbol.get("options", [])
            if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
                raise EngineError(PROTOCOL, f"rspamd reply: options of {name} are not a list of names")
            viruses += options or [name]
    spam = score >= required or action in ("reject", "soft reject", "add header", "rewrite subject")
    return ScanResult(RspamdScanner.name, FOUND if spam or viruses else CLEAN, viruses=tuple(viruses),
                      score=score, required=required, rules=tuple(rules), rule_scores=tuple(scores),
                      action=action if follow_action else "")


# ------------------------------------------------------------------------------ learning
class RspamdController:
    """rspamd's controller worker: /learnham and /learnspam, with its password."""

    def __init__(self, address, password: str, timeout: float, connect_timeout: float = 2.0):
        self.password, self.timeout, self.connect_timeout = password, timeout, connect_timeout
        self.session, self.base = session_for(address)

    def tell(self, data: bytes, message_class: str) -> bool:
        """Teach rspamd's statistics that `data` is "ham" or "spam". True when it learned, False
        when it had learned this message before; EngineError with rspamd's words when it cannot."""
        if message_class not in ("ham", "spam"):
            raise ValueError(message_class)
        status, body = _call(self.session, f"{self.base}/learn{message_class}", {"Password": self.password},
                             data, self.connect_timeout, Deadline(self.timeout), "rspamd controller")
        if status == 208:            # rspamd: "has been already learned as ..."
            return False
        if status != 200:
            raise EngineError(PROTOCOL, f"rspamd controller answered HTTP {status}: {_error_text(body)}")
        try:
            ok = json.loads(body).get("success") is True
        except (ValueError, AttributeError):
            ok = False
        if not ok:
            raise EngineError(PROTOCOL, f"rspamd controller did not say success: {body[:100]!r}")
        return True


def controller_from_settings(cfg) -> RspamdController:
    """The controller of rspamd_controller_address, with the password of rspamd_password_file
    (read here, so that an unreadable file is reported as a failed learning)."""
    password = ""
    if cfg.rspamd_password_file:
        try:
            with open(cfg.rspamd_password_file, encoding="utf-8") as f:
                password = f.read().strip()
        except OSError as e:
            raise EngineError(REFUSED, f"rspamd_password_file {cfg.rspamd_password_file}: {e.strerror}") from None
    return RspamdController(parse_client_socket(cfg.rspamd_controller_address), password, cfg.rspamd_timeout,
                            cfg.rspamd_connect_timeout)
