-- The shared lists and per-recipient settings, read by every host (sharedlists.py).
--
-- Values are stored the way scanmilter validates them: addresses and domains in lower case,
-- client networks as CIDR, settings as TOML literals (5.0, "spamd", true). The checks below keep
-- anything else out whoever writes, `scanmilter lists` or psql; the daemon validates every row
-- again when it reads them.

CREATE TABLE scanmilter_list_entries (
    list       text NOT NULL CHECK (list IN ('allow_senders', 'allow_clients', 'allow_recipients',
                                             'block_senders', 'block_clients', 'block_recipients')),
    value      text NOT NULL CHECK (length(value) BETWEEN 1 AND 320 AND value !~ '[[:space:][:cntrl:]]'),
    added_by   text NOT NULL CHECK (length(added_by) BETWEEN 1 AND 200 AND added_by !~ '[[:cntrl:]]'),
    added_role text NOT NULL DEFAULT session_user,     -- the database role that wrote the row
    added_at   timestamptz NOT NULL DEFAULT now(),
    comment    text NOT NULL DEFAULT '' CHECK (length(comment) <= 500 AND comment !~ '[[:cntrl:]]'),
    PRIMARY KEY (list, value),
    -- a network for the client lists (the cast refuses anything else), else an address
    -- (user@example.org), a domain (example.org) or a domain with its at sign (@example.org)
    CHECK (CASE WHEN list IN ('allow_clients', 'block_clients') THEN value::cidr IS NOT NULL
                ELSE value = lower(value) AND value ~ '^[^@]*@?[a-z0-9.-]+$' END)
);

CREATE TABLE scanmilter_recipient_settings (
    direction text NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    recipient text NOT NULL CHECK (length(recipient) <= 320 AND recipient = lower(recipient)
                                   AND recipient ~ '^[^@[:space:][:cntrl:]]+@[a-z0-9.-]+$'),
    key       text NOT NULL,
    value     text NOT NULL CHECK (length(value) <= 1000 AND value !~ '[[:cntrl:]]'),
    set_by    text NOT NULL CHECK (length(set_by) BETWEEN 1 AND 200 AND set_by !~ '[[:cntrl:]]'),
    set_role  text NOT NULL DEFAULT session_user,
    set_at    timestamptz NOT NULL DEFAULT now(),
    comment   text NOT NULL DEFAULT '' CHECK (length(comment) <= 500 AND comment !~ '[[:cntrl:]]'),
    PRIMARY KEY (direction, recipient, key),
    -- the keys of [inbound.recipients."a@b"] (config.DIRECTION_SETTINGS), each with the TOML
    -- literals its type allows; any other key is refused
    CHECK (CASE
        WHEN key IN ('tag_level', 'subject_tag_level')
            THEN value ~ '^(-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?|-?inf|"spamd")$'
        WHEN key IN ('quarantine_level', 'reject_level')
            THEN value ~ '^(-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?|-?inf)$'
        WHEN key IN ('add_scan_headers', 'strip_verdict_headers') THEN value IN ('true', 'false')
        WHEN key = 'virus_action'
            THEN value IN ('"reject"', '"quarantine"', '"discard"', '"tag"', '"tempfail"')
        WHEN key = 'scan_failure_action' THEN value IN ('"tempfail"', '"accept"')
        WHEN key = 'oversize_action' THEN value IN ('"skip"', '"tag"', '"reject"')
        WHEN key = 'quarantine_action' THEN value IN ('"discard"', '"reject"')
        WHEN key IN ('malformed_action', 'limit_action', 'unreadable_action')
            THEN value IN ('"tag"', '"tempfail"', '"reject"', '"quarantine"')
        WHEN key = 'subject_tag' THEN value ~ '^"[ -~]*"$'
        WHEN key IN ('virus_reply', 'spam_reply', 'tempfail_reply', 'block_reply', 'quarantine_reply',
                     'banned_reply', 'unchecked_reply', 'malformed_reply')
            THEN value ~ '^".*"$'
        ELSE false END)
);

-- One row: which database this is (a new one gets a new instance) and how often its lists
-- changed. A host polls this row and reads the tables only when the revision moved; a revision
-- that goes back, or another instance, is not taken for a change (sharedlists.py).
CREATE TABLE scanmilter_lists_state (
    one        boolean PRIMARY KEY DEFAULT true CHECK (one),
    instance   uuid NOT NULL DEFAULT gen_random_uuid(),
    revision   bigint NOT NULL DEFAULT 0 CHECK (revision >= 0),
    changed_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO scanmilter_lists_state DEFAULT VALUES;

-- Every change, by any client, moves the revision and wakes the hosts that LISTEN.
CREATE FUNCTION scanmilter_lists_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE scanmilter_lists_state SET revision = revision + 1, changed_at = now();
    PERFORM pg_notify('scanmilter_lists', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER scanmilter_list_entries_changed AFTER INSERT OR UPDATE OR DELETE ON scanmilter_list_entries
    FOR EACH ROW EXECUTE FUNCTION scanmilter_lists_changed();
CREATE TRIGGER scanmilter_list_entries_truncated AFTER TRUNCATE ON scanmilter_list_entries
    FOR EACH STATEMENT EXECUTE FUNCTION scanmilter_lists_changed();
CREATE TRIGGER scanmilter_recipient_settings_changed AFTER INSERT OR UPDATE OR DELETE ON scanmilter_recipient_settings
    FOR EACH ROW EXECUTE FUNCTION scanmilter_lists_changed();
CREATE TRIGGER scanmilter_recipient_settings_truncated AFTER TRUNCATE ON scanmilter_recipient_settings
    FOR EACH STATEMENT EXECUTE FUNCTION scanmilter_lists_changed();
