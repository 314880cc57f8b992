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
    bookkeeping text[] := ARRAY['last_used_at', 'changed_at'];
    revocation text[] := ARRAY['revoked_at', 'revoked_reason'];
    payload jsonb;
BEGIN
    IF TG_OP = 'UPDATE'
       AND (to_jsonb(OLD) - 'last_used_at') = (to_jsonb(NEW) - 'last_used_at') THEN
        RETURN NULL;
    END IF;
    payload := jsonb_build_object('hash', encode(OLD.hash, 'hex'), 'at_us', at_us);
    IF TG_OP = 'UPDATE' AND NEW.revoked_at IS NOT NULL
       AND (to_jsonb(OLD) - bookkeeping - revocation)
         = (to_jsonb(NEW) - bookkeeping - revocation) THEN
        payload := payload || jsonb_build_object(
            'revoked_at_us', (extract(epoch FROM NEW.revoked_at) * 1000000)::bigint,
            'canary', NEW.canary);
    END IF;
    PERFORM pg_notify('keyward_invalidate', payload::text);
    IF TG_OP = 'UPDATE' AND NEW.hash <> OLD.hash THEN
        PERFORM pg_notify('keyward_invalidate',
            json_build_object('hash', encode(NEW.hash, 'hex'), 'at_us', at_us)::text);
    END IF;
    RETURN NULL;
END
$$;
