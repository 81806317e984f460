"""Webhooks: each event (events.py) POSTed as signed JSON to the URLs of the `[[webhook]]` tables
that ask for it, from a bounded queue by one background thread per process.

Never on the mail path: `emit` encodes the event and puts it on the queue without waiting
(put_nowait); a full queue drops the event, counted in scanmilter_webhook_dropped_total and
logged at most once a minute. The sending thread goes through one requests.Session with no
retries of its own (max_retries=0) and no redirects (allow_redirects=False): it retries a failed
delivery itself, with exponential backoff from webhook_retry_interval, until webhook_deadline
after the event, and each attempt waits at most the webhook's timeout (and never past the
deadline) for the whole answer: a receiver that dribbles it is cut off then. A retry waits in a
heap of its own, so a dead receiver delays the other webhooks' events by its timeouts only. A
short-lived command (the quarantine command) calls `finish` at exit: it waits at most
webhook_flush_timeout for the queue to empty, then drops the rest with a warning, so it never
hangs on a dead receiver.

Signing, as GitHub's and Stripe's webhooks do: each attempt carries its Unix time in
X-Scanmilter-Timestamp and HMAC-SHA256(secret, TIMESTAMP + "." + BODY) in
X-Scanmilter-Signature-256 as "sha256=HEX"; docs/webhooks.md shows how to check it. The body of
every attempt of one delivery is the same (X-Scanmilter-Delivery and the body's "id"), so a
receiver can drop a replay inside its time window by that id.

SECURITY: trusts the configuration (the URLs and secrets are the admin's); the receiver's
answer is read for its status code only, never its body, never a redirect. Secrets never reach
a log line or `check-config`. Event data is hostile (events.py): JSON-encoded by json.dumps only,
capped, never formatted into text.
"""
from __future__ import annotations

import hashlib
import heapq
import hmac
import itertools
import json
import math
import queue
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from . import __version__, events
from .config import ConfigError
from .logs import escape, log
from .privatefile import PrivateFileError, first_line

LOG_INTERVAL = 60.0        # seconds: a repeated problem (drops, failures of one webhook) is logged this often
SIGNATURE_HEADER = "X-Scanmilter-Signature-256"
TIMESTAMP_HEADER = "X-Scanmilter-Timestamp"
EVENT_HEADER = "X-Scanmilter-Event"
DELIVERY_HEADER = "X-Scanmilter-Delivery"
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Hook:
    """One [[webhook]] table, its secret read."""
    label: str                  # the metrics' `webhook` label: its name, or its position from 0
    url: str
    events: frozenset
    secret: bytes = field(repr=False)
    timeout: float


def hooks_from(cfg) -> list[Hook]:
    """The webhooks of the settings with their secrets; ConfigError when a secret_file cannot be
    read, is empty, or is readable by every user."""
    hooks = []
    for i, table in enumerate(getattr(cfg, "webhooks", ())):
        label = table["name"] or str(i)
        secret = table["secret"]
        if table["secret_file"]:
            try:
                secret = first_line(table["secret_file"])
            except PrivateFileError as e:
                raise ConfigError(f"webhook {label}: secret_file {table['secret_file']}: {e}") from None
        hooks.append(Hook(label, table["url"], frozenset(table["events"] or events.EVENTS), secret.encode(),
                          table["timeout"]))
    return hooks


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The value of X-Scanmilter-Signature-256."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def capped(value, field_limit: int, list_limit: int):
    """Event data made safe to encode: texts cut to `field_limit` characters (undecodable bytes as
    \\xNN), lists to `list_limit` items, numbers that JSON cannot carry (NaN, infinities) as null."""
    if isinstance(value, str):
        text = _SURROGATE.sub(lambda m: f"\\x{ord(m.group()) - 0xdc00:02x}" if ord(m.group()) >= 0xdc80
                              else f"\\u{ord(m.group()):04x}", value)
        return text[:field_limit]
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): capped(v, field_limit, list_limit) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [capped(v, field_limit, list_limit) for v in list(value)[:list_limit]]
    return capped(str(value), field_limit, list_limit)


