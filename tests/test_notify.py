"""`scanmilter quarantine notify`: one digest per recipient of what was held for them since the last
one (text and HTML, every hostile field escaped, signed links but for admin-only reasons), the
policy's [notify] opt-in and opt-out, never twice (claims under the store's lock, given back when
the sending fails), against a small SMTP server in a thread; and once against PostgreSQL from two
"hosts" at once."""
import email
import email.policy
import io
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

import fakes
from conftest import ROOT
from scanmilter import cli, config, notify, policyfile
from scanmilter import quarantine as Q
from scanmilter.policy import NotifyRules
from scanmilter.web.links import Keys, LinkError

KEY = b"k" * 48


class Sink(fakes.Sink):
    def digests(self):
        return [(m["rcpt"], email.message_from_bytes(m["data"], policy=email.policy.default)) for m in self.messages]


@pytest.fixture
def sink():
    s = Sink()
    yield s
    s.close()


def settings(port, **extra):
    values = {"quarantine_release_address": f"inet:127.0.0.1:{port}", "notify_from": "postmaster@example.com",
              "web_base_url": "https://quarantine.example.com", **extra}
    return config.parse(config.DAEMON_SETTINGS, values, "test")


def put(store, recipients=("bob@example.com",), subject="cheap pills", reason="spam", score=9.5, age=0.0, **meta):
    data = f"Subject: {subject}\r\nFrom: x@outside.test\r\n\r\nbody\r\n".encode()
    return store.put(io.BytesIO(data), {"sender": "spammer@outside.test", "recipients": list(recipients),
                                        "subject": subject, "reason": reason, "score": score,
                                        "direction": "inbound", "viruses": [], "time": time.time() - age, **meta})


def parts(msg):
    assert msg.get_content_type() == "multipart/alternative"
    plain = msg.get_body(("plain",)).get_content()
    html = msg.get_body(("html",)).get_content()
    return plain, html


def links(text):
    return re.findall(r"https://quarantine\.example\.com/r/([\w.-]+)", text)


EVERYONE = NotifyRules(send=True)


def test_one_digest_per_recipient_lists_what_was_held_for_them_and_the_next_run_sends_nothing(tmp_path, sink):
    store = Q.FileStore(str(tmp_path / "q"))
    first = put(store, subject="first offer", age=60)
    second = put(store, subject="second offer", score=12.25)
    put(store, recipients=("carol@example.com",), subject="for carol")
    cfg, keys = settings(sink.port), Keys(KEY)
    assert notify.run(store, cfg, EVERYONE, keys, out=lambda _: None) == notify.EXIT_OK
    got = {tuple(r): m for r, m in sink.digests()}
    assert set(got) == {("bob@example.com",), ("carol@example.com",)}
    msg = got[("bob@example.com",)]
    assert msg["To"] == "bob@example.com" and msg["From"] == "postmaster@example.com"
    assert msg["Subject"] == "2 messages held for you" and msg["Auto-Submitted"] == "auto-generated"
    plain, html = parts(msg)
    for text in (plain, html):
        assert "first offer" in text and "second offer" in text and "spammer@outside.test" in text
        assert "12.2" in text and "spam" in text
    assert plain.index("first offer") < plain.index("second offer")          # oldest first
    # each entry's link names it and bob, with the nonce recorded in the entry for bob
    found = [keys.verify(t, time.time()) for t in links(plain)]
    assert sorted(link.entry_id for link in found) == sorted([first, second])
    for link in found:
        assert link.recipient == "bob@example.com"
        assert notify.notified(store.get(link.entry_id), "bob@example.com")["nonce"] == link.nonce
    assert sorted(links(html)) == sorted(links(plain))
    # since their last digest: nothing new, nothing sent
    assert notify.run(store, cfg, EVERYONE, keys, out=lambda _: None) == notify.EXIT_OK
    assert len(sink.messages) == 2
    third = put(store, subject="third offer")
    notify.run(store, cfg, EVERYONE, keys, out=lambda _: None)
    [(rcpt, msg)] = sink.digests()[2:]
    assert rcpt == ["bob@example.com"] and "third offer" in parts(msg)[0]
    assert "first offer" not in parts(msg)[0] and [keys.verify(t, time.time()).entry_id
                                                   for t in links(parts(msg)[0])] == [third]


