-- Every change to a key that can change a decision notifies every replica,
-- inside the changing transaction (so the notice is sent if and only if the
-- change commits). A trigger rather than application code, so that changes
-- made by hand in SQL invalidate caches too.
--
-- Payload: {"hash": "<hex sha-256>", "at_us": <microseconds since epoch>}.
-- Batched usage writes (last_used_at only) are not decisions and notify nobody.
CREATE FUNCTION keys_notify_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    at_us bigint := (extract(epoch FROM clock_timestamp()) * 1000000)::bigint;
BEGIN
    IF TG_OP = 'UPDATE'
       AND (to_jsonb(OLD) - 'last_used_at') = (to_jsonb(NEW) - 'last_used_at') THEN
        RETURN NULL;
    END IF;
    PERFORM pg_notify('keyward_invalidate',
        json_build_object('hash', encode(OLD.hash, 'hex'), 'at_us', at_us)::text);
    IF TG_OP = 'UPDATE' AND NEW.hash <> OLD.hash THEN
        PERFORM pg_notify('keyward_invalidate',
            json_build_object('hash', encode(NEW.hash, 'hex'), 'at_us', at_us)::text);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER keys_notify_change
    AFTER UPDATE OR DELETE ON keys
    FOR EACH ROW EXECUTE FUNCTION keys_notify_change();

-- Allowed checks per key per UTC day, written in batches.
CREATE TABLE key_usage_daily (
    key_id  uuid   NOT NULL REFERENCES keys (id) ON DELETE CASCADE,
    day     date   NOT NULL,
    uses    bigint NOT NULL CHECK (uses >= 0),
    PRIMARY KEY (key_id, day)
);
