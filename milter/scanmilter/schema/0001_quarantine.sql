-- The quarantine's tables (quarantine_backend = "postgresql"): one row per held message with its
-- bytes, compressed, in the row; a log of who did what to which entry; the action tallies.
--
-- The daemon of every host inserts; `scanmilter quarantine ...` on any host reads, releases and
-- deletes. Every value from the network (addresses, Subject) reaches these tables only as a bound
-- parameter. The columns beside `meta` are what the CLI searches and sorts by; `meta` is the
-- entry exactly as quarantine/entry.py defines it, as JSON text (type json, not jsonb: jsonb
-- refuses the escaped undecodable bytes an envelope address may carry, json keeps them).

-- Substring search of senders and recipients (`list --from`, `--to`) through trigram indexes.
-- pg_trgm ships with PostgreSQL and is a trusted extension: the database's owner may create it.
CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE TABLE quarantine_entries (
    id                text PRIMARY KEY CHECK (id ~ '^[0-9a-f]{24}$'),
    held_at           timestamptz NOT NULL,
    -- held until its first release, released after; a deleted entry has no row (see the events)
    state             text NOT NULL DEFAULT 'held' CHECK (state IN ('held', 'released')),
    reason            text NOT NULL,
    sender            text NOT NULL,
    recipients        text[] NOT NULL,
    -- the recipients one per line, what --to searches (the array itself cannot carry a trigram index)
    recipients_search text NOT NULL,
    queue_id          text NOT NULL,
    direction         text NOT NULL,
    score             double precision,
    size              bigint NOT NULL CHECK (size >= 0),
    host              text NOT NULL,        -- the host that received and held it
    release_address   text NOT NULL,        -- that host's release service when it was held
    released_at       timestamptz,
    meta              json NOT NULL,
    -- the message as received, compressed by the host that holds it (zlib): the database server
    -- does not spend its CPU on it, and it travels compressed
    compression       text NOT NULL CHECK (compression IN ('zlib')),
    message           bytea NOT NULL
);
-- already compressed: TOAST keeps it out of line without trying to compress it again
ALTER TABLE quarantine_entries ALTER COLUMN message SET STORAGE EXTERNAL;

CREATE INDEX quarantine_entries_held_at ON quarantine_entries (held_at DESC, id);
CREATE INDEX quarantine_entries_reason ON quarantine_entries (reason, held_at DESC);
CREATE INDEX quarantine_entries_state ON quarantine_entries (state, held_at DESC);
CREATE INDEX quarantine_entries_sender ON quarantine_entries USING gin (sender gin_trgm_ops);
CREATE INDEX quarantine_entries_recipients ON quarantine_entries USING gin (recipients_search gin_trgm_ops);
CREATE INDEX quarantine_entries_host ON quarantine_entries (host, held_at DESC);

-- Who did what to which entry, and when: held, release, delete, purge, learn_ham, learn_spam,
-- import, moved (from a host's local fallback store). Kept after the entry is gone, so that a
-- second admin is told who deleted it; purge trims rows older than what it purges.
CREATE TABLE quarantine_events (
    seq       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    entry_id  text NOT NULL,
    at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    host      text NOT NULL,
    actor     text NOT NULL,
    action    text NOT NULL,
    detail    json
);
CREATE INDEX quarantine_events_entry ON quarantine_events (entry_id, seq);
CREATE INDEX quarantine_events_at ON quarantine_events (at);

-- How often each action was done, site-wide (the daemons export it as a counter).
CREATE TABLE quarantine_tallies (
    action  text PRIMARY KEY,
    count   bigint NOT NULL
);
