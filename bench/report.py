"""The benchmark's report: each variant's runs summed up, the ratios between variants, the targets
met or missed, the versions and the machine; printed as a table and written as JSON.

Needs tools/ and milter/ on sys.path (bench/run.py puts them there).
"""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
from pathlib import Path

import procs
import scanmilter
from client import OUTSIDE_ADDR
from variants import POOL, REPO, VARIANTS, WARMUP, pool_children

RATIOS = [("2/1", "scanmilter without engines vs bare Postfix"),
          ("2/6", "scanmilter without engines vs trivial pymilter milter (same unix socket)"),
          ("3/4", "scanmilter vs clamav-milter + spamass-milter"),
          ("3/5", "scanmilter vs clamd + spamd driven directly"),
          ("7/8", "scanmilter without engines vs trivial pymilter milter (same TCP socket)"),
          ("10/9", "scanmilter + rspamd vs rspamd's own milter"),
          ("10/11", "scanmilter + rspamd vs clamd + rspamd driven directly"),
          ("12/3", "scanmilter with a pool of two spamd vs one spamd, same children in all"),
          ("14/2", "scanmilter with the attachment checks only vs scanmilter with nothing"),
          ("3/15", "scanmilter + clamd + spamd with the attachment checks vs without them")]
# (ratio, target): met when the ratio is at least the target
RATIO_TARGETS = [("3/4", 1.0), ("3/5", 0.95), ("2/6", 0.9), ("7/8", 0.9), ("10/9", 1.0), ("10/11", 0.9),
                 ("12/3", 0.95), ("3/15", 0.97)]
TCP_P50_LIMIT_MS = 10.0             # variant 7's p50: no per-message TCP stall


def summarize(variant, runs) -> dict:
    """The figures of a variant's runs, as the JSON report has them."""
    lat = [x[1] for r in runs for x in r["latencies"] if x[1] is not None]
    dlat = [x[2] for r in runs for x in r["latencies"] if x[2] is not None]
    ham = [x[1] for r in runs for x in r["latencies"] if x[1] is not None and x[0] == "ham"]
    total = sum(r["messages"] for r in runs)
    rates = [r["msgs_per_s"] for r in runs]
    cpu = {}
    for k in runs[0]["cpu_s"]:
        vals = [r["cpu_s"][k] for r in runs]
        cpu[k] = None if any(v is None for v in vals) else sum(vals) / total
    rss = {name: max(r["rss"][name]["hwm_kib"] for r in runs) / 1024 for name in runs[0]["rss"]}
    key, label = VARIANTS[variant]
    return {"label": label, "messages_per_run": runs[0]["messages"], "runs": len(runs),
            "msgs_per_s": {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
                           "each": rates},
            "latency_ms_each_run": [{"p50": pct([x[1] for x in r["latencies"] if x[1] is not None], 50),
                                     "p99": pct([x[1] for x in r["latencies"] if x[1] is not None], 99)}
                                    for r in runs],
            "latency_ms": {"p50": pct(lat, 50), "p99": pct(lat, 99), "max": max(lat) * 1000 if lat else None,
                           "p50_ham": pct(ham, 50), "p99_ham": pct(ham, 99),
                           "p50_data": pct(dlat, 50), "p99_data": pct(dlat, 99)},
            "cpu_s_per_msg": cpu,
            "cpu_s_per_msg_each_run": [{k: None if v is None else v / r["messages"] for k, v in r["cpu_s"].items()}
                                       for r in runs],
            "peak_rss_mib": rss or None,
            "peak_rss_mib_total": sum(rss.values()) if rss else None,
            "codes": [r["codes"] for r in runs],
            "tempfails": sum(r["tempfails"] for r in runs),
            **({"failover": failover_summary(runs)} if "failover" in runs[0] else {}),
            "other_cpu_share_max": max(r["other_cpu_share"] for r in runs),
            "disturbed_runs": sum(r["disturbed"] for r in runs),
            "unexpected": sum(r["unexpected"] for r in runs),
            "unexpected_examples": [e for r in runs for e in r["unexpected_examples"]][:5]}