def test_policy_opt_in_and_opt_out_by_domain_and_recipient(tmp_path, sink):
    policy = tmp_path / "policy.toml"
    policy.write_text('[notify]\nsend = false\n[notify.domains]\n"example.com" = true\n'
                      '[notify.recipients]\n"ceo@example.com" = false\n"ann@other.test" = true\n')
    rules = policyfile.load(str(policy)).notify
    store = Q.FileStore(str(tmp_path / "q"))
    for rcpt in ("bob@example.com", "CEO@example.com", "ann@other.test", "joe@other.test"):
        put(store, recipients=(rcpt,))
    notify.run(store, settings(sink.port), rules, Keys(KEY), out=lambda _: None)
    assert sorted(r for m in sink.messages for r in m["rcpt"]) == ["ann@other.test", "bob@example.com"]


def test_outbound_released_and_too_old_entries_are_not_listed(tmp_path, sink):
    store = Q.FileStore(str(tmp_path / "q"))
    put(store, direction="outbound", subject="sent by us")
    put(store, subject="too old", age=8 * 86400)                          # notify_max_age 7 days
    released = store.get(put(store, subject="released already"))
    released.meta["released"].append({"at": time.time(), "by": "admin", "to": ["bob@example.com"]})
    store.update(released)
    put(store, recipients=("bad\r\naddress@example.com",), subject="unsendable")
    assert notify.run(store, settings(sink.port), EVERYONE, Keys(KEY), out=lambda _: None) == 0
    assert sink.messages == []


def test_admin_only_reasons_are_listed_without_a_link(tmp_path, sink):
    store = Q.FileStore(str(tmp_path / "q"))
    put(store, reason="virus", score=None, viruses=["Eicar-Signature"], subject="invoice")
    spam = put(store, subject="pills")
    notify.run(store, settings(sink.port), EVERYONE, Keys(KEY), out=lambda _: None)
    [(_, msg)] = sink.digests()
    plain, html = parts(msg)
    assert "invoice" in plain and "Eicar-Signature" in plain and "Only the postmaster can release" in plain
    assert [Keys(KEY).verify(t, time.time()).entry_id for t in links(plain)] == [spam]
    assert html.count('href="https://quarantine.example.com/r/') == 1 and "postmaster only" in html


def test_no_web_base_url_means_no_links(tmp_path, sink):
    store = Q.FileStore(str(tmp_path / "q"))
    put(store)
    notify.run(store, settings(sink.port, web_base_url=""), EVERYONE, None, out=lambda _: None)
    plain, html = parts(sink.digests()[0][1])
    assert "/r/" not in plain and "<a href=\"http" not in html and "Ask postmaster@example.com" in plain


def test_link_expiry_is_the_lifetime_but_never_past_the_purge(tmp_path, sink):
    store = Q.FileStore(str(tmp_path / "q"))
    young = put(store, subject="young")
    old = put(store, subject="old", age=29 * 86400)
    cfg = settings(sink.port, notify_max_age=30 * 86400)         # quarantine_max_age: 30 days
    now = time.time()
    notify.run(store, cfg, EVERYONE, Keys(KEY), now=now, out=lambda _: None)
    found = {link.entry_id: link for link in (Keys(KEY).verify(t, now) for t in links(parts(sink.digests()[0][1])[0]))}
    assert found[young].expires == int(now + cfg.web_link_lifetime)
    assert abs(found[old].expires - (store.get(old).time + cfg.quarantine_max_age)) <= 1


def test_hostile_subject_and_sender_arrive_as_inert_text(tmp_path, sink):
    store = Q.FileStore(str(tmp_path / "q"))
    nasty = "<script>alert(1)</script> \x1b[31mred\u202egnp.exe <b>bold</b> &amp;"
    put(store, subject=nasty, sender='"><img src=x onerror=alert(1)>@evil.test')
    put(store, subject="=?utf-8?b?" + __import__("base64").b64encode("<i>encoded</i>".encode()).decode() + "?=")
    notify.run(store, settings(sink.port), EVERYONE, Keys(KEY), out=lambda _: None)
    msg = sink.digests()[0][1]
    plain, html = parts(msg)
    assert "<script" not in html and "<img" not in html and "<i>" not in html and "<b>bold" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;i&gt;encoded&lt;/i&gt;" in html
    assert "&amp;amp;" in html                                          # escaped once more, shown as sent
    for text in (plain, html, str(msg["Subject"])):
        assert "\x1b" not in text and "\u202e" not in text
    assert "<script>alert(1)</script>" in plain and "?[31mred?gnp.exe" in plain     # text stays text


