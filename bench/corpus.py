"""The benchmark's mail corpus, generated at run time from a fixed seed (nothing is stored).

    ham    ~87%  real-looking business mail, 2-50 KB (log-uniform): plain text, some
                 multipart/alternative with an HTML part, some with a small binary attachment,
                 some replies quoting earlier text; 1-3 Received headers from outside relays
    spam    5%   the same kind of text, at most SPAM_TEXT_LIMIT characters, with the GTUBE string in
                 the body (SpamAssassin scores 1000; rspamd looks for GTUBE only in text parts of up
                 to 8 KiB, hence the limit)
    bulk    5%   newsletters: mailings of 10 copies each, one transaction per recipient (same
                 From, Subject and body; own To, Date, Message-ID and Received), shuffled into
                 the rest like any other mail
    virus   3%   EICAR as a base64 attachment, half of them inside a zip made in memory
    large  0.5%  (at least 2) 1-2 MB: a text part and a base64 attachment of random bytes

EICAR comes from scanmilter.commands.selftest.eicar() and exists only in memory. The text is a bigram
chain over SEED_TEXT below, so spamd sees ordinary English rather than random words. Everything
but the Date headers (minutes before now) is the same on every run.
"""
from __future__ import annotations

import base64
import dataclasses
import email.utils
import io
import math
import random
import sys
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "milter"))
from scanmilter.commands.selftest import eicar  # noqa: E402
from scanmilter.scanners.spamd import GTUBE  # noqa: E402

SEED_TEXT = """\
Thanks for the quick reply yesterday. I went through the numbers again this morning and I think we are
in a good position for the next quarter, although the shipping costs are still higher than we planned.
The team in Rotterdam has agreed to move the delivery to the second week of the month, which gives us
enough time to finish the testing and to update the documentation for the customer. Could you please
check whether the invoice for the March order has been paid? Their accounts department told me it went
out on Friday, but I cannot find it in the report. If it is still open, we should send a friendly
reminder before the end of the week. On another note, the meeting with the supplier is now confirmed for
Tuesday at ten in the small conference room on the third floor. I will bring the printed contracts and
the samples they sent last month. It would help if you could prepare a short summary of the open issues,
especially the problems with the packaging and the late deliveries in February. We also need to decide
who will attend the trade fair in September. The registration closes at the end of this month and the
hotel rooms near the venue are already getting expensive. My suggestion is that two people from sales
and one engineer go, so that we can answer the technical questions on the spot. Please let me know what
you think, and whether the budget for travel is still available after the changes in the plan. The new
version of the software was installed on the test server last night. Most of the functions work as
expected, but the export to the accounting system still fails for some records with long addresses. The
developers think it is a problem with the character encoding and they are working on a fix. They hope to
have a new build ready by Thursday, and then we can repeat the tests with the real data from the old
system. I have attached the list of the records that failed, in case you want to look at them yourself.
Regarding the training for the new staff, the room is booked for Monday and Wednesday afternoon. Anna
will give the introduction to the order process and Peter will show them how the warehouse system works.
Everybody should have a user account by then; if somebody is missing, please tell me as soon as possible
so that I can ask the help desk to create it. The figures for the last month look better than expected.
Sales in the northern region went up by almost twelve percent, mainly because of the two new customers
we won in January. The southern region is still behind the target, but the pipeline looks healthy and
several offers are waiting for a decision. I would like to discuss the forecast with you before we send
it to the board, maybe on Thursday after lunch if that suits you. The board meeting itself has been
moved to the last Friday of the month. Finally, a small reminder that the office will be closed on the
public holiday next week. The servers will keep running, of course, and the usual on-call plan applies.
If anything urgent comes up, you can reach me on my mobile phone. Have a nice weekend and best regards
to the whole team. We received the signed agreement this afternoon, so the project can start as planned.
The kickoff call with the customer is scheduled for next Monday, and I have sent the invitation to all
of you. Please read the requirements document before the call and write down any questions you have. The
customer asked for weekly status reports, so we should agree on a simple format that does not take too
much time to fill in. I also spoke with the landlord about the heating in the archive room. He promised
to send a technician next week, but he could not give an exact date. Until then, please do not store any
paper files on the floor near the window, because the room gets quite damp when it rains.
"""

