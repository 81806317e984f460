"""The benchmark's code (bench/) without a benchmark run (`make bench` takes half an hour): its parts
import and its command line parses; variants 5 and 11 drive clamd and spamd or rspamd through
scanmilter's own engine clients and judge their answers as scanmilter's defaults do; it has no
scanner protocol of its own; the report prints every ratio and target, the failover run's figures
among them."""
import argparse
import inspect
import json
import subprocess
import sys
import tempfile
import types

import pytest

import stack as stacklib
from conftest import ROOT
from fakes import Server
from test_rspamd import FakeRspamd, http

sys.path.insert(0, str(ROOT / "bench"))
import client  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
import variants  # noqa: E402

BENCH = ROOT / "bench"


def test_the_parts_import_and_main_is_short():
    for name in ("client", "corpus", "report", "variants"):
        assert (BENCH / f"{name}.py").is_file(), name
    assert len(inspect.getsource(run.main).splitlines()) <= 25
    args = run.parse_args(["--quick", "--only", "3,5,9"])
    assert (args.messages, args.runs, args.only) == (100, 1, ["3", "5", "9"])


def test_only_knows_every_variant_and_ranges():
    assert run.parse_args([]).only == [str(n) for n in range(1, 16)]
    assert run.parse_args(["--only", "12,3, 9-11,3"]).only == ["12", "3", "9", "10", "11"]
    for bad in ("16", "3x", "0", ","):
        with pytest.raises(SystemExit):
            run.parse_args(["--only", bad])


def test_new_variants_are_classified():
    assert set(variants.VARIANTS) == {str(n) for n in range(1, 16)}
    assert {"12", "13", "15"} <= set(variants.SPAMD_BOUND) and not {"9", "10", "11", "14"} & set(variants.SPAMD_BOUND)
    spam = types.SimpleNamespace(spam_or_virus=True, kind="spam")
    virus = types.SimpleNamespace(spam_or_virus=True, kind="virus")
    ham = types.SimpleNamespace(spam_or_virus=False, kind="ham")
    # rspamd's own milter rejects with 554, every other scanning variant with 550
    codes = [variants.expected_code(spam, v) for v in ("9", "10", "11", "12", "13", "15", "2", "14")]
    assert codes == [554, 550, 550, 550, 550, 550, 250, 250]
    # the attachment checks alone refuse the corpus's viruses by their executable name, nothing else
    assert [variants.expected_code(virus, v) for v in ("14", "2", "3")] == [554, 250, 550]
    assert {variants.expected_code(ham, v) for v in variants.VARIANTS} == {250}
    assert variants.pool_children(4) == 2 and variants.pool_children(1) == 1


