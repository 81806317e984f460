"""Held mail made into text that is safe to show, in a digest or on the web page.

SECURITY: a held message is hostile. It is never rendered as HTML: the page shows its text part,
or the text of its HTML part with every tag dropped by the standard library's html.parser (never a
regular expression: the parser tokenizes as a browser does, so a tag cannot hide inside an
attribute or a comment); the contents of script, style and other non-text elements are dropped
whole. Everything shown then goes through the templates' autoescaping. Control characters and
the Unicode marks that reorder what is shown (bidirectional overrides and isolates) become "?",
so that a Subject or a file name cannot pose as something else. Sizes are bounded: headers are cut
at HEADER_LIMIT characters, bodies at web_preview_limit.

Time is bounded too: the web page renders in a child process (`render_apart`), killed after
web_render_timeout. The standard library's parsers take time that grows faster than their input on
some hostile input (html.parser rescans the rest of the input for each unclosed tag: hours for 1 MB
of "<a "; the email package spends tens of seconds on a Content-Type of thousands of parameters, and
nesting of thousands of parts ends in RecursionError); a page view then costs at most the timeout.
"""
from __future__ import annotations

import dataclasses
import email
import email.errors
import email.header
import email.policy
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from html.parser import HTMLParser

HEADER_LIMIT = 1000             # characters of one header value shown
SHOWN_HEADERS = ("From", "To", "Cc", "Reply-To", "Subject", "Date", "Message-ID")
# what a reader must not get from a sender: control characters but tab and newline, bidirectional
# marks, embeddings, overrides and isolates, line and paragraph separators, lone surrogates
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e"
                     "\u2066-\u2069\ud800-\udfff]")
# elements whose content is not text a reader sees (or is code)
_SKIPPED = frozenset({"script", "style", "head", "title", "template", "noscript", "svg", "math", "object",
                      "iframe", "select", "textarea"})
_BLOCK = frozenset({"p", "div", "br", "li", "tr", "table", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote",
                    "pre", "hr", "section", "article", "header", "footer", "ul", "ol", "dl", "dt", "dd"})


def safe(text: str, limit: int = HEADER_LIMIT) -> str:
    """One line of hostile text: no control or reordering characters, at most `limit` characters."""
    text = _UNSAFE.sub("?", str(text).replace("\r\n", " ").replace("\n", " ").replace("\t", " "))
    return text if len(text) <= limit else text[:limit] + "…"


def safe_block(text: str, limit: int) -> str:
    """Several lines of hostile text: newlines and tabs kept, the rest as in `safe`."""
    text = _UNSAFE.sub("?", text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(4))
    return text if len(text) <= limit else text[:limit] + "\n[… cut at web_preview_limit]"


def decoded(value) -> str:
    """A header value with its RFC 2047 encoded words decoded (as given when they are broken)."""
    value = str(value)
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except (ValueError, LookupError, email.errors.HeaderParseError):
        return value


