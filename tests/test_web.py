"""The review web page with Flask's test client: recipients' links (shown by GET, acted on only by a
POST with the form token, once, for that recipient), refused links, held content as inert text,
the security headers and cookies, postmasters' login (hashes, sessions, rate limits), list,
search, paging, single and bulk actions recorded with who acted, the hold backend's limits, the
metrics, and `scanmilter web passwd`. Releases go to a small SMTP server in a thread."""
import io
import re
import sys
import threading
import time

import pytest

from fakes import Sink
from scanmilter import cli, config, notify
from scanmilter import quarantine as Q
from scanmilter.commands import quarantine as QC
from scanmilter.policy import NotifyRules
from scanmilter.web import auth, text
from scanmilter.web.app import CSP, WebMetrics, create_app
from scanmilter.web.links import Keys

KEY = b"s" * 48
EVERYONE = NotifyRules(send=True)
PASSWORD = "correct horse battery staple"


class Site:
    """A store, the app over it, and helpers to hold mail and make a recipient's link."""

    def __init__(self, tmp_path, sink, store=None, secure=False, **settings):
        self.sink, self.tmp = sink, tmp_path
        tmp_path.mkdir(exist_ok=True)
        self.passwords = tmp_path / "web.passwd"
        auth.write_password(str(self.passwords), "alice", PASSWORD)
        self.store = store or Q.FileStore(str(tmp_path / "q"))
        self.cfg = config.parse(config.DAEMON_SETTINGS, {
            "quarantine_release_address": f"inet:127.0.0.1:{sink.port}", "web_password_file": str(self.passwords),
            "web_base_url": "https://q.example.com", "web_cookie_secure": secure, "web_page_size": 3, **settings},
            "test")
        self.keys, self.metrics, self.now = Keys(KEY), WebMetrics(), time.time()
        self.app = create_app(self.cfg, self.store, EVERYONE, self.keys, self.metrics, clock=lambda: self.now)
        self.client = self.app.test_client()

    def hold(self, recipients=("bob@example.com",), subject="cheap pills", reason="spam", body=None, **meta):
        data = body or f"Subject: {subject}\r\nFrom: Spammer <spammer@outside.test>\r\nTo: bob@example.com\r\n\r\n" \
                       f"Buy now, {subject}.\r\n".encode()
        return self.store.put(io.BytesIO(data), {"sender": "spammer@outside.test", "recipients": list(recipients),
                                                 "subject": subject, "reason": reason, "score": 9.5,
                                                 "direction": "inbound", "rule": "quarantine_level = 6.0 from [inbound]",
                                                 **meta})

    def link(self, entry_id, recipient="bob@example.com", lifetime=3600):
        _, nonce = notify.claim(self.store, entry_id, recipient, self.now, "test")
        return self.keys.sign(entry_id, recipient, int(self.now + lifetime), nonce)

    def get(self, url, **kw):
        return self.client.get(url, **kw)

    def post(self, url, page=None, **form):
        """POST `form` with the form token of `page` (a response), as the browser would."""
        if page is not None:
            form.setdefault("csrf", csrf(page))
        return self.client.post(url, data=form)

    def login(self, name="alice", password=PASSWORD, address="127.0.0.1"):
        form = self.get("/admin/login", environ_base={"REMOTE_ADDR": address})
        return self.client.post("/admin/login", data={"login": name, "password": password, "csrf": csrf(form)},
                                environ_base={"REMOTE_ADDR": address})

    def counted(self, name, **labels):
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


def csrf(page) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page.get_data(as_text=True)).group(1)


@pytest.fixture
def sink():
    s = Sink(extensions=("8BITMIME",))
    yield s
    s.close()


@pytest.fixture
def site(tmp_path, sink):
    return Site(tmp_path, sink)


def html(response) -> str:
    return response.get_data(as_text=True)


# ---------------------------------------------------------------- recipients

