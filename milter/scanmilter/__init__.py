"""scanmilter: a mail content filter for Postfix (clamd + spamd over the milter protocol)."""

__version__ = "0.1.0"