def test_max_entries_per_digest_and_the_rest_come_next(tmp_path, sink):
    store = Q.FileStore(str(tmp_path / "q"))
    ids = [put(store, subject=f"offer {n}", age=100 - n) for n in range(3)]
    cfg = settings(sink.port, notify_max_entries=2)
    notify.run(store, cfg, EVERYONE, Keys(KEY), out=lambda _: None)
    notify.run(store, cfg, EVERYONE, Keys(KEY), out=lambda _: None)
    first, second = (parts(m)[0] for _, m in sink.digests())
    assert "offer 0" in first and "offer 1" in first and "offer 2" not in first
    assert "1 more held message will be listed in your next notice" in first
    assert "offer 2" in second and "offer 0" not in second
    assert all(notify.notified(store.get(i), "bob@example.com") for i in ids)


def test_a_digest_that_cannot_be_sent_gives_its_entries_back(tmp_path, sink, capsys):
    store = Q.FileStore(str(tmp_path / "q"))
    entry_id = put(store)
    with socket.socket() as s:            # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    errors = []
    assert notify.run(store, settings(closed), EVERYONE, Keys(KEY), out=lambda _: None,
                      err=errors.append) == notify.EXIT_INCOMPLETE
    assert "bob@example.com: not sent" in errors[0] and "wait for the next run" in errors[0]
    assert notify.notified(store.get(entry_id), "bob@example.com") is None
    assert notify.run(store, settings(sink.port), EVERYONE, Keys(KEY), out=lambda _: None) == notify.EXIT_OK
    assert len(sink.messages) == 1


def test_a_claim_waits_for_the_entry_lock_and_never_claims_twice(tmp_path):
    """Two runs (two store objects: two flocks, as two processes have) claim the same entry for
    the same recipient: the second waits while the first holds the entry's lock, then sees the
    first one's record and claims nothing."""
    one, two = Q.FileStore(str(tmp_path / "q")), Q.FileStore(str(tmp_path / "q"))
    entry_id = put(one)
    holding, result = threading.Event(), {}
    release = threading.Event()

    def first():
        with one.locked(entry_id):
            holding.set()
            release.wait(10)
            result["first"] = notify.claim(one, entry_id, "bob@example.com", time.time(), "mx1")

    t1 = threading.Thread(target=first)
    t1.start()
    assert holding.wait(10)
    t2 = threading.Thread(target=lambda: result.__setitem__("second",
                                                            notify.claim(two, entry_id, "Bob@Example.com",
                                                                         time.time(), "mx2")))
    t2.start()
    t2.join(0.5)
    assert t2.is_alive()                          # waiting for the lock the first holds
    release.set()
    t1.join(10)
    t2.join(10)
    assert result["first"] and result["second"] is None
    assert [r["host"] for r in one.get(entry_id).meta["notified"]] == ["mx1"]


def test_a_second_run_while_the_first_is_sending_lists_nothing_again(tmp_path):
    """`quarantine notify` in two processes at once: the first claims, then sends (held open by the
    server); the second, started meanwhile, finds every entry claimed and sends nothing."""
    sending, go = threading.Event(), threading.Event()

    def gate():
        sending.set()
        go.wait(30)
    sink = Sink(gate=gate)
    try:
        store = Q.FileStore(str(tmp_path / "q"))
        for n in range(3):
            put(store, subject=f"offer {n}")
        conf = tmp_path / "scanmilter.toml"
        policy = tmp_path / "policy.toml"
        policy.write_text("[notify]\nsend = true\n")
        key = tmp_path / "web.key"
        key.write_bytes(KEY)
        key.chmod(0o600)
        conf.write_text(f'quarantine_directory = "{tmp_path / "q"}"\npolicy_file = "{policy}"\n'
                        f'quarantine_release_address = "inet:127.0.0.1:{sink.port}"\n'
                        f'web_base_url = "https://quarantine.example.com"\nweb_key_file = "{key}"\n')
        env = dict(os.environ, PYTHONPATH=str(ROOT / "milter"))
        command = [sys.executable, "-m", "scanmilter", "quarantine", "notify", "-c", str(conf)]
        first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert sending.wait(30)
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 0 and "sent 0 digests listing 0 entries" in second.stdout, second
        go.set()
        out, err = first.communicate(timeout=60)
        assert first.returncode == 0 and "sent 1 digest listing 3 entries" in out, err
        assert len(sink.messages) == 1
    finally:
        go.set()
        sink.close()