def test_a_link_shows_the_message_and_the_get_changes_nothing(site):
    entry_id = site.hold(recipients=("bob@example.com", "carol@example.com"))
    page = site.get(f"/r/{site.link(entry_id)}")
    assert page.status_code == 200
    body = html(page)
    assert "cheap pills" in body and "spammer@outside.test" in body and "Buy now, cheap pills." in body
    assert "spam score 9.5" in body and 'id="release"' in body and 'id="delete"' in body
    assert site.sink.messages == [] and not site.store.get(entry_id).released
    assert "used" not in notify.notified(site.store.get(entry_id), "bob@example.com")
    assert site.counted("scanmilter_web_links_total", result="shown") == 1


def test_release_is_a_post_with_the_form_token_to_that_recipient_only_and_once(site):
    entry_id = site.hold(recipients=("bob@example.com", "carol@example.com"))
    token = site.link(entry_id)
    page = site.get(f"/r/{token}")
    done = site.post(f"/r/{token}/release", page)
    assert done.status_code == 200 and "released to bob@example.com" in html(done)
    [sent] = site.sink.messages
    assert sent["rcpt"] == ["bob@example.com"]
    assert re.search(rb"^X-Quarantine-Released: id=" + entry_id.encode() + rb", by=web_bob@example.com",
                     sent["data"], re.M)
    entry = site.store.get(entry_id)
    assert [(r["by"], r["to"]) for r in entry.released] == [("web:bob@example.com", ["bob@example.com"])]
    assert notify.notified(entry, "bob@example.com")["used"]["action"] == "release"
    # the same link again: refused, nothing delivered twice
    again = site.post(f"/r/{token}/release", page)
    assert again.status_code == 410 and "used already" in html(again)
    shown = site.get(f"/r/{token}")
    assert shown.status_code == 410 and "was released to you" in html(shown)
    assert len(site.sink.messages) == 1
    assert site.counted("scanmilter_web_actions_total", who="recipient", action="release", result="done") == 1


def test_a_get_to_the_action_url_does_nothing(site):
    entry_id = site.hold()
    token = site.link(entry_id)
    for action in ("release", "delete"):
        r = site.get(f"/r/{token}/{action}")
        assert r.status_code == 405 and "opening it does nothing" in html(r)
    assert site.sink.messages == [] and site.store.get(entry_id).released == []


def test_a_post_without_the_right_form_token_is_refused(site, tmp_path):
    entry_id = site.hold()
    token = site.link(entry_id)
    page = site.get(f"/r/{token}")
    other = site.link(site.hold(subject="another"))
    other_page = site.get(f"/r/{other}")
    stranger = site.app.test_client()                           # another browser: its own form cookie
    stranger.get(f"/r/{token}")
    for attempt in (lambda: site.client.post(f"/r/{token}/release"),                          # no token
                    lambda: site.client.post(f"/r/{token}/release", data={"csrf": "x" * 43}),  # a wrong one
                    lambda: site.post(f"/r/{token}/release", other_page),                   # another link's
                    lambda: stranger.post(f"/r/{token}/release", data={"csrf": csrf(page)})):  # another browser's
        r = attempt()
        assert r.status_code == 403 and "did not come from this site" in html(r)
    # a browser without the form cookie (a scanner): refused too
    fresh = site.app.test_client()
    assert fresh.post(f"/r/{token}/release", data={"csrf": csrf(page)}).status_code == 403
    assert site.sink.messages == [] and site.store.get(entry_id).released == []
    assert site.counted("scanmilter_web_form_refusals_total") == 5


