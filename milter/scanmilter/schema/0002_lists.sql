-- The shared lists and per-recipient settings, read by every host.
SELECT 1;
