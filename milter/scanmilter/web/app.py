"""The review web page: a Flask application, served by waitress (command.py).

  GET  /r/TOKEN                a recipient's link from a digest: the message, and the forms below
  POST /r/TOKEN/release        release it to that recipient (form token required)
  POST /r/TOKEN/delete         drop that recipient's copy (form token required)
  GET  /admin/login, POST      postmasters log in (rate limited)
  GET  /admin/                 held mail: filters (reason, sender, recipient, age), paging, bulk actions
  GET  /admin/entry/ID         one entry: why, what became of it and who acted, headers, text
  POST /admin/entry/ID/ACTION  release, release_learn, delete, confirm (form token required)
  POST /admin/bulk             one action on the ticked entries (at most web_bulk_limit)
  POST /admin/logout

SECURITY: a GET never changes anything (mail security products follow every link in a message);
every POST carries a form token, an HMAC of a random cookie (SameSite=Strict, HttpOnly, Secure)
and of what the form acts on (links.py), so another site cannot make a browser post, and a
scanner that does not keep cookies cannot either. Held content is shown only as text (text.py,
made in a child process killed after web_render_timeout), in autoescaped templates, under a
Content-Security-Policy that allows no script at all, no framing and forms only to this site;
Referrer-Policy no-referrer keeps link tokens out of other sites' logs, and pages are not cached.
"""
from __future__ import annotations

import re
import secrets
import time
from urllib.parse import urlencode

from flask import Flask, abort, make_response, redirect, render_template, request
from prometheus_client import CollectorRegistry, Counter

from .. import __version__
from ..logs import escape, log
from ..quarantine.store import NotFound, StoreError
from ..config import ConfigError
from . import actions, text
from .auth import LoginLimiter, Sessions, check_password, read_passwords

CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; "
       "base-uri 'none'")
_ENTRY_ID = re.compile(r"[0-9A-Za-z]{1,40}")
ADMIN_ACTIONS = ("release", "release_learn", "delete", "confirm")
AGES = {"1": 86400, "7": 7 * 86400, "30": 30 * 86400}       # the list's "held within" filter, in days