def test_expired_forged_and_misdirected_links_are_refused_with_a_clear_page(site):
    entry_id = site.hold()
    token = site.link(entry_id)
    carol_entry = site.hold(recipients=("carol@example.com",))
    carol_token = site.link(carol_entry, "carol@example.com")
    expired = site.keys.sign(entry_id, "bob@example.com", int(site.now - 1),
                             notify.notified(site.store.get(entry_id), "bob@example.com")["nonce"])
    v, _, expires, nonce, rcpt, mac = token.split(".")
    cases = {
        expired: (410, "This link has expired"),
        token[:-3]: (403, "This link is not valid"),
        ".".join([v, carol_entry, expires, nonce, rcpt, mac]): (403, "This link is not valid"),   # bob's on carol's
        # a correctly signed link for bob on carol's entry (as if the key leaked): not one of its recipients
        site.keys.sign(carol_entry, "bob@example.com", int(site.now + 60), nonce): (403, "not for this message"),
        # signed, but not the nonce the digest recorded
        site.keys.sign(entry_id, "bob@example.com", int(site.now + 60), "0" * 16): (403, "not valid any more"),
        "garbage": (403, "This link is not valid"),
    }
    for bad, (status, said) in cases.items():
        page = site.get(f"/r/{bad}")
        assert page.status_code == status and said in html(page), bad
        assert 'id="release"' not in html(page)
        # with a good form token (this browser's cookie, this link): the link itself is refused
        cookie = site.client.get_cookie("scanmilter-form").value
        posted = site.post(f"/r/{bad}/release", csrf=site.keys.form_token(cookie, f"r:{bad}"))
        assert posted.status_code == status and said in html(posted), bad
    good = site.get(f"/r/{carol_token}")
    assert good.status_code == 200
    site.store.delete(carol_entry)
    gone = site.get(f"/r/{carol_token}")
    assert gone.status_code == 410 and "no longer held" in html(gone)
    assert site.sink.messages == []
    assert site.counted("scanmilter_web_links_total", result="expired") == 1


def test_delete_drops_the_recipients_copy_and_the_entry_goes_with_the_last(site):
    entry_id = site.hold(recipients=("bob@example.com", "carol@example.com"))
    bob, carol = site.link(entry_id), site.link(entry_id, "carol@example.com")
    r = site.post(f"/r/{bob}/delete", site.get(f"/r/{bob}"))
    assert r.status_code == 200 and "deleted for you" in html(r)
    assert notify.notified(site.store.get(entry_id), "bob@example.com")["used"]["action"] == "delete"
    assert site.get(f"/r/{bob}").status_code == 410
    r = site.post(f"/r/{carol}/delete", site.get(f"/r/{carol}"))
    assert r.status_code == 200
    with pytest.raises(Q.NotFound):
        site.store.get(entry_id)
    assert site.sink.messages == []


def test_a_reason_only_the_postmaster_releases_is_never_released_by_a_link(site):
    entry_id = site.hold(reason="virus", viruses=["Eicar-Test-Signature"])
    token = site.link(entry_id)
    page = site.get(f"/r/{token}")
    assert "can be released only by the postmaster" in html(page) and 'id="release"' not in html(page)
    r = site.post(f"/r/{token}/release", page)
    assert r.status_code == 403 and "only by the postmaster" in html(r)
    assert site.sink.messages == [] and "used" not in notify.notified(site.store.get(entry_id), "bob@example.com")


def test_held_html_is_shown_as_inert_text_and_every_page_has_the_security_headers(site):
    body = (b"Subject: =?utf-8?q?<b>bold</b>?=\r\nFrom: <x@outside.test>\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/html; charset=utf-8\r\n\r\n"
            b"<html><head><title>t</title><script>document.title='pwned'</script>"
            b"<style>p{color:red}</style></head><body><p>Dear <b>customer</b>,</p>"
            b"<img src=x onerror=\"document.title='pwned'\"><a href=\"https://evil.test/x\">click</a>"
            b"<!-- <script>alert(1)</script> --><p>\xe2\x80\xaebye</p></body></html>\r\n")
    entry_id = site.hold(subject="<script>alert(1)</script>", body=body)
    page = site.get(f"/r/{site.link(entry_id)}")
    shown = html(page)
    assert "Dear customer," in shown and "click [https://evil.test/x]" in shown and "?bye" in shown
    assert "pwned" not in shown and "color:red" not in shown and "<img" not in shown and "<b>" not in shown
    assert "<script>" not in shown and "&lt;script&gt;alert(1)&lt;/script&gt;" in shown
    assert "&lt;b&gt;bold&lt;/b&gt;" in shown and "written in HTML" in shown
    for response in (page, site.get("/admin/login"), site.get("/nowhere"), site.get("/r/x/release")):
        h = response.headers
        assert h["Content-Security-Policy"] == CSP and "script-src" not in CSP and "default-src 'none'" in CSP
        assert "form-action 'self'" in CSP and "frame-ancestors 'none'" in CSP
        assert h["X-Content-Type-Options"] == "nosniff" and h["Referrer-Policy"] == "no-referrer"
        assert h["Cache-Control"] == "no-store" and "<script" not in html(response)