SUBJECTS = ["Re: invoice for the March order", "Meeting with the supplier on Tuesday", "Updated forecast",
            "Fwd: trade fair registration", "Training for the new staff", "Re: export problem on the test server",
            "Status report week {n}", "Office closed on the public holiday", "Re: Re: contract samples",
            "Question about the delivery date", "Minutes of the project meeting", "Travel budget {n}",
            "Heating in the archive room", "Kickoff call on Monday", "Re: figures for last month"]
SPAM_TEXT_LIMIT = 6000     # characters of a spam's text: rspamd 3.4 skips GTUBE in text parts over 8 KiB
NAMES = ["Anna Berg", "Peter Novak", "Maria Lopez", "John Carter", "Li Wei", "Sophie Martin", "Jan de Vries",
         "Olga Ivanova", "Tom Becker", "Fatima Khan", "Lukas Meyer", "Emma Wilson"]
DOMAINS = ["outside.test", "supplier.example.net", "customer.example.org", "mail.partner.test"]
KINDS = ("ham", "spam", "virus", "large", "bulk")
BULK_COPIES = 10            # copies per mailing


@dataclasses.dataclass
class Message:
    mid: str            # Message-ID without <>
    kind: str           # ham | spam | virus | large | bulk
    data: bytes         # the message, CRLF line ends, not dot-stuffed
    sender: str = "alice@outside.test"   # envelope sender: the From address

    @property
    def spam_or_virus(self) -> bool:
        return self.kind in ("spam", "virus")


class _Text:
    """Sentences from a bigram chain over SEED_TEXT."""

    def __init__(self, rnd: random.Random):
        self.rnd = rnd
        words = SEED_TEXT.split()
        self.next = {}
        for a, b in zip(words, words[1:]):
            self.next.setdefault(a, []).append(b)
        self.starts = [b for a, b in zip(words, words[1:]) if a.endswith((".", "?")) and b[0].isupper()]

    def sentence(self) -> str:
        w = self.rnd.choice(self.starts)
        out = [w]
        while not w.endswith((".", "?")) and len(out) < 40:
            w = self.rnd.choice(self.next.get(w) or self.starts)
            out.append(w)
        if not out[-1].endswith((".", "?")):
            out[-1] += "."
        return " ".join(out)

    def paragraph(self) -> str:
        return " ".join(self.sentence() for _ in range(self.rnd.randint(2, 6)))

    def body(self, size: int) -> str:
        """Wrapped paragraphs of about `size` characters."""
        paras, n = [], 0
        while n < size:
            p = self.paragraph()
            if self.rnd.random() < 0.1:
                p += f" The details are on https://www.{self.rnd.choice(DOMAINS)}/docs/{self.rnd.randint(100, 999)}."
            lines, line = [], ""
            for word in p.split():
                if len(line) + len(word) + 1 > 72:
                    lines.append(line)
                    line = word
                else:
                    line = f"{line} {word}" if line else word
            lines.append(line)
            paras.append("\n".join(lines))
            n += len(paras[-1]) + 2
        return "\n\n".join(paras)