def test_the_command_line_help():
    out = subprocess.run([sys.executable, str(BENCH / "run.py"), "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "--quick" in out.stdout and "clamav-milter" in out.stdout, out.stderr


def test_no_scanner_protocol_of_its_own():
    """clamd's INSTREAM framing and spamd's SPAMC live in scanmilter.scanners only."""
    for path in BENCH.glob("*.py"):
        text = path.read_text()
        assert "zINSTREAM" not in text and "struct" not in text and "SPAMC/1" not in text, path.name


def spamd_says(score):
    def behave(server, conn):
        server.read_all(conn)                # up to the client's end of the request
        body = b"RULE_A"
        conn.sendall(b"SPAMD/1.1 0 EX_OK\r\nContent-length: %d\r\nSpam: %s ; %.1f / 5.0\r\n\r\n%s"
                     % (len(body), b"True" if score >= 5 else b"False", score, body))
        conn.close()
    return behave


def clamd_says(reply):
    def behave(server, conn):
        server.read_all(conn, until=lambda data: data.endswith(b"\0\0\0\0"))   # the stream's last chunk
        conn.sendall(reply)
        conn.close()
    return behave


@pytest.mark.parametrize("clamd_reply, score, code", [
    (b"stream: OK\0", 1.0, 250),
    (b"stream: Eicar-Test-Signature FOUND\0", 1.0, 550),
    (b"stream: OK\0", client.REJECT_LEVEL, 550),                 # scanmilter's default reject_level
    (b"stream: OK\0", client.REJECT_LEVEL - 0.1, 250),
], ids=["clean", "virus", "spam", "tagged"])
def test_direct_scan_judges_like_scanmilter(clamd_reply, score, code):
    work = tempfile.mkdtemp(prefix="scanmilter-bench-test-")
    stand_in = types.SimpleNamespace(clamd_socket=f"{work}/clamd.sock", spamd_port=stacklib.free_port())
    clamd = Server(clamd_says(clamd_reply), unix_path=stand_in.clamd_socket)
    spamd = Server(spamd_says(score), port=stand_in.spamd_port)
    try:
        result = client.DirectScan(stand_in)(b"Subject: hi\r\n\r\nhello\r\n")
    finally:
        clamd.close()
        spamd.close()
    assert result["code"] == code, result
    # both engines got the message, with the Received line the benchmark puts in front
    assert [b"Subject: hi\r\n\r\nhello\r\n" in data and b"Received: from mail.outside.test" in data
            for data in clamd.received + spamd.received] == [True, True]


def test_direct_scan_counts_an_engine_error_as_a_failed_message():
    work = tempfile.mkdtemp(prefix="scanmilter-bench-test-")
    stand_in = types.SimpleNamespace(clamd_socket=f"{work}/clamd.sock", spamd_port=stacklib.free_port())
    clamd = Server(clamd_says(b"what?\0"), unix_path=stand_in.clamd_socket)
    spamd = Server(spamd_says(1.0), port=stand_in.spamd_port)
    try:
        with pytest.raises(ConnectionError, match="clamd: protocol"):
            client.DirectScan(stand_in)(b"Subject: hi\r\n\r\nhello\r\n")
    finally:
        clamd.close()
        spamd.close()


@pytest.mark.parametrize("clamd_reply, score, code", [
    (b"stream: OK\0", 1.0, 250),
    (b"stream: Eicar-Test-Signature FOUND\0", 1.0, 550),
    (b"stream: OK\0", client.REJECT_LEVEL, 550),
    (b"stream: OK\0", client.REJECT_LEVEL - 0.1, 250),
], ids=["clean", "virus", "spam", "tagged"])
def test_direct_scan_with_rspamd_tells_it_what_scanmilter_does(tmp_path, clamd_reply, score, code):
    """Variant 11: rspamd's /checkv2 through scanmilter's client, told the client, HELO, envelope
    and direction (Settings-ID: inbound, which keeps rspamd's own antivirus module out)."""
    reply = json.dumps({"is_skipped": False, "score": score, "required_score": 15.0, "action": "no action",
                        "symbols": {"MIME_TRACE": {"name": "MIME_TRACE", "score": 0.0}}}).encode()
    rspamd = FakeRspamd(tmp_path, lambda head, body: http(200, reply))
    stand_in = types.SimpleNamespace(clamd_socket=tmp_path / "clamd.sock", spamd_port=stacklib.free_port(),
                                     rspamd_socket=tmp_path / "rspamd.sock")
    clamd = Server(clamd_says(clamd_reply), unix_path=stand_in.clamd_socket)
    try:
        result = client.DirectScan(stand_in, "rspamd")(b"Subject: hi\r\n\r\nhello\r\n", "carol@outside.test")
    finally:
        clamd.close()
        rspamd.close()
    assert result["code"] == code, result
    [(head, body)] = rspamd.requests
    assert head.startswith(b"POST /checkv2 ") and body.endswith(b"Subject: hi\r\n\r\nhello\r\n"), head
    for line in (b"Settings-ID: inbound", b"IP: 203.0.113.25", b"From: <carol@outside.test>",
                 b"Rcpt: <bob@example.com>", b"Helo: client.bench.test"):
        assert line in head.split(b"\r\n"), (line, head)
    assert b"Received: from mail.outside.test" in clamd.received[0]


def test_failover_splits_the_run_at_the_kill():
    fo = variants.Failover(stack=None, victim="spamd-3", after=3)
    killed = []
    fo.kill = lambda: killed.append(fo.done)

    def send(i):
        if i == 1:
            raise ConnectionError("a failed message counts as a reply too")
        return {"code": 250}
    send = fo.wrap(send)
    for i in range(6):
        try:
            send(i)
        except ConnectionError:
            pass
    assert killed == [3]
    fo.t_start, fo.t_kill, fo.t_end = 100.0, 110.0, 130.0
    f = fo.figures(6)
    assert (f["before_msgs_per_s"], f["after_msgs_per_s"], f["after_replies"]) == (0.3, 0.15, 3)


def fake_run(rate, codes=None, failover=None, rspamd=0.004):
    n = 100
    codes = codes or {"250": n}
    run_ = {"messages": n, "seconds": n / rate, "msgs_per_s": rate, "codes": codes, "unexpected": 0,
            "unexpected_examples": [], "other_cpu_share": 0.01, "disturbed": False,
            "tempfails": sum(v for k, v in codes.items() if k.startswith("4")),
            "cpu_s": {"postfix": 0.3, "clamd": 0.1, "sink": 0.0, "spamd": 0.0, "rspamd": rspamd * n,
                      "milter": 0.2, "client": 0.05},
            "rss": {}, "latencies": [("ham", 0.02, 0.01)] * n}
    if failover:
        run_["failover"] = failover
    return run_


def test_the_report_prints_the_new_ratios_targets_and_failover(capsys):
    args = argparse.Namespace(messages=100, fast_repeat=6, sessions=8, runs=1, spamd_children=4, disturbed_share=0.1,
                              retries=1, failover_runs=1, rspamd_workers=2)
    failover = {"killed": "spamd-3", "after_replies": 50, "before_msgs_per_s": 7.0, "after_msgs_per_s": 6.5,
                "failovers": 5.0}
    raw = {"3": [fake_run(7.0)], "9": [fake_run(240.0)], "10": [fake_run(160.0)], "11": [fake_run(170.0)],
           "12": [fake_run(6.9)], "13": [fake_run(6.8, {"250": 98, "451": 2}, failover)]}
    figures = {"raw": raw, "serial": {}, "memory": {}, "discarded": {}, "failed": None, "info": {}}
    result = report.result(args, "bench", __import__("datetime").datetime.now(), 1.0, {}, figures)
    report.show(result)
    out = capsys.readouterr().out
    assert {"10/9", "10/11", "12/3"} <= set(result["ratios"])
    for line in ("MISSED throughput 10/9 >= 1: 0.667x", "MET    throughput 10/11 >= 0.9: 0.941x",
                 "MET    throughput 12/3 >= 0.95: 0.986x", "MISSED 13 (one spamd of the pool killed) tempfails == 0: 2",
                 "failover: spamd-3 killed (SIGKILL) after 50 of 100 replies: 7.0 msgs/s before, 6.5 after; "
                 "scans moved to the other spamd 5; tempfails 2, unexpected 0"):
        assert line in out, (line, out)
    head, rule, *rows = report.table(result["variants"]).splitlines()
    assert "rspamd" in head.split() and [r.split()[0] for r in rows] == ["3", "9", "10", "11", "12", "13"]
    end = head.index(" rspamd ") + len(" rspamd")          # the column is right-aligned under its name
    assert rows[1][end - 6:end].strip() == "4.00"             # variant 9: rspamd's CPU ms per message
    assert result["variants"]["13_scanmilter_spamd_failover"]["failover"]["tempfails"] == 2