def test_html_to_text_keeps_only_what_a_reader_sees():
    assert text.html_to_text("<p>a<script>x()</script>b</p><style>.c{}</style><br>c&amp;d<!-- e -->") == "ab\n\nc&d"
    assert text.html_to_text("<a href='u'>t</a><noscript>n</noscript><svg><text>s</text></svg>") == "t [u]"
    # as a browser tokenizes it: a tag named "scr<script", then text (shown escaped, inert)
    assert text.html_to_text("<scr<script>ipt>alert(1)</script>") == "ipt>alert(1)"
    assert text.html_to_text('<p title="<script>">x</p><script>a</script') == "x"
    assert text.safe("a\u202eb\x1b[0m\r\nc") == "a?b?[0m c"


def test_cookies_are_secure_httponly_and_strict_and_the_page_works_over_https(tmp_path, sink):
    site = Site(tmp_path, sink, secure=True)
    entry_id = site.hold()
    token = site.link(entry_id)
    page = site.client.get(f"/r/{token}", base_url="https://q.example.com")
    cookie = page.headers["Set-Cookie"]
    assert cookie.startswith("__Host-scanmilter-form=") and "Secure" in cookie and "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie and "Path=/" in cookie and "Domain" not in cookie
    done = site.client.post(f"/r/{token}/release", data={"csrf": csrf(page)}, base_url="https://q.example.com")
    assert done.status_code == 200 and len(sink.messages) == 1
    form = site.client.get("/admin/login", base_url="https://q.example.com")
    login = site.client.post("/admin/login", data={"login": "alice", "password": PASSWORD, "csrf": csrf(form)},
                             base_url="https://q.example.com")
    session = login.headers["Set-Cookie"]
    assert session.startswith("__Host-scanmilter-session=") and "Secure" in session and "HttpOnly" in session
    assert "SameSite=Strict" in session


def test_web_cookie_secure_off_is_refused_off_loopback(tmp_path, capsys):
    key = tmp_path / "key"
    key.write_bytes(KEY)
    key.chmod(0o600)
    conf = tmp_path / "scanmilter.toml"
    conf.write_text(f'quarantine_directory = "{tmp_path / "q"}"\nweb_key_file = "{key}"\n'
                    'web_cookie_secure = false\nweb_address = "0.0.0.0:8025"\n')
    assert cli.main(["web", "-c", str(conf)]) == 2
    assert "web_cookie_secure = false is allowed only with web_address on loopback" in capsys.readouterr().err


# ---------------------------------------------------------------- postmasters

def test_login_needs_the_right_password_and_logout_ends_the_session(site):
    assert site.get("/admin/").status_code == 303
    assert site.login(password="wrong").status_code == 401
    assert site.login(name="mallory").status_code == 401
    r = site.login()
    assert r.status_code == 303 and r.headers["Location"].endswith("/admin/")
    assert "SameSite=Strict" in r.headers["Set-Cookie"] and "HttpOnly" in r.headers["Set-Cookie"]
    listing = site.get("/admin/")
    assert listing.status_code == 200 and "alice" in html(listing)
    stolen = site.client.get_cookie("scanmilter-session").value
    site.post("/admin/logout", listing)
    assert site.get("/admin/").status_code == 303
    other = site.app.test_client()
    other.set_cookie("scanmilter-session", stolen)
    assert other.get("/admin/").status_code == 303                   # the server forgot it
    assert site.counted("scanmilter_web_logins_total", result="ok") == 1
    assert site.counted("scanmilter_web_logins_total", result="failed") == 2


def test_wrong_passwords_are_rate_limited_per_address_and_per_login(site):
    limit = site.cfg.web_login_attempt_limit
    for _ in range(limit):
        assert site.login(password="wrong", address="192.0.2.1").status_code == 401
    refused = site.login(address="192.0.2.1")                 # even the right password, now
    assert refused.status_code == 429 and "Too many failed logins" in html(refused)
    assert site.login(address="192.0.2.2").status_code == 429          # alice's login, from elsewhere
    for n in range(limit):                                             # another login, one address
        site.login(name=f"user{n}", password="wrong", address="198.51.100.7")
    assert site.login(name="bob", password="x", address="198.51.100.7").status_code == 429
    site.now += site.cfg.web_login_window + 1                          # the window passes
    assert site.login(address="192.0.2.1").status_code == 303
    assert site.counted("scanmilter_web_logins_total", result="limited") == 3