def failover_summary(runs) -> dict:
    """Variant 13: what the kill did, over its runs (the medians of the two rates)."""
    each = [r["failover"] for r in runs]
    rates = lambda k: [f[k] for f in each if f[k] is not None]   # noqa: E731
    return {"killed": each[0]["killed"], "after_replies": each[0]["after_replies"],
            "tempfails": sum(r["tempfails"] for r in runs), "failovers": sum(f["failovers"] for f in each),
            "before_msgs_per_s": statistics.median(rates("before_msgs_per_s")) if rates("before_msgs_per_s") else None,
            "after_msgs_per_s": statistics.median(rates("after_msgs_per_s")) if rates("after_msgs_per_s") else None,
            "each": each}



def pct(values, p):
    """The p-th percentile of seconds, in milliseconds (None for no values)."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return (v[lo] + (v[hi] - v[lo]) * (k - lo)) * 1000


def fmt(v, spec=".1f", none="-"):
    return none if v is None else format(v, spec)


def table(summary) -> str:
    head = (f"{'variant':38} {'msgs/s median (min-max)':>25} {'p50 ms':>7} {'p99 ms':>7} "
            f"{'1-session p50':>13} {'milter CPU ms/msg':>17} {'postfix':>7} {'clamd':>6} {'spamd':>6} {'rspamd':>6} "
            f"{'client':>6} {'peak RSS MiB':>12} {'other%':>6} {'unexp':>5}")
    lines = [head, "-" * len(head)]
    for v, (key, label) in VARIANTS.items():
        s = summary.get(key)
        if not s:
            continue
        r, lat, cpu = s["msgs_per_s"], s["latency_ms"], s["cpu_s_per_msg"]
        ms = lambda k: fmt(cpu[k] * 1000 if cpu.get(k) is not None else None, ".2f")  # noqa: E731
        rate = f"{r['median']:.1f} ({r['min']:.1f}-{r['max']:.1f})"
        one = s.get("latency_ms_one_session", {}).get("p50")
        lines.append(f"{v:>2} {label:35} {rate:>25} {fmt(lat['p50']):>7} {fmt(lat['p99']):>7} {fmt(one):>13} "
                     f"{ms('milter'):>17} "
                     f"{ms('postfix'):>7} {ms('clamd'):>6} {ms('spamd'):>6} {ms('rspamd'):>6} {ms('client'):>6} "
                     f"{fmt(s['peak_rss_mib_total']):>12} {100 * s['other_cpu_share_max']:>6.1f} {s['unexpected']:>5}")
    return "\n".join(lines)


def ratios(summary) -> dict:
    out = {}
    for name, desc in RATIOS:
        a, b = name.split("/")
        sa, sb = summary.get(VARIANTS[a][0]), summary.get(VARIANTS[b][0])
        if sa and sb:
            out[name] = {"value": sa["msgs_per_s"]["median"] / sb["msgs_per_s"]["median"], "meaning": desc}
    return out


def attachment_cost(summary) -> dict | None:
    """What the attachment checks cost per message: 14 (checks only) against 2 (scanmilter alone),
    in scanmilter's CPU and in time per message at full concurrency."""
    s14, s2 = summary.get(VARIANTS["14"][0]), summary.get(VARIANTS["2"][0])
    if not (s14 and s2):
        return None
    cpu14, cpu2 = s14["cpu_s_per_msg"].get("milter"), s2["cpu_s_per_msg"].get("milter")
    return {"milter_cpu_ms": None if cpu14 is None or cpu2 is None else (cpu14 - cpu2) * 1000,
            "wall_ms": 1000 / s14["msgs_per_s"]["median"] - 1000 / s2["msgs_per_s"]["median"]}


