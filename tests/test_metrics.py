"""Metric names and labels follow Prometheus conventions; the dashboard asks only for what exists."""
import json
import platform
import re

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from conftest import ROOT
from scanmilter import __version__
from scanmilter.metrics import Metrics

ALLOWED_LABELS = {"direction", "action", "reason", "engine", "outcome", "kind", "callback", "result", "le",
                  "version", "python"}
PROCESS_METRICS = {"process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"}


def test_names_units_and_labels():
    m = Metrics(CollectorRegistry())
    for fam in m.registry.collect():
        assert fam.name.startswith("scanmilter_"), fam.name
        if fam.type == "counter":
            assert not fam.name.endswith("_total")       # the client appends _total to the samples
        assert not re.search(r"_(ms|milliseconds|kb|mb)$", fam.name)
    labelled = [m.messages.labels("inbound", "accept"), m.scans.labels("clamd", "clean"),
                m.scan_errors.labels("spamd", "timeout"), m.recipients.labels("reject")]
    for child in labelled:
        child.inc()
    for fam in m.registry.collect():
        for sample in fam.samples:
            assert set(sample.labels) <= ALLOWED_LABELS, (sample.name, sample.labels)


def test_quarantine_actions_are_counters_from_the_store_tallies():
    m = Metrics(CollectorRegistry())
    m.quarantine_actions.set({"release": 2, "delete": 1, "purge": 0})
    text = generate_latest(m.registry).decode()
    assert "# TYPE scanmilter_quarantine_actions_total counter" in text
    assert 'scanmilter_quarantine_actions_total{action="release"} 2.0' in text
    assert 'scanmilter_quarantine_actions_total{action="purge"} 0.0' in text


def test_private_registries_do_not_collide():
    a, b = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())    # a second instance is fine
    a.messages.labels("inbound", "accept").inc(3)
    accepted = ("scanmilter_messages_total", {"direction": "inbound", "action": "accept"})
    assert a.registry.get_sample_value(*accepted) == 3
    assert b.registry.get_sample_value(*accepted) is None                # counted in `a` only
    assert a.names() == b.names() and "scanmilter_messages_total" in a.names()
    # without a registry each instance still gets its own, never the process-wide default
    c, d = Metrics(), Metrics()
    assert c.registry is not d.registry and REGISTRY not in (c.registry, d.registry)
    assert REGISTRY.get_sample_value("scanmilter_build_info", {"version": __version__,
                                                               "python": platform.python_version()}) is None


def test_every_dashboard_query_names_exported_metrics():
    exported = Metrics(CollectorRegistry()).names() | PROCESS_METRICS
    dash = json.loads((ROOT / "dashboards" / "scanmilter.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    assert len(exprs) >= 15
    used = {name for e in exprs for name in re.findall(r"\b(?:scanmilter|process)_[a-z_]+", e)}
    assert used and used <= exported, used - exported
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("action", "latency", "failure", "quarantine", "health"):
        assert topic in titles


def test_docs_list_every_metric():
    """docs/metrics.md has one row per exported metric, with its type and help text, and no other."""
    from conftest import ROOT
    doc = (ROOT / "docs" / "metrics.md").read_text()
    rows = re.findall(r"^\| `((?:scanmilter|process)_\w+)` \| (\w+) \| [^|]* \| ([^|]*) \|$", doc, re.M)
    listed = {name: (kind, meaning.strip()) for name, kind, meaning in rows}
    assert len(listed) == len(rows)                                   # no metric twice
    exported = {}
    for fam in Metrics(CollectorRegistry()).registry.collect():
        exported[fam.name + {"counter": "_total", "info": "_info"}.get(fam.type, "")] = (fam.type, fam.documentation)
    assert listed == exported