def test_a_login_without_the_form_token_is_refused(site):
    r = site.client.post("/admin/login", data={"login": "alice", "password": PASSWORD})
    assert r.status_code == 403 and "scanmilter-session" not in r.headers.get("Set-Cookie", "")
    assert site.get("/admin/").status_code == 303


def test_the_list_filters_and_pages(site):
    for n in range(4):
        site.hold(subject=f"spam {n}", recipients=(f"user{n}@example.com",))
    site.hold(subject="a virus", reason="virus", sender="worm@bad.test")
    site.hold(subject="old", time=site.now - 10 * 86400)
    site.login()
    first = html(site.get("/admin/"))
    assert "6 entries" in first and "Page 1 of 2" in first and first.count('name="id"') == 3
    assert 'id="next"' in first
    second = html(site.get("/admin/?page=2"))
    assert second.count('name="id"') == 3 and "old" in second
    assert "1 entry" in html(site.get("/admin/?reason=virus")) and "a virus" in html(site.get("/admin/?reason=virus"))
    assert "1 entry" in html(site.get("/admin/?sender=WORM"))
    assert "1 entry" in html(site.get("/admin/?recipient=user2@"))
    assert "5 entries" in html(site.get("/admin/?age=7"))
    assert "0 entries" in html(site.get("/admin/?sender=%25"))          # matched literally


class Learner:
    def __init__(self):
        self.taught = []

    def tell(self, data, message_class):
        self.taught.append(message_class)
        return True


def test_admin_actions_one_at_a_time_and_in_bulk_are_recorded_with_who_acted(site, monkeypatch):
    learner = Learner()
    monkeypatch.setattr(QC, "_learner", lambda cfg: ("spamd", lambda: learner))
    one, two, three, four = (site.hold(subject=f"offer {n}", recipients=("bob@example.com", "carol@example.com"))
                             for n in range(4))
    site.login()
    page = site.get(f"/admin/entry/{one}")
    assert "offer 0" in html(page) and "quarantine_level = 6.0 from [inbound]" in html(page)
    r = site.post(f"/admin/entry/{one}/release_learn", page)
    assert "released to bob@example.com, carol@example.com, learned as ham" in html(r)
    assert [m["rcpt"] for m in site.sink.messages] == [["bob@example.com", "carol@example.com"]]
    assert learner.taught == ["ham"]
    history = html(site.get(f"/admin/entry/{one}"))
    assert "web-admin:alice" in history and "learned as ham" in history and "released to bob@example.com" in history
    again = site.post(f"/admin/entry/{one}/release", page)
    assert "already released" in html(again)
    assert len(site.sink.messages) == 1
    site.post(f"/admin/entry/{two}/confirm", page)
    assert learner.taught == ["ham", "spam"] and site.store.get(two).learned[0]["by"] == "web-admin:alice"
    listing = site.get("/admin/")
    r = site.post("/admin/bulk", listing, action="delete", id=[two, three])
    assert html(r).count("deleted") == 2
    assert {e.id for e in site.store.select()} == {one, four}
    assert site.counted("scanmilter_web_actions_total", who="admin", action="delete", result="done") == 2
    assert site.counted("scanmilter_web_actions_total", who="admin", action="release", result="failed") == 1
    # the tallies the daemon exports count web actions too (the same store code)
    assert site.store.tallies()["release"] == 1 and site.store.tallies()["delete"] == 2


