"""A webhook receiver for the tests: http.server on 127.0.0.1 in a thread of its own, recording every
request. What it answers is set per test: a status for each of the next requests (`plan`), else
`status`; "hang" reads the request and never answers until `release()` (or close). And the
signature check exactly as docs/webhooks.md prints it."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import procs
from conftest import ROOT


def documented_verify():
    """The `verify` function of docs/webhooks.md, taken from the doc itself."""
    doc = (ROOT / "docs" / "webhooks.md").read_text()
    section = doc.split("## Verifying a request", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "docs/webhooks.md", "exec"), namespace)
    return namespace["verify"]


class Request:
    def __init__(self, path: str, headers: dict, body: bytes):
        self.path, self.headers, self.body = path, headers, body

    def json(self) -> dict:
        return json.loads(self.body)


class Receiver:
    def __init__(self):
        self.requests: list[Request] = []
        self.plan: list = []            # answers for the next requests, first first
        self.status = 200               # then this; "hang": no answer
        self.location = ""              # the Location header of a 3xx answer
        self.hanging = 0                # requests held unanswered right now
        self._lock = threading.Lock()
        self._release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    receiver.requests.append(Request(self.path, dict(self.headers.items()), body))
                    answer = receiver.plan.pop(0) if receiver.plan else receiver.status
                    if answer == "hang":
                        receiver.hanging += 1
                if answer == "hang":
                    receiver._release.wait(120)
                    with receiver._lock:
                        receiver.hanging -= 1
                    self.close_connection = True
                    return
                self.send_response(answer)
                if receiver.location:
                    self.send_header("Location", receiver.location)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def answer(self, status, plan=()) -> None:
        """From now on: `plan`, then `status`; requests hanging so far are let go."""
        with self._lock:
            self.plan, self.status = list(plan), status
        self.release()

    def release(self) -> None:
        self._release.set()
        self._release = threading.Event()

    def received(self, event: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if event is None or r.headers.get("X-Scanmilter-Event") == event]

    def wait(self, predicate, what: str, timeout: float = 30) -> None:
        assert procs.wait_until(predicate, timeout, interval=0.05), \
            f"timed out waiting for {what}; received: {[r.body[:300] for r in self.received()]}"

    def wait_event(self, event: str, match=lambda data: True, timeout: float = 30) -> Request:
        """The first request of `event` whose data satisfies `match`, waiting for it."""
        found: list[Request] = []

        def seen():
            found[:] = [r for r in self.received(event) if match(r.json()["data"])]
            return bool(found)
        self.wait(seen, f"a {event} event", timeout)
        return found[0]

    def close(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()
