"""End to end in a real browser: mail held by policy in the real stack, `quarantine notify` sends the
digest through the release service to the sink, the link from the digest is opened in headless
Chromium (Debian's, driven by Selenium with the system's chromedriver: nothing is downloaded), the
message shown, release clicked, and the message delivered exactly once; a postmaster logs in,
searches and deletes in bulk. The refusals: an expired link, a link for another recipient's
entry, a GET of the action URL, a POST without the form token, an HTML body whose script must not
run, and wrong passwords rate-limited (last: it locks the test's address out).

With SCANMILTER_SCREENSHOTS=1 the browser's screenshots replace docs/images/digest.png, entry.png
and admin.png (docs/web.md shows them); without it nothing under docs/ is written."""
import email
import email.policy
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

import procs
from conftest import ROOT, scratch
from scanmilter.commands.selftest import eicar
from scanmilter.web import auth
from scanmilter.web.links import Keys
from support import OUTSIDE, make, not_delivered, scanmilter, wait_for

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                                 reason="Debian's chromium and chromium-driver are not installed (tools/install-deps)")]

PASSWORD = "a long passphrase for the test"
LOGIN_LIMIT = 3
SCREENSHOTS = os.environ.get("SCANMILTER_SCREENSHOTS") == "1"
IMAGES = ROOT / "docs" / "images"
POLICY = """
[inbound]
quarantine_level = 6.0
virus_action = "quarantine"
[notify]
send = true
"""


@pytest.fixture(scope="module")
def site(stack_with):
    """The stack (quarantine by policy, [notify] on for everyone) and `scanmilter web` on a free port
    over plain http on 127.0.0.1 (web_cookie_secure = false, as only loopback allows)."""
    import stack as stacklib
    work = Path(scratch("scanmilter-web-"))
    key = work / "web.key"
    key.write_bytes(os.urandom(48))
    key.chmod(0o600)
    passwords = work / "web.passwd"
    auth.write_password(str(passwords), "admin", PASSWORD)
    port, metrics_port = stacklib.free_port(), stacklib.free_port()
    settings = {"web_address": f"127.0.0.1:{port}", "web_base_url": f"http://127.0.0.1:{port}",
                "web_key_file": str(key), "web_password_file": str(passwords), "web_cookie_secure": False,
                "web_metrics_address": f"127.0.0.1:{metrics_port}", "web_login_attempt_limit": LOGIN_LIMIT,
                "notify_from": "postmaster@example.com", "web_page_size": 20}
    stack = stack_with(policy_text=POLICY, quarantine=True, scanmilter_settings=settings)
    pidfile = procs.PidFile(work / "web.pid")
    proc = procs.start([sys.executable, "-m", "scanmilter", "web", "-c", stack.milter_config], work / "web.log", work,
                       pidfile, env=dict(os.environ, PYTHONPATH=str(ROOT / "milter")))

    def up():
        if proc.poll() is not None:
            raise AssertionError(f"scanmilter web exited: {(work / 'web.log').read_text()}")
        return procs.accepts(port)
    assert procs.wait_until(up, 30), (work / "web.log").read_text()
    yield {"stack": stack, "url": f"http://127.0.0.1:{port}", "keys": Keys.from_file(str(key)),
           "metrics": f"http://127.0.0.1:{metrics_port}/metrics", "log": work / "web.log"}
    procs.stop(pidfile.entries(), 10, reap=[proc])


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    os.environ["SE_OFFLINE"] = "true"               # selenium-manager must never fetch a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1150,860",
                f"--user-data-dir={scratch('scanmilter-chromium-')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def by(driver, css):
    from selenium.webdriver.common.by import By
    return driver.find_element(By.CSS_SELECTOR, css)


