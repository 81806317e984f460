"""Every Prometheus metric scanmilter exports, defined here and nowhere else.

Base units (seconds, bytes), `_total` counters, the `scanmilter_` prefix. Labels come only from
small closed sets (direction, action, reason, engine, outcome, error kind, callback, and the
member of an engine's pool, named by its address as configured): never a client's addresses,
subjects or virus names. Pass a private registry in tests.
"""
from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import CounterMetricFamily

from . import __version__

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
SCORE_BUCKETS = (-5, 0, 1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50, 100)
SIZE_BUCKETS = (1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)


class QuarantineActions:
    """Releases, deletions, purges and learning of held entries. The quarantine command does them in its
    own process and counts them in the store's index; the daemon reads the tallies between
    messages and exports them here as counters."""

    def __init__(self, registry: CollectorRegistry):
        self.counts: dict[str, int] = {}
        registry.register(self)

    def set(self, counts: dict[str, int]) -> None:
        self.counts = dict(counts)

    def collect(self):
        family = CounterMetricFamily("scanmilter_quarantine_actions",
                                     "What the quarantine command did to held entries: "
                                     "release, delete, purge, learn_ham, learn_spam", labels=["action"])
        for action, count in sorted(self.counts.items()):
            family.add_metric([action], count)
        yield family


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self.messages = Counter("scanmilter_messages_total", "Messages by direction and final action",
                                ["direction", "action"], registry=r)
        self.recipients = Counter("scanmilter_recipients_total", "Recipients by the action for their copy",
                                  ["action"], registry=r)
        self.reasons = Counter("scanmilter_decisions_total", "Messages by the reason of the decision",
                               ["reason"], registry=r)
        self.scan_seconds = Histogram("scanmilter_scan_duration_seconds", "Time one engine took for one message",
                                      ["engine"], buckets=LATENCY_BUCKETS, registry=r)
        self.decision_seconds = Histogram("scanmilter_decision_duration_seconds",
                                          "End of message to the answer to Postfix", buckets=LATENCY_BUCKETS,
                                          registry=r)
        self.scans = Counter("scanmilter_scans_total", "Scan results by engine and outcome",
                             ["engine", "outcome"], registry=r)
        self.scan_cache_hits = Counter("scanmilter_scan_cache_hits_total",
                                       "Scan results taken from the cache of recently scanned messages",
                                       ["engine"], registry=r)
        self.scan_errors = Counter("scanmilter_scan_errors_total", "Failed scans by engine and kind",
                                   ["engine", "kind"], registry=r)
        self.engine_up = Gauge("scanmilter_engine_up", "1 when the engine answered its latest scan or check",
                               ["engine"], registry=r)
        self.engine_last_success = Gauge("scanmilter_engine_last_success_timestamp_seconds",
                                         "When the engine last answered", ["engine"], registry=r)
        self.spam_score = Histogram("scanmilter_spam_score", "spamd scores by direction", ["direction"],
                                    buckets=SCORE_BUCKETS, registry=r)
        self.message_size = Histogram("scanmilter_message_size_bytes", "Sizes of messages seen",
                                      buckets=SIZE_BUCKETS, registry=r)
        self.connections_in_flight = Gauge("scanmilter_connections_in_flight", "Open milter sessions", registry=r)
        self.messages_in_flight = Gauge("scanmilter_messages_in_flight", "Transactions in progress", registry=r)
        self.scans_in_flight = Gauge("scanmilter_scans_in_flight",
                                     "Engine scans running, also those a message stopped waiting for",
                                     ["engine"], registry=r)
        self.callback_exceptions = Counter("scanmilter_callback_exceptions_total",
                                           "Bugs caught at the milter callback boundary", ["callback"], registry=r)
        self.quarantine_entries = Gauge("scanmilter_quarantine_entries", "Entries held, by reason", ["reason"],
                                        registry=r)
        self.quarantine_bytes = Gauge("scanmilter_quarantine_bytes", "Bytes held, by reason", ["reason"], registry=r)
        self.quarantine_oldest = Gauge("scanmilter_quarantine_oldest_entry_age_seconds",
                                       "Age of the oldest held entry", registry=r)
        self.quarantine_released = Gauge("scanmilter_quarantine_released_entries",
                                         "Held entries that were released at least once", registry=r)
        self.quarantine_stored = Counter("scanmilter_quarantine_stored_total", "Entries written, by reason",
                                         ["reason"], registry=r)
        self.quarantine_actions = QuarantineActions(r)
        self.quarantine_failures = Counter("scanmilter_quarantine_store_failures_total",
                                           "Writes to the quarantine that failed (the message was tempfailed)",
                                           registry=r)
        self.quarantine_index_failures = Counter("scanmilter_quarantine_index_failures_total",
                                                 "Held entries the quarantine index missed (safe on disk; "
                                                 "the index is rebuilt at the next check)", registry=r)
        self.clamav_db_version = Gauge("scanmilter_clamav_database_version",
                                       "ClamAV signature database version (clamd VERSION)", registry=r)
        self.clamav_db_time = Gauge("scanmilter_clamav_database_timestamp_seconds",
                                    "When the loaded ClamAV database was built", registry=r)
        self.reloads = Counter("scanmilter_config_reloads_total", "Reloads by result", ["result"], registry=r)
        self.breaker_open = Gauge("scanmilter_engine_circuit_open",
                                  "1 while scans of a failing engine are skipped without trying", ["engine"],
                                  registry=r)
        # the servers of each engine (one unless its socket setting lists several: a pool)
        self.member_scans = Counter("scanmilter_member_scans_total",
                                    "Scan attempts by engine, pool member and outcome",
                                    ["engine", "member", "outcome"], registry=r)
        self.member_scan_errors = Counter("scanmilter_member_scan_errors_total",
                                          "Failed scan attempts by engine, pool member and kind",
                                          ["engine", "member", "kind"], registry=r)
        self.member_scan_seconds = Histogram("scanmilter_member_scan_duration_seconds",
                                             "Time one pool member took for one message",
                                             ["engine", "member"], buckets=LATENCY_BUCKETS, registry=r)
        self.member_up = Gauge("scanmilter_member_up", "1 when the pool member answered its latest scan or check",
                               ["engine", "member"], registry=r)
        self.member_circuit_open = Gauge("scanmilter_member_circuit_open",
                                         "1 while a failing pool member is left out of the rotation",
                                         ["engine", "member"], registry=r)
        self.member_failovers = Counter("scanmilter_member_failovers_total",
                                        "Scans moved on to another pool member after one failed", ["engine"],
                                        registry=r)
        # shared lists (sharedlists.py): the age is computed when scraped, so it rises while the
        # database is unreachable even though nothing else happens
        self.shared_lists_age = Gauge("scanmilter_shared_lists_age_seconds",
                                      "Seconds since the shared lists in force were last found current in the "
                                      "database; +Inf before the first read; 0 with shared_lists off", registry=r)
        self.shared_lists_refresh_failures = Counter("scanmilter_shared_lists_refresh_failures_total",
                                                     "Refreshes of the shared lists that failed or were refused "
                                                     "(the last good copy stayed in force)", registry=r)
        # quarantine_backend = "postgresql": the shared database and this host's local fallback store
        self.quarantine_backend_up = Gauge("scanmilter_quarantine_backend_up",
                                           "1 when the quarantine database answered the latest check with the "
                                           "schema this scanmilter needs", ["backend"], registry=r)
        self.quarantine_backend_seconds = Histogram("scanmilter_quarantine_backend_duration_seconds",
                                                    "Time the quarantine database took, by operation (probe: the "
                                                    "periodic check; put: holding a message)", ["operation"],
                                                    buckets=LATENCY_BUCKETS, registry=r)
        self.quarantine_fallback_entries = Gauge("scanmilter_quarantine_fallback_entries",
                                                 "Held messages in this host's local fallback store, waiting to "
                                                 "be moved into the database", registry=r)
        self.quarantine_fallback_stored = Counter("scanmilter_quarantine_fallback_stored_total",
                                                  "Held messages kept in the local fallback store because the "
                                                  "database did not take them", registry=r)
        self.quarantine_fallback_moved = Counter("scanmilter_quarantine_fallback_moved_total",
                                                 "Entries this daemon moved from the local fallback store into "
                                                 "the database", registry=r)
        # webhooks (webhooks.py): `webhook` is a [[webhook]] table's name, or its position (0, 1, ...)
        self.webhook_sent = Counter("scanmilter_webhook_sent_total", "Events a webhook's receiver accepted (2xx)",
                                    ["webhook"], registry=r)
        self.webhook_failed = Counter("scanmilter_webhook_failed_total",
                                      "Events given up for a webhook: refused, or not accepted by webhook_deadline",
                                      ["webhook"], registry=r)
        self.webhook_retries = Counter("scanmilter_webhook_retries_total",
                                       "Deliveries to a webhook put back for a retry after a failed attempt",
                                       ["webhook"], registry=r)
        self.webhook_dropped = Counter("scanmilter_webhook_dropped_total",
                                       "Events never sent: the queue was full (queue_full), or still waiting when "
                                       "the process stopped (exit)", ["reason"], registry=r)
        # the attachment checks: `rule` is a [files] rule's name from the policy file (a closed set
        # per configuration), `kind` one of malformed, limit, encrypted, unreadable
        self.file_rule_hits = Counter("scanmilter_file_rule_hits_total",
                                      "Messages in which a [files] rule matched an attachment, by rule and the "
                                      "action it had", ["rule", "action"], registry=r)
        self.attachment_problems = Counter("scanmilter_attachment_problems_total",
                                           "Messages whose attachment checks met a problem, by kind", ["kind"],
                                           registry=r)
        Info("scanmilter_build", "scanmilter build information", registry=r).info(
            {"version": __version__, "python": platform.python_version()})

    def serve(self, address: str) -> None:
        """Expose /metrics on HOST:PORT (127.0.0.1 unless the operator says otherwise)."""
        host, _, port = address.rpartition(":")
        start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=self.registry)

    def names(self) -> set[str]:
        """Every series name this registry can export, observed yet or not (for the dashboard check)."""
        suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
                    "info": ("_info",)}
        return {fam.name + suffix for fam in self.registry.collect() for suffix in suffixes.get(fam.type, ("",))}