def targets(summary, rat, memory) -> list:
    out = []

    def add(name, value, limit, ok, unit=""):
        out.append({"target": name, "value": value, "limit": limit, "met": ok, "unit": unit})
    for name, limit in RATIO_TARGETS:
        if name in rat:
            add(f"throughput {name} >= {limit:g}", rat[name]["value"], limit, rat[name]["value"] >= limit, "x")
    s13 = summary.get(VARIANTS["13"][0])
    if s13:
        add("13 (one spamd of the pool killed) tempfails == 0", s13["tempfails"], 0, s13["tempfails"] == 0, "")
    s7 = summary.get(VARIANTS["7"][0], {}).get("latency_ms_one_session")
    if s7:
        add(f"p50 latency 7 (TCP, one session) < {TCP_P50_LIMIT_MS:.0f} ms", s7["p50"], TCP_P50_LIMIT_MS,
            s7["p50"] < TCP_P50_LIMIT_MS, "ms")
    s3, s4 = summary.get(VARIANTS["3"][0]), summary.get(VARIANTS["4"][0])
    if s3 and s4:
        add("p50 latency 3 <= p50 latency 4", s3["latency_ms"]["p50"], s4["latency_ms"]["p50"],
            s3["latency_ms"]["p50"] <= s4["latency_ms"]["p50"], "ms")
    if s3:
        add("p99 latency 3 <= 1.5 x its p50", s3["latency_ms"]["p99"], 1.5 * s3["latency_ms"]["p50"],
            s3["latency_ms"]["p99"] <= 1.5 * s3["latency_ms"]["p50"], "ms")
    if memory.get("big_message"):
        g = memory["big_message"]["growth_mib"]
        add("RSS growth for a 50 MB message <= 10 MiB", g, 10.0, g <= 10.0, "MiB")
    if memory.get("concurrent_sessions"):
        c = memory["concurrent_sessions"]
        add(f"{c['sessions']} concurrent sessions: total RSS < 150 MiB", c["rss_peak_mib"], 150.0,
            c["rss_peak_mib"] < 150.0, "MiB")
    return out


