-- Rate limits and usage credits.

-- A key's limits and credits live in its bucket, which rotated keys share
-- with the key they replaced (rotation never resets a quota). A new key's
-- bucket is its own id: `bucket_id` NULL means that, so existing rows need
-- no rewrite; read it as COALESCE(bucket_id, id).
ALTER TABLE keys
    ADD COLUMN bucket_id   uuid,
    -- Named windows, [{"name": "burst", "limit": 100, "window_ms": 1000}];
    -- NULL: the owner's default.
    ADD COLUMN rate_limits jsonb,
    -- Whether the bucket has credits (a row in `credits`): kept on every key
    -- of the bucket so that a change reaches caches like any key change.
    ADD COLUMN has_credits boolean NOT NULL DEFAULT false;
CREATE INDEX keys_bucket ON keys ((COALESCE(bucket_id, id)));

ALTER TABLE owners ADD COLUMN default_rate_limits jsonb;

-- Credits per bucket. `remaining` is what no replica has reserved yet; each
-- replica reserves blocks and spends them from memory. `refilled_at` is the
-- start of the period (UTC day or month) last refilled: the first
-- reservation of a new period sets `remaining` to `refill_amount`. An
-- admin's set bumps `version`, which tells replicas to drop their blocks.
CREATE TABLE credits (
    bucket_id       uuid        PRIMARY KEY,
    remaining       bigint      NOT NULL CHECK (remaining >= 0),
    refill_interval text        CHECK (refill_interval IN ('DAILY', 'MONTHLY')),
    refill_amount   bigint      CHECK (refill_amount >= 0),
    refilled_at     timestamptz,
    version         bigint      NOT NULL DEFAULT 1,
    CHECK ((refill_interval IS NULL) = (refill_amount IS NULL))
);

CREATE FUNCTION credits_notify_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('keyward_invalidate',
        json_build_object(
            'op', 'credits',
            'bucket', NEW.bucket_id,
            'at_us', (extract(epoch FROM clock_timestamp()) * 1000000)::bigint
        )::text);
    RETURN NULL;
END
$$;

-- Reservations and refills change `remaining` every few thousand checks and
-- must not notify anyone; only an admin's set (a new version) does.
CREATE TRIGGER credits_notify_change
    AFTER UPDATE OF version ON credits
    FOR EACH ROW EXECUTE FUNCTION credits_notify_change();

-- The decision columns now include the limits and the credits flag.
DROP TRIGGER keys_notify_change ON keys;
CREATE TRIGGER keys_notify_change
    AFTER UPDATE OF id, hash, prefix, start, owner_id, name, description, scopes,
                    resources, ip_allow, metadata, created_at, expires_at,
                    disabled_at, revoked_at, revoked_reason, canary, bucket_id,
                    rate_limits, has_credits
    ON keys
    FOR EACH ROW EXECUTE FUNCTION keys_notify_change();

DROP TRIGGER keys_touch_changed_at ON keys;
CREATE TRIGGER keys_touch_changed_at
    BEFORE UPDATE OF id, hash, prefix, start, owner_id, name, description, scopes,
                     resources, ip_allow, metadata, created_at, expires_at,
                     disabled_at, revoked_at, revoked_reason, canary, bucket_id,
                     rate_limits, has_credits
    ON keys
    FOR EACH ROW EXECUTE FUNCTION keys_touch_changed_at();