class WebMetrics:
    """The web page's own counters, on its own registry (web_metrics_address). Labels from closed
    sets only."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self.actions = Counter("scanmilter_web_actions_total",
                               "Actions on held entries through the web page, by who (recipient or admin), action "
                               "and result (done, refused, failed)", ["who", "action", "result"], registry=r)
        self.links = Counter("scanmilter_web_links_total",
                             "Recipients' links opened, by result (shown, forged, expired, used, gone, other)",
                             ["result"], registry=r)
        self.logins = Counter("scanmilter_web_logins_total", "Postmaster logins by result (ok, failed, limited)",
                              ["result"], registry=r)
        self.form_refusals = Counter("scanmilter_web_form_refusals_total",
                                     "POSTs refused for a missing or wrong form token", registry=r)


def create_app(cfg, store, rules, keys, metrics: WebMetrics | None = None, clock=time.time) -> Flask:
    """The application over one store. `rules`: the policy's [notify] rules (admin-only reasons);
    `keys`: links.Keys of web_key_file."""
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=1024 * 1024, TEMPLATES_AUTO_RELOAD=False)
    metrics = metrics or WebMetrics()
    sessions = Sessions(cfg.web_session_lifetime)
    limiter = LoginLimiter(cfg.web_login_attempt_limit, cfg.web_login_window)
    secure = cfg.web_cookie_secure
    # __Host-: the browser takes the cookie only over HTTPS, for this host and path /, from no subdomain
    form_cookie, session_cookie = ("__Host-scanmilter-form", "__Host-scanmilter-session") if secure else \
        ("scanmilter-form", "scanmilter-session")
    hold = getattr(store, "in_postfix_queue", False)
    app.extensions["scanmilter"] = {"metrics": metrics, "sessions": sessions, "limiter": limiter}

    def set_cookie(response, name, value, max_age=None):
        response.set_cookie(name, value, max_age=max_age, path="/", secure=secure, httponly=True, samesite="Strict")

    def form_cookie_value() -> tuple[str, bool]:
        """(this browser's form cookie, whether it is new and must be set)."""
        value = request.cookies.get(form_cookie, "")
        if re.fullmatch(r"[A-Za-z0-9_-]{32,64}", value):
            return value, False
        return secrets.token_urlsafe(32), True

    def page(template, status=200, **values):
        cookie, new = form_cookie_value()
        values.setdefault("form_token", lambda scope: keys.form_token(cookie, scope))
        response = make_response(render_template(template, version=__version__, hold=hold, **values), status)
        if new:
            set_cookie(response, form_cookie, cookie)
        return response

    def form_ok(scope: str) -> bool:
        ok = keys.form_token_ok(request.cookies.get(form_cookie), scope, request.form.get("csrf"))
        if not ok:
            metrics.form_refusals.inc()
        return ok

    def refused_form():
        return page("refused.html", 403, title="This form cannot be used",
                    message="The form has expired or did not come from this site. Go back, reload the page and "
                            "try again.")

    @app.after_request
    def headers(response):
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Cross-Origin-Opener-Policy"] = "same-origin"
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.errorhandler(404)
    def not_found(_):
        return page("refused.html", 404, title="Not found", message="There is no such page.")

    @app.errorhandler(405)
    def wrong_method(_):
        return page("refused.html", 405, title="Nothing was done",
                    message="This address only acts on the buttons of its page; opening it does nothing.")

    @app.errorhandler(413)
    def too_large(_):
        return page("refused.html", 413, title="Too large", message="The request is too large.")

    @app.route("/")
    def home():
        return page("home.html", title="Held mail")

    # ---------------------------------------------------------------- recipients

    def refused_link(e: actions.Refused, status=403):
        titles = {"expired": "This link has expired", "used": "This link was used already",
                  "gone": "This message is no longer held", "forged": "This link is not valid",
                  "other": "This link is not valid"}
        return page("refused.html", 410 if e.kind in ("expired", "used", "gone") else status,
                    title=titles.get(e.kind, "Nothing was done"), message=str(e))

    def rendering(entry_id, limit, all_headers=False):
        try:
            data = store.message(entry_id)
        except NotFound:
            raise
        except StoreError as e:
            log.warning("web: cannot read %s: %s", entry_id, escape(str(e)))
            return text.Rendering(body="(the message cannot be read right now)", body_kind="raw")
        try:
            return text.render_apart(data, limit, all_headers, cfg.web_render_timeout)
        except text.RenderError as e:
            log.warning("web: %s is shown without its content: %s", entry_id, escape(str(e), 500))
            return text.Rendering(body="(the content of this message could not be shown: it is too complex to "
                                       "make into text here; the postmaster can read it with `scanmilter "
                                       "quarantine show`)", body_kind="raw")

    @app.get("/r/<token>")
    def recipient_entry(token):
        try:
            link, entry = actions.open_link(store, keys, token, clock())
            shown = rendering(entry.id, cfg.web_preview_limit)
        except actions.Refused as e:
            metrics.links.labels(e.kind).inc()
            return refused_link(e)
        except NotFound:
            metrics.links.labels("gone").inc()
            return refused_link(actions.Refused("gone", "this message is no longer held: it was released, "
                                                        "deleted or expired"))
        metrics.links.labels("shown").inc()
        return page("entry.html", title="A message held for you", token=token, entry=summary(entry),
                    recipient=text.safe(link.recipient), shown=shown,
                    why_not_release=actions.why_not_release(store, entry, link.recipient, rules),
                    why_not_delete=actions.why_not_delete(store, entry), expires=when(link.expires))

    @app.post("/r/<token>/<action>")
    def recipient_act(token, action):
        if action not in ("release", "delete"):
            abort(404)
        if not form_ok(f"r:{token}"):
            metrics.actions.labels("recipient", action, "refused").inc()
            return refused_form()
        try:
            if action == "release":
                sent = actions.recipient_release(store, cfg, keys, rules, token, clock())
                message = f"The message was released to {', '.join(sent)}: it will arrive in a moment."
            else:
                actions.recipient_delete(store, keys, token, clock())
                message = "The message was deleted for you."
        except actions.Refused as e:
            metrics.actions.labels("recipient", action, "failed" if e.kind == "failed" else "refused").inc()
            return refused_link(e, 503 if e.kind == "failed" else 403)
        metrics.actions.labels("recipient", action, "done").inc()
        return page("done.html", title="Done", message=message)

    # ---------------------------------------------------------------- postmasters

    def admin():
        return sessions.get(request.cookies.get(session_cookie), clock())

    def client() -> str:
        return request.remote_addr or "?"

    @app.get("/admin/login")
    def login_form():
        if admin():
            return redirect("/admin/", 303)
        return page("login.html", title="Postmaster login", error="")

    @app.post("/admin/login")
    def login():
        login_name = request.form.get("login", "")[:64]
        password = request.form.get("password", "")
        if not form_ok("login"):
            return refused_form()
        now = clock()
        wait = limiter.wait(client(), login_name, now)
        if wait:
            metrics.logins.labels("limited").inc()
            log.warning("web: login as %s from %s refused: too many failures", escape(login_name, 64), client())
            return page("login.html", 429, title="Postmaster login",
                        error=f"Too many failed logins. Try again in {int(wait // 60) + 1} minutes.")
        try:
            stored = read_passwords(cfg.web_password_file).get(login_name)
        except ConfigError as e:
            log.error("web: %s", escape(str(e)))
            return page("login.html", 503, title="Postmaster login", error="Logins are not set up on this site.")
        if not check_password(stored, password):
            limiter.failed(client(), login_name, now)
            metrics.logins.labels("failed").inc()
            log.warning("web: failed login as %s from %s", escape(login_name, 64), client())
            return page("login.html", 401, title="Postmaster login", error="Wrong login or password.")
        metrics.logins.labels("ok").inc()
        log.info("web: %s logged in from %s", login_name, client())
        response = redirect("/admin/", 303)
        set_cookie(response, session_cookie, sessions.create(login_name, now), int(cfg.web_session_lifetime))
        return response

    @app.post("/admin/logout")
    def logout():
        session = admin()
        if session and form_ok(f"admin:{session.form_key}"):
            sessions.end(request.cookies.get(session_cookie))
        response = redirect("/admin/login", 303)
        response.delete_cookie(session_cookie, path="/", secure=secure, httponly=True, samesite="Strict")
        return response

    def filters() -> dict:
        age = request.args.get("age", "")
        return {"reason": request.args.get("reason", "")[:40], "sender": request.args.get("sender", "")[:200],
                "recipient": request.args.get("recipient", "")[:200],
                "since": clock() - AGES[age] if age in AGES else None}

    @app.get("/admin/")
    def admin_list():
        session = admin()
        if not session:
            return redirect("/admin/login", 303)
        try:
            number = max(int(request.args.get("page", "1")), 1)
        except ValueError:
            number = 1
        chosen = filters()
        try:
            entries, matching, size = store.listing(cfg.web_page_size, (number - 1) * cfg.web_page_size, **chosen)
            reasons = sorted(store.stats()["by_reason"])
        except StoreError as e:
            return page("refused.html", 503, title="The quarantine cannot be read", message=str(e), admin=session)
        pages = max(-(-matching // cfg.web_page_size), 1)
        args = {k: v for k, v in request.args.items() if k != "page" and k in ("reason", "sender", "recipient", "age")}
        return page("list.html", title="Held mail", admin=session, entries=[summary(e) for e in entries],
                    matching=matching, size=size, number=number, pages=pages, reasons=reasons,
                    args=args, query=lambda n: "?" + urlencode({**args, "page": n}),
                    bulk_limit=cfg.web_bulk_limit)

    def entry_or_404(entry_id):
        if not _ENTRY_ID.fullmatch(entry_id):
            abort(404)
        try:
            return store.get(entry_id)
        except NotFound:
            return None

    @app.get("/admin/entry/<entry_id>")
    def admin_entry(entry_id):
        session = admin()
        if not session:
            return redirect("/admin/login", 303)
        entry = entry_or_404(entry_id)
        if entry is None:
            return page("refused.html", 404, title="No such entry", admin=session,
                        message=f"Entry {entry_id} is not held (any more): released and purged, deleted, or "
                                "never held.")
        try:
            shown = rendering(entry.id, cfg.web_preview_limit, all_headers=True)
        except NotFound:
            shown = text.Rendering(body="(gone meanwhile)", body_kind="raw")
        return page("admin_entry.html", title=f"Entry {entry.id}", admin=session, entry=summary(entry),
                    history=history(entry), shown=shown, actions=ADMIN_ACTIONS)

    def run_actions(session, ids, action):
        results = []
        for entry_id in ids:
            if not _ENTRY_ID.fullmatch(entry_id):
                continue
            try:
                done = actions.admin_act(store, cfg, entry_id, action, session.login)
                metrics.actions.labels("admin", action, "done").inc()
                results.append((entry_id, True, done))
            except actions.Refused as e:
                metrics.actions.labels("admin", action, "failed" if e.kind == "failed" else "refused").inc()
                results.append((entry_id, False, text.safe(str(e), 500)))
        return page("admin_done.html", title="Done", admin=session, results=results, action=action)

    @app.post("/admin/entry/<entry_id>/<action>")
    def admin_one(entry_id, action):
        session = admin()
        if not session:
            return redirect("/admin/login", 303)
        if action not in ADMIN_ACTIONS or not _ENTRY_ID.fullmatch(entry_id):
            abort(404)
        if not form_ok(f"admin:{session.form_key}"):
            return refused_form()
        return run_actions(session, [entry_id], action)

    @app.post("/admin/bulk")
    def admin_bulk():
        session = admin()
        if not session:
            return redirect("/admin/login", 303)
        if not form_ok(f"admin:{session.form_key}"):
            return refused_form()
        action, ids = request.form.get("action", ""), list(dict.fromkeys(request.form.getlist("id")))
        if action not in ADMIN_ACTIONS:
            return page("refused.html", 400, title="Nothing was done", message="Choose an action.", admin=session)
        if not ids or len(ids) > cfg.web_bulk_limit:
            return page("refused.html", 400, title="Nothing was done", admin=session,
                        message=f"Tick between 1 and {cfg.web_bulk_limit} entries (web_bulk_limit).")
        return run_actions(session, ids, action)

    return app


# ---- what the templates show of an entry: every value from the sender made safe text

def when(t) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t or 0))


def summary(entry) -> dict:
    return {"id": entry.id, "held": when(entry.time), "sender": text.safe(entry.sender or "<>", 300),
            "recipients": [text.safe(r, 300) for r in entry.recipients],
            "subject": text.safe(text.decoded(entry.subject) or "(no subject)", 300),
            "reason": text.safe(entry.reason, 40), "rule": text.safe(entry.rule, 300),
            "score": "-" if entry.score is None else f"{entry.score:.1f}",
            "rules": text.safe(", ".join(map(str, entry.rules)), 2000),
            "viruses": text.safe(", ".join(map(str, entry.viruses)), 500),
            "client": text.safe(f"{entry.client_name or 'unknown'}[{entry.client_address or '?'}]", 300),
            "direction": text.safe(entry.direction, 20), "size": entry.size, "host": text.safe(entry.host, 200),
            "released": bool(entry.released)}


def history(entry) -> list[tuple[str, str, str]]:
    """(when, who, what) of everything recorded about an entry, oldest first."""
    rows = [(entry.time, entry.host or "scanmilter", f"held as {entry.reason}: {entry.rule}")]
    for record in entry.meta.get("notified") or []:
        if isinstance(record, dict):
            rows.append((record.get("at"), record.get("host") or "notify", f"listed in a digest to {record.get('to')}"))
            used = record.get("used")
            if isinstance(used, dict):
                rows.append((used.get("at"), f"web:{record.get('to')}", f"link used: {used.get('action')}"))
    for record in entry.released:
        if isinstance(record, dict):
            to = ", ".join(map(str, record.get("to", [])))
            where = f" on {record['host']}" if record.get("host") else ""
            rows.append((record.get("at"), record.get("by"), f"released to {to}{where}"))
    for record in entry.learned:
        if isinstance(record, dict):
            rows.append((record.get("at"), record.get("by"), f"learned as {record.get('as')}"))
    rows.sort(key=lambda r: r[0] if isinstance(r[0], (int, float)) else 0)
    return [(when(t), text.safe(str(who), 200), text.safe(what, 500)) for t, who, what in rows]

