-- Usage writes (last_used_at only) must not pay for the invalidation
-- trigger: fire it only when the UPDATE sets a column other than
-- last_used_at. A column added to `keys` later must be added to this list
-- if it can change a decision.
DROP TRIGGER keys_notify_change ON keys;

CREATE TRIGGER keys_notify_change
    AFTER UPDATE OF id, hash, prefix, start, owner_id, name, description, scopes,
                    resources, ip_allow, metadata, created_at, expires_at,
                    disabled_at, revoked_at, revoked_reason
    ON keys
    FOR EACH ROW EXECUTE FUNCTION keys_notify_change();

CREATE TRIGGER keys_notify_delete
    AFTER DELETE ON keys
    FOR EACH ROW EXECUTE FUNCTION keys_notify_change();

-- Usage writes update rows in place every few seconds; free space in each
-- page lets those updates be HOT (no index maintenance, no page hopping).
ALTER TABLE keys SET (fillfactor = 85);
ALTER TABLE key_usage_daily SET (fillfactor = 70);
