-- Owners: the caller's own accounts. A key belongs to exactly one owner.
CREATE TABLE owners (
    id          text PRIMARY KEY,
    active      boolean     NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Keys: only the SHA-256 of a key is stored, never the key.
CREATE TABLE keys (
    id              uuid        PRIMARY KEY,  -- UUIDv7: time-ordered, drives keyset pagination
    hash            bytea       NOT NULL UNIQUE CHECK (octet_length(hash) = 32),
    prefix          text        NOT NULL,
    start           text        NOT NULL,     -- display hint: prefix + first 4 body characters
    owner_id        text        NOT NULL REFERENCES owners (id),
    name            text        NOT NULL DEFAULT '',
    description     text        NOT NULL DEFAULT '',
    scopes          text[]      NOT NULL DEFAULT '{}',
    resources       text[]      NOT NULL DEFAULT '{}',  -- empty: every resource
    ip_allow        cidr[]      NOT NULL DEFAULT '{}',  -- empty: any address
    metadata        jsonb       NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz,
    disabled_at     timestamptz,
    revoked_at      timestamptz,
    revoked_reason  text,
    last_used_at    timestamptz
);

CREATE INDEX keys_owner_id_id ON keys (owner_id, id);

-- Audit trail of every admin change, written in the change's transaction.
CREATE TABLE audit_events (
    id            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at            timestamptz NOT NULL DEFAULT now(),
    actor         text        NOT NULL,  -- 'key:<management key id>' or 'bootstrap'
    actor_key_id  uuid,
    action        text        NOT NULL,  -- 'key.mint', 'key.revoke', ...
    key_id        uuid,
    owner_id      text,
    details       jsonb       NOT NULL DEFAULT '{}'
);

CREATE INDEX audit_events_key_id ON audit_events (key_id);

-- Append-only: refuse to rewrite history.
CREATE FUNCTION audit_events_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only';
END
$$;

CREATE TRIGGER audit_events_append_only
    BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