def test_admin_posts_need_a_session_and_the_form_token(site):
    entry_id = site.hold()
    assert site.client.post("/admin/bulk", data={"action": "delete", "id": entry_id}).status_code == 303
    assert site.client.post(f"/admin/entry/{entry_id}/delete").status_code == 303
    site.login()
    r = site.client.post(f"/admin/entry/{entry_id}/delete", data={"csrf": "nope"})
    assert r.status_code == 403
    r = site.client.post("/admin/bulk", data={"action": "delete", "id": entry_id})
    assert r.status_code == 403
    assert site.get(f"/admin/entry/{entry_id}/delete").status_code == 405
    assert site.store.get(entry_id)
    listing = site.get("/admin/")
    too_many = site.post("/admin/bulk", listing, action="delete", id=[entry_id] * 2 + [f"{n:024x}" for n in range(300)])
    assert too_many.status_code == 400 and "web_bulk_limit" in html(too_many)
    assert site.store.get(entry_id)


def test_the_hold_backend_lets_a_recipient_act_only_on_a_message_of_their_own(tmp_path, sink):
    class FakeHold(Q.FileStore):
        """The parts of the hold store the page relies on: one whole-message release and delete."""
        in_postfix_queue = True

        def __init__(self, directory):
            super().__init__(directory)
            self.calls = []

        def release(self, entry_id, by, to=None, keep_message=False):
            self.calls.append(("release", entry_id, by, to))
            with self.locked(entry_id) as entry:
                entry.meta["released"].append({"at": time.time(), "by": by, "to": list(entry.recipients)})
                self.update(entry)
            return list(entry.recipients)

        def delete(self, entry_id, action="delete", by=""):
            self.calls.append(("delete", entry_id, by))
            super().delete(entry_id, action)

    site = Site(tmp_path, sink, store=FakeHold(str(tmp_path / "hold")))
    shared = site.hold(recipients=("bob@example.com", "carol@example.com"))
    token = site.link(shared)
    page = site.get(f"/r/{token}")
    assert "can only release it to all of them at once" in html(page) and 'id="release"' not in html(page)
    assert 'id="delete"' not in html(page)
    made = site.keys.form_token(site.client.get_cookie("scanmilter-form").value, f"r:{token}")    # no form shown
    assert site.post(f"/r/{token}/release", csrf=made).status_code == 403
    assert site.post(f"/r/{token}/delete", csrf=made).status_code == 403
    own = site.hold()
    token = site.link(own)
    assert site.post(f"/r/{token}/release", site.get(f"/r/{token}")).status_code == 200
    assert site.store.calls == [("release", own, "web:bob@example.com", None)]
    site.login()
    listing = site.get("/admin/")
    site.post("/admin/bulk", listing, action="delete", id=[shared])
    assert site.store.calls[-1] == ("delete", shared, "web-admin:alice")


def test_passwd_writes_a_hash_the_login_accepts(tmp_path, monkeypatch, capsys):
    conf = tmp_path / "scanmilter.toml"
    passwords = tmp_path / "web.passwd"
    conf.write_text(f'web_password_file = "{passwords}"\n')
    monkeypatch.setattr(sys, "stdin", io.StringIO("s3cret pass\n"))
    assert cli.main(["web", "passwd", "alice", "--password-stdin", "-c", str(conf)]) == 0
    assert "added alice" in capsys.readouterr().out
    assert oct(passwords.stat().st_mode & 0o777) == "0o640"
    monkeypatch.setattr(sys, "stdin", io.StringIO("other\n"))
    assert cli.main(["web", "-c", str(conf), "passwd", "bob", "--password-stdin"]) == 0
    users = auth.read_passwords(str(passwords))
    assert set(users) == {"alice", "bob"} and users["alice"].startswith("scrypt$16384$8$1$")
    assert auth.check_password(users["alice"], "s3cret pass") and not auth.check_password(users["alice"], "s3cret")
    assert not auth.check_password(None, "s3cret pass") and not auth.check_password("plain", "plain")
    monkeypatch.setattr(sys, "stdin", io.StringIO("changed\n"))
    assert cli.main(["web", "passwd", "alice", "--password-stdin", "-c", str(conf)]) == 0
    assert auth.check_password(auth.read_passwords(str(passwords))["alice"], "changed")
    assert cli.main(["web", "passwd", "bad:login", "--password-stdin", "-c", str(conf)]) == 2
    passwords.chmod(0o644)
    with pytest.raises(config.ConfigError, match="open to others"):
        auth.read_passwords(str(passwords))


