"""Learning: teach the spam engine that a held message is ham or spam: spamd's Bayes filter
(SPAMC TELL) or rspamd's statistics (its controller's /learnham, /learnspam).

SECURITY: the message goes to the engine as it was held, and only to the configured address
(spamd_socket, or rspamd_controller_address with the password of rspamd_password_file); spamd
must allow it (--allow-tell). Nothing the engine answers is written anywhere but the entry's
record of who taught what when.
"""
from __future__ import annotations

import time

from .store import Store


def learn(store: Store, entry_id: str, engine, message_class: str, by: str) -> bool:
    """Tell the spam engine (anything with `tell(data, message_class)`: spamd, rspamd's
    controller) that an entry is ham or spam and note it in the entry; True when it learned,
    False when it knew the message already. Its errors pass through (scanners.EngineError, OSError)."""
    with store.locked(entry_id) as entry:
        learned = engine.tell(store.message(entry_id), message_class)
        entry.meta.setdefault("learned", []).append({"at": time.time(), "by": by, "as": message_class})
        store.update(entry)
    store.count(f"learn_{message_class}")
    return learned
