#!/usr/bin/env python3
"""scanmilter benchmark: one Postfix, clamd, spamd and rspamd, thirteen ways of putting mail through them.

    1 bare      Postfix without a milter: the ceiling
    2 noeng     scanmilter with clamd_enabled = spamd_enabled = false: the cost of scanmilter itself
    3 scan      scanmilter with clamd and spamd: the real job
    4 peers     clamav-milter + spamass-milter chained (-r 15, no -i): the pair scanmilter replaces
    5 direct    clamd INSTREAM + spamd SYMBOLS in parallel per message, no MTA: the scanners' own limit
    6 trivial   a pymilter milter that accepts everything and adds one header: the Python floor
    7 noeng-tcp variant 2 on a TCP milter socket
    8 trivial-tcp variant 6 on a TCP milter socket: the ~90 ms per message TCP stall of plain libmilter
    9 rspamd-milter  rspamd's own milter (proxy worker, self-scan, its antivirus module on the same clamd)
   10 scan-rspamd    scanmilter with clamd and rspamd (spam_engine = "rspamd")
   11 direct-rspamd  clamd INSTREAM + rspamd /checkv2 in parallel per message, no MTA: their own limit
   12 pool      variant 3 with a pool of two spamd that share variant 3's children (2 + 2 against 4)
   13 failover  variant 12 with one spamd of the pool killed (SIGKILL) when half the replies are in

Every variant uses the same private stack (tools/stack.py: Postfix -> smtp-sink, clamd, spamd with
4 children, two more spamd with 2 children each for 12 and 13, rspamd in a network namespace of its
own for 9-11); only Postfix's smtpd_milters changes (postconf + postfix reload). Milters listen on
unix sockets, except in variants 7 and 8 (TCP on 127.0.0.1). Runs are interleaved (round r runs
every variant once; 13 only in the first --failover-runs rounds) so drift hits all variants alike.
The client is a thread pool of --sessions SMTP sessions, one message per session (connect, EHLO,
XCLIENT from an outside address, EHLO, MAIL, RCPT, DATA, QUIT), timing every message.
A memory run follows: one 50 MB message, then 100 concurrent sessions held in DATA, each against a
freshly started scanmilter. See bench/README.md for how to read the output.

    .venv/bin/python bench/run.py [--quick] [--messages N] [--sessions N] [--runs N] [--only 1,3,4]

The parts: client.py (the SMTP client, the scanners driven directly), variants.py (the milters,
Postfix, one measured run, the memory run, /proc figures), report.py (summary, ratios, targets,
the table and the JSON), corpus.py (the mail).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# the benchmark's own modules, the test stack (tools/) and the checkout's scanmilter
for _path in (REPO / "milter", REPO / "tools", HERE):
    sys.path.insert(0, str(_path))

import corpus as corpuslib  # noqa: E402
import report  # noqa: E402
from client import smtp_payload  # noqa: E402
from variants import SPAMD_BOUND, VARIANTS, Bench, log  # noqa: E402


class BenchTimeout(BaseException):
    """The whole benchmark ran out of its time budget (--max-minutes)."""


# ---------------------------------------------------------------- the command line
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--quick", action="store_true", help="smoke run: 100 messages, 1 run each (a few minutes)")
    ap.add_argument("--messages", type=int, help="messages per run of the spamd-bound variants 3, 4, 5, 12, 13 "
                    "(default 600; --quick 100)")
    ap.add_argument("--fast-repeat", type=int, default=6,
                    help="variants 1, 2, 6-11 send a corpus this many times as large per run, every message "
                    "distinct (default 6)")
    ap.add_argument("--sessions", type=int, default=8, help="concurrent SMTP sessions / scans (default 8)")
    ap.add_argument("--runs", type=int, help="runs per variant; the median is reported (default 3; --quick 1)")
    ap.add_argument("--only", default=",".join(VARIANTS),
                    help="variants to run, in this order: numbers and ranges, e.g. 1,3,4 or 9-13 (default all)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory run")
    ap.add_argument("--serial-messages", type=int, default=200,
                    help="ham messages sent one at a time per variant for the idle latency, a fifth of "
                    "that for variants 3, 4, 5, 12; none for 13 (default 200; 0: none)")
    ap.add_argument("--big-bytes", type=int, default=50_000_000, help="size of the memory run's big message")
    ap.add_argument("--scanned-bytes", type=int, default=20_000_000,
                    help="size of a second big message, under clamd_size_limit (0: none)")
    ap.add_argument("--idle-sessions", type=int, default=100, help="concurrent sessions in the memory run")
    ap.add_argument("--hold-seconds", type=float, default=5.0, help="how long they are held in DATA")
    ap.add_argument("--spamd-children", type=int, default=4,
                    help="spamd's -m (default 4); the two spamd of variants 12 and 13 get half of it each")
    ap.add_argument("--rspamd-workers", type=int, default=2,
                    help="processes of rspamd's normal worker (variants 10, 11) and of its milter (9) (default 2)")
    ap.add_argument("--failover-runs", type=int, default=1,
                    help="variant 13 runs in this many of the rounds, the first ones (default 1)")
    ap.add_argument("--disturbed-share", type=float, default=0.10,
                    help="a run during which other processes used more than this share of the CPU is "
                    "disturbed (default 0.10)")
    ap.add_argument("--retries", type=int, default=1, help="how often a disturbed run is repeated (default 1)")
    ap.add_argument("--run-timeout", type=float, default=600.0, help="seconds one measured run may take")
    ap.add_argument("--max-minutes", type=float, default=45.0, help="the whole benchmark's time budget")
    ap.add_argument("--dir", default="/tmp/scanmilter-bench",
                    help="private directory of the stack (its parents must be world-searchable)")
    ap.add_argument("--results", default=str(HERE / "results"), help="where the JSON goes")
    args = ap.parse_args(argv)
    args.messages = args.messages or (100 if args.quick else 600)
    args.runs = args.runs or (1 if args.quick else 3)
    try:
        args.only = variant_list(args.only)
    except ValueError as e:
        ap.error(f"--only: {e}")
    return args


def variant_list(text: str) -> list[str]:
    """"1,3,9-11" -> ["1", "3", "9", "10", "11"]: known variants, each once, in the order given."""
    out = []
    for item in text.replace(" ", ",").split(","):
        if not item:
            continue
        first, dash, last = item.partition("-")
        if not (first.isdigit() and (not dash or last.isdigit())):
            raise ValueError(f"{item!r} is not a variant number or range")
        for n in range(int(first), int(last if dash else first) + 1):
            if str(n) not in VARIANTS:
                raise ValueError(f"no variant {n} (known: {', '.join(VARIANTS)})")
            out.append(str(n))
    if not out:
        raise ValueError("no variant given")
    return list(dict.fromkeys(out))




def command_line(argv) -> str:
    """How the benchmark was started, for the report."""
    exe, script = Path(sys.executable), Path(__file__).resolve()
    exe = os.path.relpath(exe, REPO) if str(exe).startswith(str(REPO)) else str(exe)
    return shlex.join([exe, os.path.relpath(script, REPO)] + list(sys.argv[1:] if argv is None else argv))


def time_budget(minutes: float) -> None:
    """SIGALRM after `minutes`; SIGTERM and SIGINT interrupt like Ctrl-C, so that clean-up runs."""
    def on_signal(signum, frame):
        if signum == signal.SIGALRM:
            raise BenchTimeout(f"time budget of {minutes:.0f} minutes used up")
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)   # also when started with SIGINT ignored (a background job)
    signal.signal(signal.SIGALRM, on_signal)
    signal.alarm(int(minutes * 60))


# ---------------------------------------------------------------- the measurements
def rounds(bench, args, corpora, raw, discarded) -> None:
    """--runs rounds, each running every variant once (a disturbed run is repeated --retries times).
    corpora: {"spamd_bound": (messages, payloads), "fast": (messages, payloads)}."""
    msgs, payloads = corpora["spamd_bound"]
    fast_msgs, fast_payloads = corpora["fast"]
    for rnd in range(args.runs):
        for v in args.only:
            if v == "13" and rnd >= args.failover_runs:
                continue
            m, p = (msgs, payloads) if v in SPAMD_BOUND else (fast_msgs, fast_payloads)
            for attempt in range(args.retries + 1):
                r = bench.one_run(v, m, p)
                log(f"run {rnd + 1}/{args.runs} variant {v} ({VARIANTS[v][1]}): {r['messages']} msgs in "
                    f"{r['seconds']:.1f}s = {r['msgs_per_s']:.1f}/s; codes {r['codes']}; other processes "
                    f"{100 * r['other_cpu_share']:.1f}% of the CPU"
                    + (f"; {r['unexpected']} UNEXPECTED e.g. {r['unexpected_examples'][:2]}"
                       if r["unexpected"] else "")
                    + (f"; {fmt_failover(r['failover'])}" if "failover" in r else ""))
                if not r["disturbed"] or attempt == args.retries:
                    break
                log(f"  disturbed (other processes over {100 * args.disturbed_share:.0f}% of the CPU): repeating")
                discarded.setdefault(VARIANTS[v][0], []).append(
                    {k: r[k] for k in ("msgs_per_s", "seconds", "other_cpu_share")})
            raw[v].append(r)


def fmt_failover(f) -> str:
    return (f"{f['killed']} killed after {f['after_replies']} replies: {report.fmt(f['before_msgs_per_s'])} msgs/s "
            f"before, {report.fmt(f['after_msgs_per_s'])} after; {f['failovers']:.0f} scans moved to the other spamd")


def one_session(bench, args, msgs, serial) -> None:
    """One session, ham only: the latency of a message on an idle system, where a transport stall
    is not hidden behind queueing. Not for 13: until its kill it is variant 12."""
    for v in [v for v in args.only if v != "13"] if args.serial_messages else ():
        n = args.serial_messages // (5 if v in SPAMD_BOUND else 1)
        m = [x for x in msgs if x.kind == "ham"][:n]
        r = bench.one_run(v, m, [smtp_payload(x.data) for x in m], sessions=1)
        lat = [x[1] for x in r["latencies"] if x[1] is not None]
        serial[v] = {"messages": len(m), "p50": report.pct(lat, 50), "p99": report.pct(lat, 99)}
        log(f"one session, variant {v} ({VARIANTS[v][1]}): {len(m)} ham messages, p50 "
            f"{report.fmt(serial[v]['p50'])} ms, p99 {report.fmt(serial[v]['p99'])} ms")


def make_corpora(args) -> dict:
    """The spamd-bound variants' corpus (--messages) and the fast variants' (--fast-repeat times as
    many messages, made the same way, all distinct: no scan cache can answer a repeat)."""
    out = {}
    for name, n in (("spamd_bound", args.messages), ("fast", args.messages * args.fast_repeat)):
        if name == "fast" and all(v in SPAMD_BOUND for v in args.only):
            out[name] = []
            continue
        log(f"generating the corpus: {n} messages ({name.replace('_', '-')} variants)")
        out[name] = corpuslib.generate(n)
        log(f"corpus: {json.dumps(corpuslib.describe(out[name]))}")
    return out


def measure(args, corpora) -> dict:
    """Set up, run every measurement, tear down; what was measured, even when a step failed."""
    bench = Bench(args)
    figures = {"raw": {v: [] for v in args.only}, "serial": {}, "memory": {}, "discarded": {}, "failed": None,
               "info": {}}
    try:
        bench.setup(args.only)
        log(f"stack up: {json.dumps(bench.stack.describe()['smtp'])}; milters: "
            + ", ".join(f"{n} pid {bench.processes.pid(n)}" for n in bench.processes.procs))
        msgs = corpora["spamd_bound"]
        payloads = [smtp_payload(m.data) for m in msgs]
        rounds(bench, args, {"spamd_bound": (msgs, payloads),
                             "fast": (corpora["fast"], [smtp_payload(m.data) for m in corpora["fast"]])},
               figures["raw"], figures["discarded"])
        one_session(bench, args, msgs, figures["serial"])
        if not args.no_memory:
            figures["memory"] = bench.memory_run(msgs, payloads)
        figures["info"] = {"versions": report.versions(bench.stack)}
    except (Exception, KeyboardInterrupt, BenchTimeout) as e:
        figures["failed"] = f"{type(e).__name__}: {e}"
        log(f"FAILED: {figures['failed']}")
    finally:
        # a second Ctrl-C or SIGTERM must not interrupt the clean-up (it is bounded: ~20 s at most)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.alarm(0)
        log("stopping everything the benchmark started")
        for e in bench.teardown():
            log(f"clean-up problem: {e}")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return figures


def main(argv=None):
    args = parse_args(argv)
    command = command_line(argv)
    time_budget(args.max_minutes)
    t_start, started = time.monotonic(), datetime.datetime.now(datetime.timezone.utc)
    corpora = make_corpora(args)
    figures = measure(args, corpora)
    result = report.result(args, command, started, round((time.monotonic() - t_start) / 60, 1),
                           {k: corpuslib.describe(m) for k, m in corpora.items() if m}, figures)
    report.show(result)
    path = report.save(result, args.results, started)
    print(f"\nresults: {path}  ({result['minutes']} minutes)")
    if result["failed"]:
        print(f"benchmark FAILED: {result['failed']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