def test_an_unknown_login_costs_as_much_as_a_known_one():
    stored = auth.hash_password("x")
    start = time.perf_counter()
    for _ in range(3):
        auth.check_password(stored, "y")
    known = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(3):
        auth.check_password(None, "y")
    unknown = time.perf_counter() - start
    assert unknown > known / 3          # scrypt ran for the unknown login too (an early return is ~1000x faster)


@pytest.mark.integration
def test_on_postgresql_a_link_releases_once_and_the_events_say_who(database, tmp_path, sink):
    """The same page over the PostgreSQL store: the link's release and the copy's deletion happen
    in the entry's row-locked transaction, and the database's events record who acted."""
    import psycopg
    from scanmilter import db
    from scanmilter.quarantine import postgres as PG
    with psycopg.connect(database, autocommit=True) as conn:
        db.migrate(conn)
    store = PG.PgStore(db.Database(database, connect_timeout=2), "mx1.test", f"inet:127.0.0.1:{sink.port}", "web")
    try:
        site = Site(tmp_path, sink, store=store)
        entry_id = site.hold(recipients=("bob@example.com", "carol@example.com"))
        bob, carol = site.link(entry_id), site.link(entry_id, "carol@example.com")
        page = site.get(f"/r/{bob}")
        assert site.post(f"/r/{bob}/release", page).status_code == 200
        assert site.post(f"/r/{bob}/release", page).status_code == 410
        assert [m["rcpt"] for m in sink.messages] == [["bob@example.com"]]
        assert site.post(f"/r/{carol}/delete", site.get(f"/r/{carol}")).status_code == 200
        with pytest.raises(Q.NotFound):
            store.get(entry_id)
        with psycopg.connect(database, autocommit=True) as conn:
            events = conn.execute("SELECT actor, action FROM quarantine_events WHERE entry_id = %s ORDER BY seq",
                                  (entry_id,)).fetchall()
        assert ("web:bob@example.com", "release") in events and events[-1] == ("web:carol@example.com", "delete")
    finally:
        store.close()


def _within(seconds, call):
    """call() in a thread: its result, or None when it has not returned within `seconds`."""
    result = []
    worker = threading.Thread(target=lambda: result.append(call()), daemon=True)
    worker.start()
    worker.join(seconds)
    return result[0] if result else None


HOSTILE_BODIES = {
    # html.parser rescans the rest of the input for each unclosed tag: hours of CPU for 1 MB
    "unclosed tags": b"Content-Type: text/html\r\n\r\n" + b"<a " * 200000,
    # the email package's parameter parser: tens of seconds for a 250 KB Content-Type
    "a header of many parameters": b"Content-Type: text/plain; " + b"a=b; " * 50000 + b"\r\n\r\nhidden",
    # nested multiparts, each with its own boundary: RecursionError in the parser (a 500 before)
    "deeply nested parts": b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n" + b"".join(
        b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (n, n + 1) for n in range(3000)),
}


@pytest.mark.parametrize("kind", list(HOSTILE_BODIES))
def test_a_message_made_to_be_slow_to_render_costs_a_page_at_most_web_render_timeout(tmp_path, sink, kind):
    """Held mail whose body makes Python's parsers work for minutes or hours (or crash) is rendered
    in a child process killed after web_render_timeout: the recipient's page and the postmaster's
    come back at once with the message's facts and the buttons, without its body; ordinary mail
    is shown as before."""
    site = Site(tmp_path, sink, web_render_timeout=2.0)
    head = b"Subject: slow\r\nFrom: <x@outside.test>\r\nMIME-Version: 1.0\r\n"
    entry_id = site.hold(body=head + HOSTILE_BODIES[kind])
    page = _within(60, lambda: site.get(f"/r/{site.link(entry_id)}"))
    assert page is not None, "the page did not come back within 60 s"
    assert page.status_code == 200 and 'id="release"' in html(page) and "could not be shown" in html(page)
    site.login()
    admin = _within(60, lambda: site.get(f"/admin/entry/{entry_id}"))
    assert admin is not None and admin.status_code == 200 and "could not be shown" in html(admin)
    plain = site.hold(subject="plain")
    shown = html(site.get(f"/r/{site.link(plain)}"))
    assert "Buy now, plain." in shown and "could not be shown" not in shown