@dataclass(order=True)
class Delivery:
    due: float                          # monotonic time of the next attempt
    seq: int
    hook: Hook = field(compare=False)
    event: str = field(compare=False)
    id: str = field(compare=False)
    body: bytes = field(compare=False)
    deadline: float = field(compare=False)
    attempts: int = field(default=0, compare=False)


class Sender:
    """The queue, the sending thread and its Session. `configure` swaps the webhooks and the
    retry settings (a reload); the queue's size stays as started."""

    def __init__(self, cfg, hooks: list[Hook], metrics=None, host: str = ""):
        import requests
        self.metrics, self.host = metrics, host or socket.gethostname()
        self.queue_size = cfg.webhook_queue_size
        self.queue: queue.Queue[Delivery] = queue.Queue(maxsize=self.queue_size)
        self._retries: list[Delivery] = []            # the sending thread's own: no lock
        self._seq = itertools.count()
        self._idle = threading.Condition()
        self._pending = 0                             # queued, waiting for a retry, or being sent
        self._said: dict[str, tuple[float, int]] = {}   # what was logged when, and how often since
        self._said_lock = threading.Lock()
        self._closed = False                          # flushed: the thread stops, what is left was dropped
        self.session = requests.Session()
        self.session.trust_env = False      # no proxy or .netrc credentials from the environment
        adapter = _adapter()
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.configure(cfg, hooks)
        self.thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
        self.thread.start()

    def configure(self, cfg, hooks: list[Hook]) -> None:
        self.hooks = tuple(hooks)
        self.retry_interval, self.deadline = cfg.webhook_retry_interval, cfg.webhook_deadline
        self.field_limit, self.list_limit = cfg.webhook_field_limit, cfg.webhook_list_limit
        self.flush_timeout = cfg.webhook_flush_timeout

    # ------------------------------------------------------------ the callers' side: never waits
    def wanted(self, name: str) -> bool:
        return any(name in h.events for h in self.hooks)

    def emit(self, name: str, data: dict) -> None:
        targets = [h for h in self.hooks if name in h.events]
        if not targets:
            return
        delivery_id = uuid.uuid4().hex
        document = {"version": events.VERSION, "event": name, "id": delivery_id, "time": events.iso(time.time()),
                    "host": self.host, "data": data}
        body = json.dumps(capped(document, self.field_limit, self.list_limit), ensure_ascii=False,
                          allow_nan=False, separators=(",", ":")).encode()
        now = time.monotonic()
        for hook in targets:
            item = Delivery(now, next(self._seq), hook, name, delivery_id, body, now + self.deadline)
            with self._idle:
                self._pending += 1
            try:
                self.queue.put_nowait(item)
            except queue.Full:
                self._finished()
                self._drop("queue_full", f"webhooks: queue full (webhook_queue_size = {self.queue_size}): "
                                         f"{name} for webhook {hook.label} dropped")

    # ------------------------------------------------------------ the sending thread
    def _run(self) -> None:
        while not self._closed:
            item = self._next()
            if item is None:
                break
            try:
                self._deliver(item)
            except Exception:       # the sender must never die: the event is counted as failed
                log.exception("webhooks: sending %s to webhook %s failed", item.event, item.hook.label)
                self._count("webhook_failed", item.hook.label)
                self._finished()

    def _next(self) -> Delivery | None:
        """A retry that is due, else the next new event (waiting for it, or for the next retry);
        None once flushed."""
        while not self._closed:
            now = time.monotonic()
            if self._retries and self._retries[0].due <= now:
                return heapq.heappop(self._retries)
            wait = self._retries[0].due - now if self._retries else None
            try:
                return self.queue.get(timeout=wait)
            except queue.Empty:
                continue
        return None

    def _deliver(self, item: Delivery) -> None:
        hook = item.hook
        item.attempts += 1
        problem, retry = self._post(item, min(hook.timeout, max(item.deadline - time.monotonic(), 0.001)))
        if self._closed:            # flushed meanwhile: this one was counted as dropped
            return
        if not problem:
            self._count("webhook_sent", hook.label)
            self._finished()
            return
        delay = self.retry_interval * 2 ** (item.attempts - 1)
        if retry and time.monotonic() + delay < item.deadline and len(self._retries) < self.queue_size:
            log.debug("webhooks: %s to webhook %s: %s; attempt %d in %.1fs", item.event, hook.label, problem,
                      item.attempts + 1, delay)
            self._count("webhook_retries", hook.label)
            item.due = time.monotonic() + delay
            heapq.heappush(self._retries, item)
            return
        why = "" if not retry else " (too many waiting for a retry)" if len(self._retries) >= self.queue_size \
            else f" (webhook_deadline {self.deadline:.0f}s reached)"
        # logged before it stops being pending: a command's finish() returns, and its process may
        # end, as soon as nothing is pending, and must not take this line with it
        self._say(f"failed:{hook.label}", "webhooks: %s for webhook %s not delivered after %d attempt(s): %s%s",
                  item.event, hook.label, item.attempts, problem, why)
        self._count("webhook_failed", hook.label)
        self._finished()

    def _post(self, item: Delivery, timeout: float) -> tuple[str, bool]:
        """("" , _) when the receiver took it; else (what went wrong, whether to try again)."""
        import requests
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", "User-Agent": f"scanmilter/{__version__}",
                   EVENT_HEADER: item.event, DELIVERY_HEADER: item.id, TIMESTAMP_HEADER: timestamp,
                   SIGNATURE_HEADER: sign(item.hook.secret, timestamp, item.body)}
        # requests' timeout bounds each read, not the answer: a receiver sending a byte now and then
        # (or "100 Continue" after "100 Continue") would keep this thread, every webhook's events,
        # for as long as it liked. At the timeout the attempt's socket is shut down.
        me, cut = threading.get_ident(), threading.Event()
        _in_use.pop(me, None)
        timer = threading.Timer(timeout, lambda: (cut.set(), _shut(_in_use.get(me))))
        timer.daemon = True
        timer.start()
        try:
            # stream: the body of the answer is never read, only its status
            with self.session.post(item.hook.url, data=item.body, headers=headers, timeout=timeout,
                                   allow_redirects=False, stream=True) as answer:
                status = answer.status_code
        except requests.exceptions.Timeout:
            return f"no answer within {timeout:.1f}s", True
        except requests.exceptions.RequestException as e:
            if cut.is_set():
                return f"no complete answer within {timeout:.1f}s", True
            return escape(_without_path(f"{type(e).__name__}: {e}", item.hook.url), 300), True
        finally:
            timer.cancel()
            _in_use.pop(me, None)
        if cut.is_set():            # what was read before the cut may be a status line cut short
            return f"no complete answer within {timeout:.1f}s", True
        if 200 <= status < 300:
            return "", False
        if 300 <= status < 400:
            return f"answered {status}: redirects are not followed (fix the url)", False
        # a receiver that is busy or broken may take it later; any other refusal stays one
        return f"answered {status}", status >= 500 or status in (408, 425, 429)

    # ------------------------------------------------------------ counting, logging, the end
    def _count(self, metric: str, label: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, metric).labels(label).inc()

    def _finished(self, n: int = 1) -> None:
        with self._idle:
            self._pending -= n
            self._idle.notify_all()

    def _drop(self, reason: str, text: str, n: int = 1) -> None:
        if self.metrics is not None:
            self.metrics.webhook_dropped.labels(reason).inc(n)
        self._say(f"dropped:{reason}", "%s", text, n=n)

    def _say(self, key: str, fmt: str, *args, n: int = 1) -> None:
        """Log a warning, at most once per LOG_INTERVAL for each kind of problem, saying how many
        times it happened since the last line."""
        now = time.monotonic()
        with self._said_lock:
            last, count = self._said.get(key, (-math.inf, 0))
            if now - last < LOG_INTERVAL:
                self._said[key] = (last, count + n)
                return
            self._said[key] = (now, 0)
        log.warning(fmt + (f" ({count} more like it in the last {LOG_INTERVAL:.0f}s)" if count else ""), *args)

    def pending(self) -> int:
        with self._idle:
            return self._pending

    def flush(self, timeout: float) -> int:
        """Wait up to `timeout` seconds for every event to be delivered or given up, then stop the
        sending thread; the number still pending then, which are dropped (counted and logged)."""
        end = time.monotonic() + timeout
        self.hooks = ()                     # nothing new from here on
        with self._idle:
            while self._pending > 0 and time.monotonic() < end:
                self._idle.wait(end - time.monotonic())
            left = self._pending
            self._closed = True
        try:
            self.queue.put_nowait(None)     # wakes the thread if it waits for an event
        except queue.Full:
            pass                            # then it is busy, and sees _closed next
        if left:
            self._drop("exit", f"webhooks: {left} event(s) not delivered within webhook_flush_timeout "
                               f"({timeout:.1f}s) at exit: dropped", n=left)
        return left