class _TextOfHTML(HTMLParser):
    """The text a reader would see, without any markup; links as "text [address]"."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skipping = 0
        self.href: list[str | None] = []

    def handle_starttag(self, tag, attrs):
        if tag in _SKIPPED:
            self.skipping += 1
        elif tag in _BLOCK:
            self.out.append("\n")
        if tag == "a":
            self.href.append(dict(attrs).get("href"))

    def handle_startendtag(self, tag, attrs):
        if tag in _BLOCK:
            self.out.append("\n")

    def handle_endtag(self, tag):
        if tag in _SKIPPED:
            self.skipping = max(self.skipping - 1, 0)
        elif tag in _BLOCK:
            self.out.append("\n")
        if tag == "a" and self.href:
            href = self.href.pop()
            if href and not self.skipping:
                self.out.append(f" [{href.strip()}]")

    def handle_data(self, data):
        if not self.skipping:
            self.out.append(re.sub(r"[ \t\r\n]+", " ", data))


def html_to_text(html: str) -> str:
    parser = _TextOfHTML()
    parser.feed(html)
    parser.close()
    text = "".join(parser.out)
    lines = [line.strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


@dataclass
class Rendering:
    """What the page shows of a message."""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: str = ""
    body_kind: str = "text"          # text, html (its text only), raw (not MIME we could read)
    attachments: list[tuple[str, str, int]] = field(default_factory=list)   # (name, type, bytes)


def _parsed_part(limit: int) -> int:
    """Bytes of a message that are parsed: a body far beyond what is shown need not be."""
    return max(limit * 4, 64 * 1024)


def render(data: bytes, limit: int, all_headers: bool = False) -> Rendering:
    """The headers (SHOWN_HEADERS, or all), the body as text and the attachments of a message.
    Unbounded in time on hostile input: the web page calls `render_apart`."""
    out = Rendering()
    msg = email.message_from_bytes(data[:_parsed_part(limit)], policy=email.policy.compat32)
    for name, value in msg.items():
        if all_headers or name.lower() in {h.lower() for h in SHOWN_HEADERS}:
            out.headers.append((safe(name, 100), safe(decoded(value))))
    try:
        modern = email.message_from_bytes(data[:_parsed_part(limit)], policy=email.policy.default)
        part = modern.get_body(preferencelist=("plain", "html"))
        if part is not None:
            content = part.get_content()
            if part.get_content_type() == "text/html":
                out.body, out.body_kind = html_to_text(content), "html"
            else:
                out.body = content
        for att in modern.iter_attachments():
            payload = att.get_payload(decode=True) or b""
            out.attachments.append((safe(att.get_filename() or "(no name)", 200), safe(att.get_content_type(), 100),
                                    len(payload)))
    except Exception:       # a hostile or broken message: the raw body, as text
        part = None
    if part is None and not out.body:
        raw = re.split(rb"\r?\n\r?\n", data[:limit * 4], maxsplit=1)
        out.body, out.body_kind = (raw[1] if len(raw) > 1 else b"").decode("utf-8", "replace"), "raw"
    out.body = safe_block(out.body, limit)
    return out


class RenderError(Exception):
    """A message that could not be rendered within the time allowed (or made the renderer fail)."""


def render_apart(data: bytes, limit: int, all_headers: bool, timeout: float) -> Rendering:
    """`render` in a child process killed after `timeout` seconds; RenderError when it did not
    finish or failed. The child is this interpreter in isolated mode (no environment, no working
    directory on its path), importing this very package."""
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    command = [sys.executable, "-I", "-c",
               "import sys; sys.path.insert(0, sys.argv[1]); from scanmilter.web.text import _child; _child()",
               package_parent, str(limit), "all" if all_headers else "shown"]
    try:
        done = subprocess.run(command, input=data[:_parsed_part(limit)], capture_output=True, timeout=timeout,
                              check=True, env={})
        shown = json.loads(done.stdout)
        return Rendering(headers=[(str(n), str(v)) for n, v in shown["headers"]], body=str(shown["body"]),
                         body_kind=str(shown["body_kind"]),
                         attachments=[(str(n), str(t), int(b)) for n, t, b in shown["attachments"]])
    except subprocess.TimeoutExpired:
        raise RenderError(f"not rendered within web_render_timeout ({timeout:g}s)") from None
    except subprocess.CalledProcessError as e:
        last = e.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no message"]
        raise RenderError(f"the renderer failed: {safe(last[0], 300)}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RenderError(f"the renderer could not run: {safe(str(e), 300)}") from None


def _child() -> None:
    """The child of `render_apart`: a message on standard input, its Rendering as JSON on standard output."""
    limit, which = int(sys.argv[2]), sys.argv[3]
    shown = render(sys.stdin.buffer.read(), limit, which == "all")
    sys.stdout.buffer.write(json.dumps(dataclasses.asdict(shown)).encode("ascii"))
