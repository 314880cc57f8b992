-- A revocation says so in its notice: {"hash": ..., "at_us": ...,
-- "revoked_at_us": <the key's revoked_at>, "canary": <the key's canary>}.
-- Revocation is final (nothing clears revoked_at), so a replica that holds
-- the key keeps it cached as revoked and refuses its next check without
-- reading the database; on a busy replica that read was most of the time
-- from Revoke to refusal. The notice says so only when the update changed
-- nothing else that decides (revoked_at and revoked_reason aside; changed_at
-- and last_used_at are bookkeeping): any other change, even to a revoked key
-- and even in the same statement, is a plain change that evicts, as before.
-- The canary flag comes with it because it is the one rule before
-- "revoked": with both, the replica's answer is the one a read would give.
-- A replica that does not know these fields reads a plain change.
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
        IF NEW.revoked_at IS NOT NULL
           AND (to_jsonb(OLD) - 'last_used_at' - 'changed_at' - 'revoked_at' - 'revoked_reason')
             = (to_jsonb(NEW) - 'last_used_at' - 'changed_at' - 'revoked_at' - 'revoked_reason') THEN
            revoked_at_us := (extract(epoch FROM NEW.revoked_at) * 1000000)::bigint;
        END IF;
    END IF;
    IF revoked_at_us IS NULL THEN
        PERFORM pg_notify('keyward_invalidate',
            json_build_object('hash', encode(OLD.hash, 'hex'), 'at_us', at_us)::text);
    ELSE
        PERFORM pg_notify('keyward_invalidate',
            json_build_object('hash', encode(OLD.hash, 'hex'), 'at_us', at_us,
                              'revoked_at_us', revoked_at_us,
                              'canary', NEW.canary)::text);
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.hash <> OLD.hash THEN
        PERFORM pg_notify('keyward_invalidate',
            json_build_object('hash', encode(NEW.hash, 'hex'), 'at_us', at_us)::text);
    END IF;
    RETURN NULL;
END
$$;