_in_use: dict[int, object] = {}         # a sending thread's id -> the connection of its attempt


def _shut(connection) -> None:
    """Shut down a connection's socket: a read blocked on it returns at once (closing it would not
    wake the read). The plain socket's shutdown, so that a TLS socket is cut the same way."""
    sock = getattr(connection, "sock", None)
    if sock is not None:
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass


def _adapter():
    """requests' HTTPAdapter (no retries of its own) whose connections record, in _in_use, the
    thread that uses them: what Sender._post shuts down at an attempt's timeout."""
    from requests.adapters import HTTPAdapter
    from urllib3 import HTTPConnectionPool, HTTPSConnectionPool
    from urllib3.connection import HTTPConnection, HTTPSConnection

    def recorded(cls):
        class Recorded(cls):
            def connect(self):
                _in_use[threading.get_ident()] = self
                super().connect()

            def request(self, *args, **kwargs):
                _in_use[threading.get_ident()] = self
                return super().request(*args, **kwargs)
        return Recorded

    class HTTPPool(HTTPConnectionPool):
        ConnectionCls = recorded(HTTPConnection)

    class HTTPSPool(HTTPSConnectionPool):
        ConnectionCls = recorded(HTTPSConnection)

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": HTTPPool, "https": HTTPSPool}

    return Adapter(max_retries=0, pool_connections=4, pool_maxsize=1)