def submit(driver, css):
    """Click a button that submits its form, and wait for the page that answers, fully loaded.
    Selenium's click returns before the browser has navigated, and while the old document is being
    replaced the driver may answer a question about it with an error instead of "stale"
    (chromedriver: "Node with given id does not belong to the document"). So the old page gets a
    mark before the click, the wait ends once the window shows a document without it, and an error
    from the driver meanwhile means "not yet" (30 s of them fail the test)."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait
    mark = uuid.uuid4().hex
    driver.execute_script("document.documentElement.dataset.leaving = arguments[0]", mark)
    by(driver, css).click()
    WebDriverWait(driver, 30, ignored_exceptions=(WebDriverException,)).until(
        lambda d: d.execute_script("return document.readyState === 'complete'"
                                   " && document.documentElement.dataset.leaving !== arguments[0]", mark),
        f"the page that answers {css}")


def screenshot(driver, name):
    if SCREENSHOTS:
        IMAGES.mkdir(exist_ok=True)
        driver.save_screenshot(str(IMAGES / name))


def hold(stack, subject, rcpt="bob@example.com", **kw):
    data = make(subject, **kw)
    r = stack.send(data, "alice@outside.test", [rcpt], xclient_addr=OUTSIDE)
    assert r["code"] == 250, r                      # quarantine_action = discard: the sender sees success
    return data


def entry_of(stack, marker):
    """The quarantine entry whose Subject has the marker (through the CLI, as an admin sees it)."""
    found = []

    def listed():
        r = scanmilter(stack, "quarantine", "list", "--json")
        found[:] = [line for line in r.stdout.splitlines() if marker in line]
        return bool(found)
    wait_for(listed, f"an entry with {marker}")
    import json
    [entry] = [json.loads(line) for line in found]
    return entry


def notify(stack):
    r = scanmilter(stack, "quarantine", "notify")
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def digest_for(stack, rcpt, marker):
    """The digest delivered to `rcpt` that lists `marker`, waiting for it."""
    found = []

    def arrived():
        found[:] = [d for d in stack.delivered() if d.recipients == [rcpt] and marker.encode() in d.data
                    and b"held for you" in d.data]
        return bool(found)
    wait_for(arrived, f"the digest to {rcpt} listing {marker}")
    [digest] = found
    return email.message_from_bytes(digest.data, policy=email.policy.default)


def link_in(digest, site) -> str:
    text = digest.get_body(("plain",)).get_content()
    return re.search(re.escape(site["url"]) + r"/r/[\w.-]+", text).group(0)


def copies(stack, marker) -> int:
    """Released copies of the marked message delivered (the digest that lists it is not one)."""
    stack.wait_drained()
    return sum(1 for d in stack.delivered() if marker.encode() in d.data and b"X-Quarantine-Released:" in d.data)


def http(url, data=None, headers=None):
    request = urllib.request.Request(url, data=urllib.parse.urlencode(data).encode() if data is not None else None,
                                     headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(site, name, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    text = urllib.request.urlopen(site["metrics"], timeout=10).read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


# ---------------------------------------------------------------- the recipient's way

def test_the_digest_link_opens_the_message_and_release_delivers_it_once(site, browser):
    stack, marker = site["stack"], uuid.uuid4().hex[:12]
    hold(stack, f"scanmilter-tag-test Your invoice {marker}",
         body=f"Hello Bob,\nplease find the invoice {marker} below.\nRegards\n")
    hold(stack, f"Payment advice {marker}", body="See the attachment.\n", attachment=eicar())
    assert not_delivered(stack, marker)
    spam, virus = entry_of(stack, f"invoice {marker}"), entry_of(stack, f"advice {marker}")
    assert (spam["reason"], virus["reason"]) == ("spam", "virus")
    assert "bob@example.com: digest of 2 entries sent" in notify(stack)
    digest = digest_for(stack, "bob@example.com", marker)
    assert digest["Subject"] == "2 messages held for you" and digest["From"] == "postmaster@example.com"
    link = link_in(digest, site)
    # one link only: the virus is listed for the postmaster to release
    assert len(re.findall(r"/r/", digest.get_body(("plain",)).get_content())) == 1
    assert site["keys"].verify(link.rsplit("/", 1)[1], time.time()).entry_id == spam["id"]
    shown = Path(scratch("scanmilter-digest-")) / "digest.html"
    shown.write_text(digest.get_body(("html",)).get_content())
    browser.get(shown.as_uri())
    assert f"Your invoice {marker}" in by(browser, "body").text and "postmaster only" in by(browser, "body").text
    screenshot(browser, "digest.png")

    browser.get(link)
    assert browser.title.startswith("A message held for you")
    assert f"Your invoice {marker}" in by(browser, "#subject").text
    assert f"please find the invoice {marker} below." in by(browser, "#body").text
    assert "spam" in by(browser, "#reason").text
    assert copies(stack, marker) == 0                          # showing the page delivered nothing
    screenshot(browser, "entry.png")
    submit(browser, "#release")
    assert "released to bob@example.com" in by(browser, "#message").text
    wait_for(lambda: copies(stack, marker) == 1, "the released copy")
    [delivered] = [d for d in stack.delivered() if marker.encode() in d.data and b"X-Quarantine-Released:" in d.data]
    assert delivered.recipients == ["bob@example.com"] and b"by=web_bob@example.com" in delivered.data
    # the link again, and the form posted again from the browser's history: refused, not delivered again
    browser.back()
    browser.refresh()
    assert "used already" in by(browser, "#message").text
    browser.get(link)
    assert "This link was used already" in browser.title
    assert copies(stack, marker) == 1
    released = entry_of(stack, f"invoice {marker}")["released"]
    assert [(r["by"], r["to"]) for r in released] == [("web:bob@example.com", ["bob@example.com"])]
    assert metric(site, "scanmilter_web_actions_total", who="recipient", action="release", result="done") == 1


def test_an_html_body_with_script_is_shown_inert(site, browser):
    stack, marker = site["stack"], uuid.uuid4().hex[:12]
    html = (f"<html><head><title>x</title><script>document.title = 'pwned-{marker}';</script></head><body>"
            f"<p>Dear customer {marker},</p><img src=x onerror=\"document.title = 'pwned-{marker}'\">"
            f"<p>your account <b>needs</b> attention: <a href=\"https://phish.test/login\">log in</a></p>"
            f"</body></html>")
    data = make(f"scanmilter-tag-test <script>alert(1)</script> {marker}", body="placeholder")
    msg = email.message_from_bytes(data, policy=email.policy.SMTP)
    msg.set_content(html, subtype="html")
    r = stack.send(msg.as_bytes(), "alice@outside.test", ["bob@example.com"], xclient_addr=OUTSIDE)
    assert r["code"] == 250, r
    assert not_delivered(stack, marker)
    notify(stack)
    browser.get(link_in(digest_for(stack, "bob@example.com", marker), site))
    body = by(browser, "#body").text
    assert f"Dear customer {marker}," in body and "log in [https://phish.test/login]" in body
    assert "pwned" not in browser.title and browser.title.startswith("A message held for you")
    assert "<script>alert(1)</script>" in by(browser, "#subject").text           # shown as text
    assert browser.execute_script("return document.querySelectorAll('script, img, iframe, a[href^=\"https://phish\"]')"
                                  ".length") == 0


# ---------------------------------------------------------------- refusals

def test_expired_and_misdirected_links_are_refused_with_a_clear_page(site, browser):
    stack, marker = site["stack"], uuid.uuid4().hex[:12]
    hold(stack, f"scanmilter-tag-test for bob {marker}")
    hold(stack, f"scanmilter-tag-test for carol {marker}", rcpt="carol@example.com")
    notify(stack)
    bob = link_in(digest_for(stack, "bob@example.com", f"bob {marker}"), site)
    carol_entry = entry_of(stack, f"carol {marker}")
    keys, token = site["keys"], bob.rsplit("/", 1)[1]
    good = keys.verify(token, time.time())
    expired = keys.sign(good.entry_id, good.recipient, int(time.time()) - 60, good.nonce)
    browser.get(f"{site['url']}/r/{expired}")
    assert browser.title.startswith("This link has expired") and by(browser, "#message").text
    # bob's link with carol's entry put in: the signature no longer matches
    v, _, expires, nonce, rcpt, mac = token.split(".")
    browser.get(f"{site['url']}/r/{'.'.join([v, carol_entry['id'], expires, nonce, rcpt, mac])}")
    assert browser.title.startswith("This link is not valid")
    # a link signed for bob on carol's entry (as only a leaked key could make): not his message
    browser.get(f"{site['url']}/r/{keys.sign(carol_entry['id'], 'bob@example.com', int(time.time()) + 60, nonce)}")
    assert "not for this message" in by(browser, "#message").text
    assert copies(stack, marker) == 0


def test_a_get_of_the_action_url_and_a_post_without_the_form_token_do_nothing(site, browser):
    stack, marker = site["stack"], uuid.uuid4().hex[:12]
    hold(stack, f"scanmilter-tag-test scanners click {marker}")
    notify(stack)
    link = link_in(digest_for(stack, "bob@example.com", marker), site)
    browser.get(f"{link}/release")                     # what a link scanner that guesses would do
    assert "opening it does nothing" in by(browser, "#message").text
    status, page = http(f"{link}/release", data={})    # a POST without the form token (nor its cookie)
    assert status == 403 and "did not come from this site" in page
    status, page = http(f"{link}/release", data={"csrf": "A" * 43}, headers={"Cookie": "scanmilter-form=" + "B" * 43})
    assert status == 403
    assert copies(stack, marker) == 0
    assert entry_of(stack, marker)["released"] == []
    browser.get(link)                                   # the link still works for its recipient
    assert by(browser, "#release")
    assert metric(site, "scanmilter_web_form_refusals_total") >= 2


# ---------------------------------------------------------------- the postmaster's way

def login(site, browser, password=PASSWORD, name="admin"):
    browser.get(f"{site['url']}/admin/login")
    by(browser, "#login").send_keys(name)
    by(browser, "#password").send_keys(password)
    submit(browser, "#submit")


def test_a_postmaster_logs_in_searches_and_deletes_in_bulk(site, browser):
    stack, marker = site["stack"], uuid.uuid4().hex[:12]
    group = f"team-{marker}@example.com"
    for n in range(3):
        hold(stack, f"scanmilter-tag-test offer {n} {marker}", rcpt=group)
    hold(stack, f"scanmilter-tag-test unrelated {marker}", rcpt="dave@example.com")
    assert not_delivered(stack, marker)
    login(site, browser)
    assert browser.title.startswith("Held mail") and "admin" in by(browser, "header").text
    by(browser, "#recipient").send_keys(f"team-{marker}")
    submit(browser, "#search")
    assert by(browser, "#count").text.startswith("3 entries")
    rows = [e.text for e in browser.find_elements("css selector", "table.list tbody tr")]
    assert len(rows) == 3 and all(group in row for row in rows)
    screenshot(browser, "admin.png")
    for box in browser.find_elements("css selector", "input[name=id]"):
        box.click()
    from selenium.webdriver.support.ui import Select
    Select(by(browser, "#action")).select_by_value("delete")
    submit(browser, "#apply")
    results = by(browser, "#results").text
    assert results.count(": deleted") == 3
    r = scanmilter(stack, "quarantine", "list", "--json", "--to", f"team-{marker}")
    assert r.returncode == 0 and r.stdout == ""
    assert entry_of(stack, f"unrelated {marker}")                     # the other entry stays
    assert copies(stack, marker) == 0
    # what happened to an entry, and who acted: the unrelated one, released from its page
    entry = entry_of(stack, f"unrelated {marker}")
    browser.get(f"{site['url']}/admin/entry/{entry['id']}")
    submit(browser, "#release")
    assert "released to dave@example.com" in by(browser, "#results").text
    wait_for(lambda: copies(stack, marker) == 1, "the released copy")
    browser.get(f"{site['url']}/admin/entry/{entry['id']}")
    history = by(browser, "#history").text
    assert "web-admin:admin released to dave@example.com" in history
    assert metric(site, "scanmilter_web_actions_total", who="admin", action="delete", result="done") == 3
    assert "web: " in site["log"].read_text() and "by web-admin:admin" in site["log"].read_text()


def test_wrong_passwords_are_rate_limited(site, browser):
    """Last in the module: it locks this address out for web_login_window."""
    browser.delete_all_cookies()
    for _ in range(LOGIN_LIMIT):
        login(site, browser, password="wrong")
        assert "Wrong login or password." in by(browser, "#error").text
    login(site, browser)                                             # the right password, too late
    assert "Too many failed logins" in by(browser, "#error").text
    assert browser.title.startswith("Postmaster login")
    assert metric(site, "scanmilter_web_logins_total", result="limited") == 1