def _crlf(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")


def _b64(data: bytes) -> str:
    return base64.encodebytes(data).decode("ascii")


def _with_attachment(boundary: str, text: str, name: str, ctype: str, payload: bytes) -> str:
    """A multipart/mixed body: a text part and one base64 attachment."""
    return (f"Content-Type: multipart/mixed; boundary=\"{boundary}\"\n\n--{boundary}\n"
            "Content-Type: text/plain; charset=utf-8\n\n" + text + f"\n--{boundary}\n"
            f"Content-Type: {ctype}; name=\"{name}\"\n"
            f"Content-Disposition: attachment; filename=\"{name}\"\nContent-Transfer-Encoding: base64\n\n"
            + _b64(payload) + f"--{boundary}--\n")


def _make(rnd: random.Random, text: _Text, i: int, kind: str, now: int) -> Message:
    mid = f"bench-{i}-{rnd.getrandbits(40):010x}@{rnd.choice(DOMAINS)}"
    sender = rnd.choice(NAMES)
    addr = f"{sender.split()[0].lower()}.{sender.split()[1].lower()}@{rnd.choice(DOMAINS)}"
    frm = f"{sender} <{addr}>"
    rcpt = rnd.choice(NAMES)
    to = f"{rcpt} <{rcpt.split()[0].lower()}@example.com>"
    subject = rnd.choice(SUBJECTS).format(n=rnd.randint(1, 52))
    # minutes before now: SpamAssassin compares Date with the time of receipt (DATE_IN_PAST_*)
    date = email.utils.formatdate(now - rnd.randint(60, 1800), localtime=False)
    received = []
    for hop in range(rnd.randint(1, 3)):
        ip = f"198.51.100.{rnd.randint(1, 254)}"
        received.append(f"Received: from relay{hop}.{rnd.choice(DOMAINS)} (relay{hop}.{rnd.choice(DOMAINS)} [{ip}])\n"
                        f"\tby mx{hop}.{rnd.choice(DOMAINS)} with ESMTPS id {rnd.getrandbits(48):012X};\n\t{date}")
    head = "\n".join(received) + f"\nFrom: {frm}\nTo: {to}\nSubject: {subject}\nDate: {date}\n" \
        f"Message-ID: <{mid}>\nMIME-Version: 1.0\n"
    if rnd.random() < 0.4:
        head += f"X-Mailer: {rnd.choice(['Thunderbird 115.8.1', 'Microsoft Outlook 16.0', 'Apple Mail (2.3774)'])}\n"

    if kind == "large":
        size = rnd.randint(1_000_000, 2_000_000)
        plain = text.body(3000) + f"\n\n{sender}\n"
        blob = rnd.randbytes(size * 3 // 4)
        body = _with_attachment(f"b-{i}", plain, f"backup-{i}.bin", "application/octet-stream", blob)
        return Message(mid, kind, _crlf(head + body), addr)

    if kind == "virus":
        payload, name, ctype = eicar(), f"invoice-{i}.com", "application/octet-stream"
        if rnd.random() < 0.5:
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
                z.writestr(f"invoice-{i}.com", payload)
            payload, name, ctype = buf.getvalue(), f"invoice-{i}.zip", "application/zip"
        plain = text.body(rnd.randint(300, 1500))
        body = _with_attachment(f"b-{i}", plain + "\n\nPlease find the invoice attached.", name, ctype, payload)
        return Message(mid, kind, _crlf(head + body), addr)

    # ham and spam: 2-50 KB, log-uniform
    target = int(math.exp(rnd.uniform(math.log(2_000), math.log(50_000))))
    target -= len(head) + 200
    plain = text.body(max(300, target))
    if rnd.random() < 0.2:      # a reply quoting earlier mail
        quoted = "\n".join("> " + ln for ln in text.body(rnd.randint(400, 2000)).splitlines())
        plain = plain[:len(plain) // 2] + f"\n\nOn {date}, {rnd.choice(NAMES)} wrote:\n{quoted}\n"
    plain += f"\n\nBest regards,\n{sender}\n"
    if kind == "spam":
        plain = plain[:SPAM_TEXT_LIMIT]   # cut after the draws: every other message stays as it was
        plain = plain[:len(plain) // 3] + f"\n\n{GTUBE}\n\n" + plain[len(plain) // 3:]
    roll = rnd.random()
    if roll < 0.25:     # text + HTML: the text is about half of the target then
        half = plain[:max(len(plain) // 2, 300)]
        html = "<html><body>" + "".join(f"<p>{p.replace(chr(10), ' ')}</p>\n" for p in half.split("\n\n")) \
            + "</body></html>"
        body = (f"Content-Type: multipart/alternative; boundary=\"a-{i}\"\n\n--a-{i}\n"
                "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n" + half
                + f"\n--a-{i}\nContent-Type: text/html; charset=utf-8\n\n" + html + f"\n--a-{i}--\n")
    elif roll < 0.35 and target > 8000:   # text + a small binary attachment (a third of the size)
        part = plain[:len(plain) * 2 // 3]
        blob = rnd.randbytes(max(1000, target // 4))
        body = _with_attachment(f"m-{i}", part, f"report-{i}.pdf", "application/pdf", b"%PDF-1.4\n" + blob)
    else:
        body = "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n" + plain + "\n"
    return Message(mid, kind, _crlf(head + body), addr)


def _bulk_copies(rnd: random.Random, text: _Text, mailing: int, now: int) -> list[Message]:
    """One newsletter sent to BULK_COPIES recipients in as many transactions."""
    template = _make(rnd, text, 100_000 + mailing, "ham", now)
    head, _, body = template.data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    keep = [ln for ln in lines if ln.split(":")[0] in ("From", "Subject", "MIME-Version", "Content-Type",
                                                         "Content-Transfer-Encoding")]
    copies = []
    for c in range(BULK_COPIES):
        mid = f"bulk-{mailing}-{c}-{rnd.getrandbits(40):010x}@{template.sender.split('@')[1]}"
        rcpt = rnd.choice(NAMES)
        date = email.utils.formatdate(now - rnd.randint(60, 1800), localtime=False)
        ip = f"198.51.100.{rnd.randint(1, 254)}"
        own = [f"Received: from out.{template.sender.split('@')[1]} ([{ip}])\r\n\tby mx0.example.com with ESMTPS "
               f"id {rnd.getrandbits(48):012X};\r\n\t{date}",
               f"To: {rcpt} <{rcpt.split()[0].lower()}@example.com>", f"Date: {date}", f"Message-ID: <{mid}>"]
        copies.append(Message(mid, "bulk", "\r\n".join(own + keep).encode() + b"\r\n\r\n" + body,
                              template.sender))
    return copies


def generate(n: int, seed: int = 20260101) -> list[Message]:
    """n messages in a fixed, shuffled order: 5% spam, 3% virus, max(2, n/200) large, 5% bulk
    (whole mailings of BULK_COPIES), the rest ham."""
    rnd = random.Random(seed)
    text = _Text(rnd)
    n_spam, n_virus, n_large = round(n * 0.05), round(n * 0.03), max(2, round(n * 0.005))
    n_mailings = round(n * 0.05 / BULK_COPIES)
    if n < 20:
        n_spam, n_virus, n_large = min(1, n), min(1, max(n - 1, 0)), min(1, max(n - 2, 0))
    kinds = ["spam"] * n_spam + ["virus"] * n_virus + ["large"] * n_large
    kinds += ["ham"] * (n - len(kinds) - n_mailings * BULK_COPIES)
    rnd.shuffle(kinds)
    now = int(time.time())
    msgs = [_make(rnd, text, i, k, now) for i, k in enumerate(kinds)]
    for mailing in range(n_mailings):
        for copy in _bulk_copies(rnd, text, mailing, now):
            msgs.insert(rnd.randrange(len(msgs) + 1), copy)
    return msgs


def big_message(size: int = 50_000_000, seed: int = 7) -> Message:
    """One message of about `size` bytes: text, then a base64 attachment of random bytes."""
    rnd = random.Random(seed)
    text = _Text(rnd)
    head = ("From: Big Sender <big@outside.test>\nTo: Bob <bob@example.com>\nSubject: the archive you asked for\n"
            f"Date: {email.utils.formatdate(time.time() - 600)}\nMessage-ID: <bench-big@outside.test>\nMIME-Version: 1.0\n"
            "Content-Type: multipart/mixed; boundary=\"big\"\n\n--big\nContent-Type: text/plain; charset=utf-8\n\n"
            + text.body(2000) + "\n--big\nContent-Type: application/octet-stream; name=\"archive.bin\"\n"
            "Content-Transfer-Encoding: base64\n\n")
    raw = rnd.randbytes(int((size - len(head) - 20) * 57 / 78))   # base64 lines: 57 bytes -> 78 with CRLF
    return Message("bench-big@outside.test", "large", _crlf(head) + _crlf(_b64(raw)) + b"--big--\r\n",
                   "big@outside.test")


def describe(msgs: list[Message]) -> dict:
    """Counts and sizes per kind."""
    out = {}
    for k in KINDS:
        sizes = sorted(len(m.data) for m in msgs if m.kind == k)
        if sizes:
            out[k] = {"count": len(sizes), "min_bytes": sizes[0], "median_bytes": sizes[len(sizes) // 2],
                      "max_bytes": sizes[-1]}
    out["total_bytes"] = sum(len(m.data) for m in msgs)
    return out


if __name__ == "__main__":
    import json
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    msgs = generate(n)
    print(json.dumps(describe(msgs), indent=1))
    if len(sys.argv) > 2:
        kind = sys.argv[2]
        sys.stdout.write(next(m for m in msgs if m.kind == kind).data.decode("utf-8", "replace")[:3000])
