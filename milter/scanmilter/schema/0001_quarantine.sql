-- The quarantine's tables: one row per held message, with its bytes compressed.
SELECT 1;
