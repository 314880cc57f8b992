-- What replicas need to stay correct and cheap under attack and faults.

-- When a key's decision last changed (database clock). After a listener
-- reconnects, a replica reads the keys changed since the last notice it
-- heard (minus a safety margin) and evicts only those, instead of dropping
-- its whole cache. `now()` rather than `clock_timestamp()` as the default:
-- a stable default adds the column without rewriting the table.
ALTER TABLE keys ADD COLUMN changed_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX keys_changed_at ON keys (changed_at);

CREATE FUNCTION keys_touch_changed_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.changed_at := clock_timestamp();
    RETURN NEW;
END
$$;

-- The same columns as keys_notify_change: whatever can change a decision.
CREATE TRIGGER keys_touch_changed_at
    BEFORE UPDATE OF id, hash, prefix, start, owner_id, name, description, scopes,
                     resources, ip_allow, metadata, created_at, expires_at,
                     disabled_at, revoked_at, revoked_reason
    ON keys
    FOR EACH ROW EXECUTE FUNCTION keys_touch_changed_at();

-- Deleted keys leave a tombstone for the catch-up read (keys are never
-- deleted through the API; this covers deletes made by hand). Tombstones
-- older than a day serve no reconnect and are pruned as new ones come.
CREATE TABLE key_tombstones (
    hash        bytea       NOT NULL,
    deleted_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX key_tombstones_deleted_at ON key_tombstones (deleted_at);

CREATE FUNCTION keys_tombstone() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM key_tombstones WHERE deleted_at < now() - interval '1 day';
    INSERT INTO key_tombstones (hash) VALUES (OLD.hash);
    RETURN NULL;
END
$$;

CREATE TRIGGER keys_tombstone
    AFTER DELETE ON keys
    FOR EACH ROW EXECUTE FUNCTION keys_tombstone();

-- New keys are announced too, so every replica adds them to its membership
-- filter (unknown keys are refused without a lookup). One notice per key,
-- {"op": "insert", "hash": ..., "at_us": ...}; a statement that inserts many
-- keys at once (a bulk load) sends a single {"op": "resync"} instead, and
-- replicas reload their filter. Statement-level, so a bulk load pays once.
CREATE FUNCTION keys_notify_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    at_us bigint := (extract(epoch FROM clock_timestamp()) * 1000000)::bigint;
    inserted bigint;
BEGIN
    SELECT count(*) INTO inserted FROM new_keys;
    IF inserted > 100 THEN
        PERFORM pg_notify('keyward_invalidate',
            json_build_object('op', 'resync', 'at_us', at_us)::text);
    ELSE
        PERFORM pg_notify('keyward_invalidate',
            json_build_object('op', 'insert', 'hash', encode(hash, 'hex'), 'at_us', at_us)::text)
        FROM new_keys;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER keys_notify_insert
    AFTER INSERT ON keys
    REFERENCING NEW TABLE AS new_keys
    FOR EACH STATEMENT EXECUTE FUNCTION keys_notify_insert();