def _without_path(text: str, url: str) -> str:
    """An error's text without the URL's path and query, which may be the credential (requests
    names the URL in its errors, as it sent it: percent-encoded, so both forms are hidden)."""
    from urllib.parse import urlsplit
    import requests
    forms = [url]
    try:
        prepared = requests.models.PreparedRequest()
        prepared.prepare_url(url, None)
        forms.append(prepared.url)
    except (requests.exceptions.RequestException, ValueError):
        pass
    hidden = set()
    for form in forms:
        parts = urlsplit(form)
        hidden |= {parts.path + ("?" + parts.query if parts.query else ""), parts.path, parts.query}
    for secret in sorted(hidden, key=len, reverse=True):
        if len(secret.strip("/")) > 0:
            text = text.replace(secret, "/****")
    return text


_sender: Sender | None = None


def start(cfg, hooks: list[Hook], metrics=None) -> Sender:
    """This process's sender (one thread), replacing none: call once."""
    global _sender
    _sender = Sender(cfg, hooks, metrics, cfg.database_host_name)
    return _sender


def configure(cfg, hooks: list[Hook]) -> None:
    """A reload: new webhooks and retry settings for the running sender."""
    if _sender is not None:
        _sender.configure(cfg, hooks)


def wanted(name: str) -> bool:
    """Whether any webhook wants this event: skip building its data when none does."""
    sender = _sender
    return sender is not None and sender.wanted(name)


def emit(name: str, data: dict) -> None:
    """Queue an event for every webhook that wants it, without waiting; never raises."""
    sender = _sender
    if sender is None:
        return
    try:
        sender.emit(name, data)
    except Exception:       # an event must never cost a message or an action
        log.exception("webhooks: could not queue %s", name)


def finish(timeout: float | None = None) -> int:
    """At the end of a process: flush within webhook_flush_timeout (or `timeout`), then drop what
    is left. The number of events dropped."""
    global _sender
    sender, _sender = _sender, None
    if sender is None:
        return 0
    return sender.flush(sender.flush_timeout if timeout is None else timeout)