def test_the_command_dry_run_claims_nothing_and_bad_settings_exit_2(tmp_path, sink, capsys):
    q = tmp_path / "q"
    store = Q.FileStore(str(q))
    entry_id = put(store)
    policy = tmp_path / "policy.toml"
    policy.write_text("[notify]\nsend = true\n")
    conf = tmp_path / "scanmilter.toml"
    base = (f'quarantine_directory = "{q}"\npolicy_file = "{policy}"\n'
            f'quarantine_release_address = "inet:127.0.0.1:{sink.port}"\n')
    conf.write_text(base)
    assert cli.main(["quarantine", "notify", "--dry-run", "-c", str(conf)]) == 0
    assert f"bob@example.com: would list 1 entry: {entry_id}" in capsys.readouterr().out
    assert sink.messages == [] and notify.notified(store.get(entry_id), "bob@example.com") is None
    key = tmp_path / "web.key"
    key.write_bytes(KEY)
    key.chmod(0o644)                              # readable by others: refused
    conf.write_text(base + f'web_base_url = "https://q.example.com"\nweb_key_file = "{key}"\n')
    assert cli.main(["quarantine", "notify", "-c", str(conf)]) == notify.EXIT_USAGE
    assert "readable or writable by others" in capsys.readouterr().err
    key.chmod(0o600)
    key.write_bytes(b"short")
    assert cli.main(["quarantine", "notify", "-c", str(conf)]) == notify.EXIT_USAGE
    assert "at least 32 bytes" in capsys.readouterr().err
    assert sink.messages == []


def test_the_admin_can_replace_the_templates(tmp_path, sink):
    store = Q.FileStore(str(tmp_path / "q"))
    put(store, subject="<offer>")
    mine = tmp_path / "templates"
    mine.mkdir()
    (mine / "digest_subject.txt").write_text("Quarantaene: {{ items|length }}\n")
    (mine / "digest.html").write_text("<p>{% for i in items %}{{ i.subject }}{% endfor %}</p>\n")
    notify.run(store, settings(sink.port, notify_template_directory=str(mine)), EVERYONE, Keys(KEY),
               out=lambda _: None)
    msg = sink.digests()[0][1]
    plain, html = parts(msg)
    assert msg["Subject"] == "Quarantaene: 1"
    assert html.strip() == "<p>&lt;offer&gt;</p>"                 # the admin's template is autoescaped too
    assert "<offer>" in plain and "Hello," in plain               # the shipped text part


def test_the_notify_table_is_checked(tmp_path):
    from scanmilter.config import ConfigError
    policy = tmp_path / "policy.toml"
    for text, said in (("[notify]\nsned = true\n", "unknown key 'sned'"),
                       ("[notify]\nsend = 1\n", "send must be true or false"),
                       ('[notify.domains]\n"example.com" = "yes"\n', "takes"),
                       ('[notify.recipients]\n"nobody" = true\n', "takes"),
                       ("[notify]\nadmin_only_reasons = \"virus\"\n", "admin_only_reasons must be a list")):
        policy.write_text(text)
        with pytest.raises(ConfigError, match=said) as e:
            policyfile.load(str(policy))
        assert str(e.value).startswith(f"{policy}:")
    policy.write_text('[notify]\nadmin_only_reasons = ["virus", "spam"]\n')
    rules = policyfile.load(str(policy)).notify
    assert rules.admin_only("spam") and not rules.wants("bob@example.com")


def test_links_are_refused_when_forged_cut_or_expired():
    keys, now = Keys(KEY), time.time()
    token = keys.sign("a" * 24, "bob@example.com", int(now) + 60)
    assert keys.verify(token, now).recipient == "bob@example.com"
    v, entry, expires, nonce, rcpt, mac = token.split(".")
    import base64
    carol = base64.urlsafe_b64encode(b"carol@example.com").rstrip(b"=").decode()
    for bad in (token[:-2], ".".join([v, "b" * 24, expires, nonce, rcpt, mac]),
                ".".join([v, entry, expires, nonce, carol, mac]), ".".join([v, entry, str(int(expires) + 1000), nonce,
                                                                            rcpt, mac]),
                Keys(b"x" * 48).sign("a" * 24, "bob@example.com", int(now) + 60), "", "v1." + "a" * 2000, token + "é"):
        with pytest.raises(LinkError) as e:
            keys.verify(bad, now)
        assert e.value.kind == "forged"
    with pytest.raises(LinkError) as e:
        keys.verify(token, now + 61)
    assert e.value.kind == "expired"


