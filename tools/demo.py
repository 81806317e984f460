"""`make demo`: start the private stack on 127.0.0.1:2525 and push four sample messages through it:
one delivered, two rejected, one held in the demo's quarantine for the review commands."""
import argparse
import email.policy
import email.utils
import os
import re
import shutil
import subprocess
import sys
from email.message import EmailMessage
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import stack as stacklib  # noqa: E402
from scanmilter.scanners.spamd import GTUBE  # noqa: E402  (stack.py puts milter/ on sys.path)
OUTSIDE = "203.0.113.7"
# The demo's policy: spam from 6 up is held (the shipped default holds nothing). The stack's spamd
# has a local rule, SCANMILTER_TAG_TEST, that scores 8.0 for "scanmilter-tag-test" in the Subject:
# with the points spamd gives the demo's client, that lies between 6 and reject_level (15).
POLICY = """\
[inbound]
quarantine_level = 6.0
"""


def sample(subject: str, body: str, attachment: bytes | None = None) -> bytes:
    m = EmailMessage()
    m["From"] = "Alice <alice@outside.test>"
    m["To"] = "bob@example.com"
    m["Subject"] = subject
    m["Date"] = email.utils.formatdate()
    m["Message-ID"] = email.utils.make_msgid(domain="outside.test")
    m.set_content(body)
    if attachment:
        m.add_attachment(attachment, maintype="application", subtype="octet-stream", filename="eicar.com")
    return m.as_bytes(policy=email.policy.SMTP)


def short(path: Path) -> str:
    """`path` as the user can type it from here: relative when it lies below the current directory."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=".demo")
    ap.add_argument("--smtp-port", type=int, default=2525)
    ap.add_argument("--metrics-port", type=int, default=9925)
    args = ap.parse_args()
    root = Path(args.dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)     # postfix and debian-spamd must be able to enter it
    metrics = f"127.0.0.1:{args.metrics_port}"
    st = stacklib.Stack(root, smtp_port=args.smtp_port, policy_text=POLICY,
                        scanmilter_settings={"metrics_address": metrics,
                                             "quarantine_directory": str(root / "quarantine")})
    conf = short(st.milter_config)
    print(f"starting Postfix, scanmilter, clamd and spamd under {short(root)} ...", flush=True)
    st.stop()                   # a demo left running here
    shutil.rmtree(root / "quarantine", ignore_errors=True)     # a fresh start, like the stack's queue and sink
    st.start()
    print(f"up in {st.startup_seconds:.1f} s: Postfix on 127.0.0.1:{args.smtp_port} -> scanmilter "
          f"(unix:{short(st.milter_socket)}) -> clamd + spamd; delivered mail in {short(st.delivered_dir)}/\n")
    cases = [
        ("a clean message", sample("Lunch on Friday?", "Hi Bob,\nlunch on Friday at noon?\nAlice\n")),
        ("GTUBE (spam test string)", sample("Cheap watches", f"Buy now!\n{GTUBE}\n")),
        ("EICAR as an attachment", sample("Invoice", "Please see the attached invoice.\n", stacklib.eicar())),
        ("spam under reject_level (the local test rule)",
         sample("Cheap watches scanmilter-tag-test", "Hello Bob,\nbuy our watches.\n")),
    ]
    held = ""
    for n, (label, data) in enumerate(cases, 1):
        before = len(st.delivered())
        r = st.send(data, "alice@outside.test", ["bob@example.com"], xclient_addr=OUTSIDE)
        print(f"{label}: {r['code']} {' '.join(r['reply'].split())}")
        st.wait_logged("action=", count=n)      # scanmilter has decided and logged it
        queued = re.search(r"queued as (\w+)", r["reply"])
        entry = [ln for ln in st.logs["scanmilter"].read_text().splitlines()
                 if queued and ln.startswith(f"{queued[1]}: quarantined as ")]
        if entry:
            held = entry[0].split()[3]
            print(f"    held in the quarantine as {held}, not delivered (quarantine_action = \"discard\")")
        elif r["code"] == 250:
            d = st.wait_delivered(before + 1)[-1]
            head = d.data.split(b"\n\n", 1)[0].decode("utf-8", "replace")
            for line in head.splitlines():
                if line.startswith(("X-Virus-", "X-Spam-", "Subject:")):
                    print(f"    {line}")
            print(f"    delivered to {', '.join(d.recipients)}: {short(d.path)}")
    print("\nscanmilter's log:")
    for line in st.logs["scanmilter"].read_text().splitlines():
        if "action=" in line:
            print(f"    {line}")
    print(f"\n$ scanmilter quarantine list -c {conf}")
    listed = subprocess.run([sys.executable, "-m", "scanmilter", "quarantine", "list", "-c", str(st.milter_config)],
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO / "milter")))
    print(listed.stdout + listed.stderr, end="")
    cli = ".venv/bin/scanmilter quarantine"
    print(f"\nThe stack keeps running: try  swaks --server 127.0.0.1:{args.smtp_port} --to bob@example.com\n"
          f"Quarantine:  {cli} list -c {conf}\n"
          f"             {cli} show {held or 'ID'} -c {conf}\n"
          f"             {cli} release {held or 'ID'} -c {conf}    # delivers it to {short(st.delivered_dir)}/\n"
          f"Metrics:     curl -s http://{metrics}/metrics | grep ^scanmilter_messages\n"
          f"Self test:   .venv/bin/scanmilter selftest -c {conf}\n"
          f"Stop it with  make demo-stop")
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(main())
