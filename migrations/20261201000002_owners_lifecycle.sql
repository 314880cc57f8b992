-- Owners become first-class accounts; keys gain rotation links, canaries,
-- and who disabled them; the audit trail records the caller's address.

-- `active` already is the owner's state: true = ACTIVE, false = SUSPENDED.
ALTER TABLE owners
    ADD COLUMN display_name      text    NOT NULL DEFAULT '',
    ADD COLUMN state_reason      text    NOT NULL DEFAULT '',
    ADD COLUMN metadata          jsonb   NOT NULL DEFAULT '{}',
    -- The ceiling: what keys of this owner may ever hold; NULL: no limit.
    ADD COLUMN allowed_scopes    text[],
    ADD COLUMN allowed_resources text[],
    -- Most keys held at once (neither revoked nor expired); NULL: no limit.
    ADD COLUMN max_keys          integer CHECK (max_keys > 0);

-- updated_at moves on every change, so a replica catching up after its
-- listener was away can find the owners that changed meanwhile.
CREATE FUNCTION owners_touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := clock_timestamp();
    RETURN NEW;
END
$$;

CREATE TRIGGER owners_touch_updated_at
    BEFORE UPDATE ON owners
    FOR EACH ROW EXECUTE FUNCTION owners_touch_updated_at();

CREATE INDEX owners_updated_at ON owners (updated_at);

-- A change to an owner can change the decision for every one of its keys
-- (suspension, and later its default limits): every replica hears it and
-- re-reads that owner's keys before using them again.
CREATE FUNCTION owners_notify_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('keyward_invalidate',
        json_build_object(
            'op', 'owner',
            'owner', NEW.id,
            'at_us', (extract(epoch FROM clock_timestamp()) * 1000000)::bigint
        )::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER owners_notify_change
    AFTER UPDATE ON owners
    FOR EACH ROW EXECUTE FUNCTION owners_notify_change();

ALTER TABLE keys
    -- Refused exactly as an unknown key is, and reported when presented.
    ADD COLUMN canary            boolean NOT NULL DEFAULT false,
    -- Rotation links: the key this one replaced, and the one replacing it.
    ADD COLUMN rotated_from      uuid REFERENCES keys (id),
    ADD COLUMN replaced_by       uuid REFERENCES keys (id),
    -- Whether the disable came from a keyward:admin key (an owner's own
    -- management key may not undo it).
    ADD COLUMN disabled_by_admin boolean NOT NULL DEFAULT false;

-- The decision columns the triggers watch now include canary. (replaced_by
-- and rotated_from decide nothing, but a rotation also moves expires_at.)
DROP TRIGGER keys_notify_change ON keys;
CREATE TRIGGER keys_notify_change
    AFTER UPDATE OF id, hash, prefix, start, owner_id, name, description, scopes,
                    resources, ip_allow, metadata, created_at, expires_at,
                    disabled_at, revoked_at, revoked_reason, canary
    ON keys
    FOR EACH ROW EXECUTE FUNCTION keys_notify_change();

DROP TRIGGER keys_touch_changed_at ON keys;
CREATE TRIGGER keys_touch_changed_at
    BEFORE UPDATE OF id, hash, prefix, start, owner_id, name, description, scopes,
                     resources, ip_allow, metadata, created_at, expires_at,
                     disabled_at, revoked_at, revoked_reason, canary
    ON keys
    FOR EACH ROW EXECUTE FUNCTION keys_touch_changed_at();

-- Management keys are few; finding the active keyward:admin ones (the last
-- one may not go) must not scan every key.
CREATE INDEX keys_admin ON keys (id) WHERE 'keyward:admin' = ANY (scopes);

ALTER TABLE audit_events ADD COLUMN remote_addr inet;
CREATE INDEX audit_events_owner_id_id ON audit_events (owner_id, id);
CREATE INDEX audit_events_actor_key_id_id ON audit_events (actor_key_id, id);
DROP INDEX audit_events_key_id;
CREATE INDEX audit_events_key_id_id ON audit_events (key_id, id);
