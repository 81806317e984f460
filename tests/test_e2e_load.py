"""Load: many concurrent SMTP sessions through Postfix with mixed mail. Every message is accounted
for by Message-ID (delivered + rejected = sent), the metrics agree, nothing is tempfailed, and
scanmilter's memory stays bounded. CI runs a small version; `make test-load` the full one
(SCANMILTER_LOAD_MESSAGES=2000 SCANMILTER_LOAD_SESSIONS=50)."""
import concurrent.futures
import os
import random
import re
import time

import pytest

import stack as stacklib
from support import GTUBE, OUTSIDE, make, peak_rss_kib, scrape

pytestmark = pytest.mark.integration

MESSAGES = int(os.environ.get("SCANMILTER_LOAD_MESSAGES", "200"))
SESSIONS = int(os.environ.get("SCANMILTER_LOAD_SESSIONS", "20"))
PEAK_RSS_LIMIT_MIB = 250


def corpus(n: int) -> list[tuple[str, bytes, str]]:
    """(message-id, bytes, kind): mostly ham of 2-30 KB, some spam, a few viruses, a few large."""
    rnd = random.Random(1234)
    words = "mail server postfix queue relay domain budget meeting report invoice lunch friday".split()
    out = []
    for i in range(n):
        mid = f"load-{i}-{rnd.getrandbits(32):08x}@outside.test"
        roll = rnd.random()
        if roll < 0.08:
            kind, body = "spam", f"{GTUBE}\n"
        elif roll < 0.15:
            kind, body = "virus", stacklib.eicar().decode() + "\n"
        elif roll < 0.18:
            kind, body = "large", "\n".join(" ".join(rnd.choices(words, k=12)) for _ in range(15000)) + "\n"
        else:
            kind = "ham"
            body = "\n".join(" ".join(rnd.choices(words, k=10)) for _ in range(rnd.randint(30, 450))) + "\n"
        out.append((mid, make(f"load test {i}", body=body, msgid=f"<{mid}>"), kind))
    return out


def test_concurrent_mixed_load_accounts_for_every_message(stack_with):
    stack = stack_with(spamd_children=3)
    messages = corpus(MESSAGES)
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(SESSIONS) as pool:
        results = list(pool.map(lambda m: stack.send(m[1], "alice@outside.test", ["bob@example.com"],
                                                     xclient_addr=OUTSIDE), messages))
    seconds = time.monotonic() - start
    codes = [r["code"] for r in results]
    assert not [r for r in results if r["code"] not in (250, 550)], "unexpected replies"
    accepted = {m[0] for m, r in zip(messages, results) if r["code"] == 250}
    rejected = {m[0] for m, r in zip(messages, results) if r["code"] == 550}
    assert {m[0] for m in messages if m[2] in ("spam", "virus")} == rejected
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        delivered = [re.search(rb"(?im)^Message-ID: <([^>]+)>", d.data).group(1).decode()
                     for d in stack.delivered()]
        if len(delivered) >= len(accepted):
            break
        time.sleep(0.5)
    assert sorted(delivered) == sorted(accepted)              # each accepted message exactly once
    assert len(accepted) + len(rejected) == len(messages)
    m = scrape(stack)
    assert m[("scanmilter_messages_total", (("action", "accept"), ("direction", "inbound")))] == len(accepted)
    assert m[("scanmilter_messages_total", (("action", "reject"), ("direction", "inbound")))] == len(rejected)
    pid = stack.pids("scanmilter")[0][0]
    peak = peak_rss_kib(pid) / 1024
    print(f"\nload: {len(messages)} messages, {SESSIONS} sessions, {seconds:.1f} s "
          f"({len(messages) / seconds:.1f} msgs/s); {len(accepted)} delivered, {len(rejected)} rejected; "
          f"scanmilter peak RSS {peak:.1f} MiB; codes {sorted(set(codes))}")
    assert peak < PEAK_RSS_LIMIT_MIB