@pytest.mark.integration
def test_two_hosts_on_one_postgresql_notify_each_entry_once(database, tmp_path):
    """Two hosts sharing the PostgreSQL quarantine run notify at the same moment: the claims are
    row locks and records in the database, so each entry reaches its recipient in one digest."""
    import psycopg
    from scanmilter import db
    from scanmilter.quarantine import postgres as PG
    with psycopg.connect(database, autocommit=True) as conn:
        db.migrate(conn)
    barrier = threading.Barrier(2)
    sink = Sink(gate=lambda: None)
    stores = [PG.PgStore(db.Database(database, connect_timeout=2), f"mx{n}.test", "inet:127.0.0.1:10026")
              for n in (1, 2)]
    try:
        ids = [put(stores[0], recipients=("bob@example.com", "carol@example.com"), subject=f"offer {n}")
               for n in range(20)]
        cfg = settings(sink.port)
        due = notify.due

        def together(*args):            # both hosts read what is due before either claims
            found = due(*args)
            barrier.wait(10)
            return found
        notify.due = together
        try:
            threads = [threading.Thread(target=notify.run, args=(s, cfg, EVERYONE, Keys(KEY)),
                                        kwargs={"out": lambda _: None}) for s in stores]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        finally:
            notify.due = due
        listed = {}
        for rcpt, msg in sink.digests():
            for token in links(parts(msg)[0]):
                link = Keys(KEY).verify(token, time.time())
                listed.setdefault((link.entry_id, link.recipient), 0)
                listed[(link.entry_id, link.recipient)] += 1
        assert listed == {(i, r): 1 for i in ids for r in ("bob@example.com", "carol@example.com")}
        hosts = {r["host"] for i in ids for r in stores[1].get(i).meta["notified"]}
        assert len(sink.messages) >= 2 and hosts <= {"mx1.test", "mx2.test"} and hosts
    finally:
        sink.close()
        for s in stores:
            s.close()


class _RefusesQuit:
    """A sink connection that answers QUIT with 421 instead of 221, after the digest was taken."""

    def __init__(self, conn):
        self.conn = conn

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.conn.close()

    def makefile(self, *args):
        return self.conn.makefile(*args)

    def sendall(self, data):
        self.conn.sendall(b"421 4.3.0 going away\r\n" if data.startswith(b"221") else data)


def test_a_digest_taken_by_the_service_is_never_sent_again_whatever_quit_gets(tmp_path):
    """The release service takes the digest (250 after the data), then refuses QUIT: the digest
    was sent, so its claims stay and the next run sends nothing again."""
    sink = Sink()
    sink._session = lambda conn, session=sink._session: session(_RefusesQuit(conn))
    try:
        store = Q.FileStore(str(tmp_path / "q"))
        entry_id = put(store)
        errors = []
        for _ in range(2):
            assert notify.run(store, settings(sink.port), EVERYONE, Keys(KEY), out=lambda _: None,
                              err=errors.append) == notify.EXIT_OK
        assert len(sink.messages) == 1 and errors == []
        assert notify.notified(store.get(entry_id), "bob@example.com") is not None
    finally:
        sink.close()


@pytest.mark.parametrize("hostile", ["x@[a", ".:=@example.com.", "():@example.com"])
def test_a_recipient_address_the_mail_library_chokes_on_stops_only_its_own_digest(tmp_path, sink, hostile):
    """An envelope recipient that passes `deliverable` but that the email package cannot put in a
    To header: that recipient's digest is not sent and its claim is given back; the run goes on
    to the next recipients instead of dying with a traceback and their entries claimed."""
    store = Q.FileStore(str(tmp_path / "q"))
    bad = put(store, recipients=(hostile,))
    good = put(store, recipients=("zoe@example.com",))
    errors = []
    assert notify.run(store, settings(sink.port), EVERYONE, Keys(KEY), out=lambda _: None,
                      err=errors.append) == notify.EXIT_INCOMPLETE
    assert [rcpt for rcpt, _ in sink.digests()] == [["zoe@example.com"]]
    assert notify.notified(store.get(good), "zoe@example.com") is not None
    assert notify.notified(store.get(bad), hostile) is None            # given back
    assert len(errors) == 1 and "not sent" in errors[0]