def versions(stack) -> dict:
    def out(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except Exception:  # noqa: BLE001
            return None
    try:
        import Milter
        pym = Milter.__version__
    except Exception:  # noqa: BLE001
        pym = None
    dirty = out(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    return {"postfix": out([procs.binary("postconf"), "-c", str(stack.postfix_conf), "-h", "mail_version"]),
            "clamd": out([procs.binary("clamd"), "--version"]), "spamd": out([procs.binary("spamd"), "--version"]),
            "clamav-milter": out(["clamav-milter", "--version"]), "rspamd": out(["rspamd", "--version"]),
            "pymilter": pym, "python": platform.python_version(),
            "scanmilter": scanmilter.__version__,
            "git": (out(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]) or "?") + ("+dirty" if dirty else "")}


def machine() -> dict:
    osr = {}
    try:
        for ln in Path("/etc/os-release").read_text().splitlines():
            k, _, v = ln.partition("=")
            osr[k] = v.strip('"')
    except OSError:
        pass
    cpu = ""
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        pass
    return {"os": osr.get("PRETTY_NAME"), "cpus": os.cpu_count(), "cpu_model": cpu, "kernel": platform.release(),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


# ---------------------------------------------------------------- main


def warnings(summary, retries) -> list:
    out = []
    for key, sm in summary.items():
        if sm["unexpected"]:
            out.append(f"{key}: {sm['unexpected']} unexpected replies (e.g. {sm['unexpected_examples'][:1]}): "
                       "this variant did not do the whole job, its figures do not compare")
        if sm["disturbed_runs"]:
            out.append(f"{key}: {sm['disturbed_runs']} run(s) disturbed by other processes even after "
                       f"{retries} repetition(s) (up to {100 * sm['other_cpu_share_max']:.0f}% of the CPU)")
    return out


def result(args, command, started, minutes, corpus, figures) -> dict:
    """The whole report. figures: what run.measure() collected (raw runs, one-session latencies,
    the memory run, discarded runs, versions, the failure if any)."""
    summary = {VARIANTS[v][0]: summarize(v, runs) for v, runs in figures["raw"].items() if runs}
    for v, one_session in figures["serial"].items():
        if VARIANTS[v][0] in summary:
            summary[VARIANTS[v][0]]["latency_ms_one_session"] = one_session
    rat = ratios(summary)
    return {"date": started.strftime("%Y-%m-%dT%H:%M:%SZ"), "machine": machine(), "command": command,
            "minutes": minutes, "failed": figures["failed"],
            "settings": {"messages": args.messages, "fast_repeat": args.fast_repeat, "sessions": args.sessions,
                         "runs": args.runs, "spamd_children": args.spamd_children, "warmup": WARMUP,
                         "pool_spamd_children": [pool_children(args.spamd_children)] * len(POOL),
                         "failover_runs": min(args.failover_runs, args.runs), "rspamd_workers": args.rspamd_workers,
                         "disturbed_share": args.disturbed_share, "retries": args.retries,
                         "socket": "unix (variants 7, 8: TCP)", "client": "python thread pool, one message per SMTP session, XCLIENT "
                         f"ADDR={OUTSIDE_ADDR}"},
            "corpus": corpus, **figures["info"],
            "variants": summary, "ratios": rat, "targets": targets(summary, rat, figures["memory"]),
            "attachment_cost": attachment_cost(summary),
            "memory": figures["memory"], "discarded_disturbed_runs": figures["discarded"],
            "warnings": warnings(summary, args.retries)}


def show(result) -> None:
    print()
    print(table(result["variants"]))
    print()
    for name, r in result["ratios"].items():
        print(f"ratio {name} = {r['value']:.3f}   ({r['meaning']})")
    for s in result["variants"].values():
        f = s.get("failover")
        if f:
            print(f"failover: {f['killed']} killed (SIGKILL) after {f['after_replies']} of {s['messages_per_run']} "
                  f"replies: {fmt(f['before_msgs_per_s'])} msgs/s before, {fmt(f['after_msgs_per_s'])} after; "
                  f"scans moved to the other spamd {f['failovers']:.0f}; tempfails {f['tempfails']}, "
                  f"unexpected {s['unexpected']}")
    cost = attachment_cost(result["variants"])
    if cost:
        print(f"attachment checks: {fmt(cost['milter_cpu_ms'], '.2f')} ms of scanmilter's CPU per message "
              f"(14 - 2), {cost['wall_ms']:.2f} ms of time per message at {result['settings']['sessions']} sessions")
    memory = result["memory"]
    if memory:
        c = memory.get("concurrent_sessions")
        for b in (memory.get("big_message"), memory.get("scanned_message")):
            if b:
                print(f"memory: {b['bytes'] / 1e6:.0f} MB message -> {b['code']} in {b['seconds']:.1f}s; scanmilter "
                      f"RSS growth {b['growth_mib']:.1f} MiB ({b['rss_before_mib']:.1f} -> "
                      f"{b['rss_before_mib'] + b['growth_mib']:.1f})")
        if c:
            print(f"memory: {c['held_in_data']}/{c['sessions']} sessions held in DATA; scanmilter RSS "
                  f"{c['rss_before_mib']:.1f} -> {c['rss_peak_while_held_mib']:.1f} MiB while held, "
                  f"peak {c['rss_peak_mib']:.1f} MiB; codes {c['codes']}")
    print()
    for t in result["targets"]:
        v, lim = t["value"], t["limit"]
        spec = {"x": ".3f", "": ".0f"}.get(t["unit"], ".1f")
        print(f"{'MET   ' if t['met'] else 'MISSED'} {t['target']}: {v:{spec}}{t['unit']} "
              f"(limit {lim:{spec}}{t['unit']})")
    for w in result["warnings"]:
        print(f"WARNING {w}")


def save(result, directory, started) -> Path:
    """The report as DIRECTORY/<start time>.json."""
    out_dir = Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path
