-- A revocation says so in its notice: {"hash": ..., "at_us": ...,
-- "revoked_at_us": <the key's revoked_at>}. Revocation is final (nothing
-- clears revoked_at), so a replica that holds the key keeps it cached as
-- revoked and refuses its next check without reading the database; on a
-- busy replica that read was most of the time from Revoke to refusal.
-- Any later change to the row notifies again, as before. A replica that does
-- not know the field reads the notice as a plain change and evicts.
CREATE OR REPLACE FUNCTION keys_notify_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    at_us bigint := (extract(epoch FROM clock_timestamp()) * 1000000)::bigint;
    revoked_at_us bigint;
BEGIN
    IF TG_OP = 'UPDATE'
       AND (to_jsonb(OLD) - 'last_used_at') = (to_jsonb(NEW) - 'last_used_at') THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        IF NEW.hash = OLD.hash AND NEW.revoked_at IS NOT NULL THEN
            revoked_at_us := (extract(epoch FROM NEW.revoked_at) * 1000000)::bigint;
        END IF;
    END IF;
    IF revoked_at_us IS NULL THEN
        PERFORM pg_notify('keyward_invalidate',
            json_build_object('hash', encode(OLD.hash, 'hex'), 'at_us', at_us)::text);
    ELSE
        PERFORM pg_notify('keyward_invalidate',
            json_build_object('hash', encode(OLD.hash, 'hex'), 'at_us', at_us,
                              'revoked_at_us', revoked_at_us)::text);
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.hash <> OLD.hash THEN
        PERFORM pg_notify('keyward_invalidate',
            json_build_object('hash', encode(NEW.hash, 'hex'), 'at_us', at_us)::text);
    END IF;
    RETURN NULL;
END
$$;
