"""`make demo`: start the private stack on 127.0.0.1:2525 and push three sample messages through it."""
import argparse
import email.policy
import email.utils
import sys
import time
from email.message import EmailMessage
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stack as stacklib  # noqa: E402

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
OUTSIDE = "203.0.113.7"


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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=".demo")
    ap.add_argument("--smtp-port", type=int, default=2525)
    args = ap.parse_args()
    root = Path(args.dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)     # postfix and debian-spamd must be able to enter it
    st = stacklib.Stack(root, smtp_port=args.smtp_port, scanmilter_settings={"metrics_address": "127.0.0.1:9925"})
    print(f"starting Postfix, scanmilter, clamd and spamd under {root} ...", flush=True)
    st.start()
    print(f"up in {st.startup_seconds:.1f} s: Postfix on 127.0.0.1:{args.smtp_port} -> scanmilter "
          f"(unix:{st.milter_socket}) -> clamd + spamd; delivered mail in {st.delivered_dir}/\n")
    cases = [
        ("a clean message", sample("Lunch on Friday?", "Hi Bob,\nlunch on Friday at noon?\nAlice\n")),
        ("GTUBE (spam test string)", sample("Cheap watches", f"Buy now!\n{GTUBE}\n")),
        ("EICAR as an attachment", sample("Invoice", "Please see the attached invoice.\n", stacklib.eicar())),
    ]
    for label, data in cases:
        before = len(st.delivered())
        r = st.send(data, "alice@outside.test", ["bob@example.com"], xclient_addr=OUTSIDE)
        print(f"{label}: {r['code']} {' '.join(r['reply'].split())}")
        if r["code"] == 250:
            d = st.wait_delivered(before + 1)[-1]
            head = d.data.split(b"\n\n", 1)[0].decode("utf-8", "replace")
            for line in head.splitlines():
                if line.startswith(("X-Virus-", "X-Spam-", "Subject:")):
                    print(f"    {line}")
            print(f"    delivered to {', '.join(d.recipients)}: {d.path.relative_to(root.parent)}")
    time.sleep(0.2)
    print("\nscanmilter's log:")
    for line in st.logs["scanmilter"].read_text().splitlines():
        if "action=" in line:
            print(f"    {line}")
    print(f"\nThe stack keeps running: try  swaks --server 127.0.0.1:{args.smtp_port} --to bob@example.com\n"
          f"Metrics:     curl -s http://127.0.0.1:9925/metrics | grep ^scanmilter_messages\n"
          f"Self test:   .venv/bin/scanmilter selftest -c {st.milter_config.relative_to(root.parent)}\n"
          f"Stop it with  make demo-stop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
