"""Learning: teach spamd's Bayes filter that a held message is ham or spam (SPAMC TELL).

SECURITY: the message goes to spamd as it was held, and only to the spamd of spamd_socket; spamd
must allow it (--allow-tell). Nothing spamd answers is written anywhere but the entry's record
of who taught what when.
"""
from __future__ import annotations

import time

from .store import Store


def learn(store: Store, entry_id: str, spamd, message_class: str, by: str) -> bool:
    """Tell spamd's Bayes filter that an entry is ham or spam and note it in the entry; True when
    spamd learned, False when it knew the message already. spamd's errors pass through
    (scanners.EngineError, OSError)."""
    with store.locked(entry_id) as entry:
        learned = spamd.tell(store.message(entry_id), message_class)
        entry.meta.setdefault("learned", []).append({"at": time.time(), "by": by, "as": message_class})
        store.update(entry)
    store.count(f"learn_{message_class}")
    return learned
