//! KeyService: secrets shown once, hashes at rest, management-key
//! authorization, and refusals that name the field and write nothing.

use keyward::{key::ApiKey, pb};
use prost::Message as _;
use tonic::{Code, Request};

use crate::helpers::{self, TestApp, spawn_app, with_key};

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn mint_shows_the_secret_once_and_stores_only_its_hash() {
    let app = spawn_app().await;
    let minted = app
        .mint(pb::MintRequest {
            owner_id: "acme".into(),
            name: "billing-ci".into(),
            scopes: vec!["invoices:read".into()],
            ..Default::default()
        })
        .await;
    let secret = minted.secret.clone();
    let parsed = ApiKey::parse(&secret).expect("minted key parses");
    let hash = parsed.hash();
    let body = &secret["kw_live_".len()..];
    let key = minted.key.expect("key");
    assert_eq!(key.start, &secret[..12]);
    assert_eq!(key.prefix, "kw_live");

    // Neither Get nor List returns the secret, its body, or its hash.
    let mut keys = app.keys.clone();
    let got = keys
        .get(app.admin(pb::GetRequest { id: key.id.clone() }))
        .await
        .expect("get")
        .into_inner();
    let listed = keys
        .list(app.admin(pb::ListRequest::default()))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.keys.len(), 2, "the admin key and the new key");
    for wire in [got.encode_to_vec(), listed.encode_to_vec()] {
        assert!(!contains(&wire, secret.as_bytes()));
        assert!(!contains(&wire, body.as_bytes()));
        assert!(!contains(&wire, hash.as_bytes()));
    }
    assert_eq!(got.id, key.id);
    assert_eq!(got.start, key.start);

    // At rest: the SHA-256 of the key, and no trace of the plaintext in any
    // column of any table.
    let stored: Vec<u8> = sqlx::query_scalar("SELECT hash FROM keys WHERE id = $1::uuid")
        .bind(&key.id)
        .fetch_one(&app.db)
        .await
        .expect("row");
    assert_eq!(stored, hash.as_bytes());
    for table in ["keys", "owners", "audit_events"] {
        let rows: Vec<String> = sqlx::query_scalar(match table {
            "keys" => "SELECT t::text FROM keys t",
            "owners" => "SELECT t::text FROM owners t",
            _ => "SELECT t::text FROM audit_events t",
        })
        .fetch_all(&app.db)
        .await
        .expect("scan");
        assert!(!rows.is_empty(), "{table} has rows");
        for row in rows {
            assert!(!row.contains(body), "{table} holds a plaintext key: {row}");
        }
    }
}

#[tokio::test]
async fn mint_and_revoke_write_audit_events_naming_the_management_key() {
    let app = spawn_app().await;
    let id = app
        .mint(pb::MintRequest {
            owner_id: "acme".into(),
            ..Default::default()
        })
        .await
        .key
        .expect("key")
        .id;
    app.revoke(&id).await;

    let events: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT action, actor, owner_id FROM audit_events WHERE key_id = $1::uuid ORDER BY id",
    )
    .bind(&id)
    .fetch_all(&app.db)
    .await
    .expect("audit");
    let actor = format!("key:{}", app.admin_id);
    assert_eq!(
        events,
        [
            (
                "key.mint".to_owned(),
                actor.clone(),
                Some("acme".to_owned())
            ),
            ("key.revoke".to_owned(), actor, Some("acme".to_owned())),
        ]
    );
    // The trail is append-only.
    let err = sqlx::query("DELETE FROM audit_events")
        .execute(&app.db)
        .await
        .expect_err("append-only");
    assert!(err.to_string().contains("append-only"), "{err}");
}

async fn list_status(app: &TestApp, req: Request<pb::ListRequest>) -> tonic::Status {
    app.keys.clone().list(req).await.expect_err("refused")
}

#[tokio::test]
async fn admin_calls_without_a_valid_management_key_are_unauthenticated() {
    let app = spawn_app().await;
    let never_minted = helpers::never_minted();

    let cases = [
        ("no key", Request::new(pb::ListRequest::default())),
        (
            "unknown key",
            with_key(pb::ListRequest::default(), never_minted.expose_secret()),
        ),
        (
            "malformed key",
            with_key(pb::ListRequest::default(), "kw_live_nope"),
        ),
    ];
    for (what, req) in cases {
        let status = list_status(&app, req).await;
        assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
        assert!(!status.message().contains(never_minted.expose_secret()));
    }

    // A revoked admin key stops working at once.
    let second_admin = app
        .mint(pb::MintRequest {
            owner_id: "ops".into(),
            scopes: vec!["keyward:admin".into()],
            ..Default::default()
        })
        .await;
    let req = || with_key(pb::ListRequest::default(), &second_admin.secret);
    app.keys.clone().list(req()).await.expect("admin key works");
    app.revoke(&second_admin.key.expect("key").id).await;
    let status = list_status(&app, req()).await;
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("REVOKED"), "{}", status.message());
}

#[tokio::test]
async fn a_key_without_a_management_scope_is_permission_denied() {
    let app = spawn_app().await;
    let ordinary = app
        .mint(pb::MintRequest {
            owner_id: "acme".into(),
            scopes: vec!["invoices:read".into()],
            ..Default::default()
        })
        .await;
    let mut keys = app.keys.clone();
    let status = keys
        .list(with_key(pb::ListRequest::default(), &ordinary.secret))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("keyward:admin"),
        "{}",
        status.message()
    );

    let status = keys
        .mint(with_key(
            pb::MintRequest {
                owner_id: "acme".into(),
                ..Default::default()
            },
            &ordinary.secret,
        ))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn an_owner_management_key_is_confined_to_its_own_owner() {
    let app = spawn_app().await;
    let owner_key = app
        .mint(pb::MintRequest {
            owner_id: "acme".into(),
            scopes: vec!["keyward:owner".into()],
            ..Default::default()
        })
        .await
        .secret;
    let other = app
        .mint(pb::MintRequest {
            owner_id: "globex".into(),
            ..Default::default()
        })
        .await
        .key
        .expect("key");
    let mut keys = app.keys.clone();
    let mint = |owner: &str, scopes: &[&str]| {
        with_key(
            pb::MintRequest {
                owner_id: owner.into(),
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
            &owner_key,
        )
    };

    let own = keys
        .mint(mint("acme", &["orders:read"]))
        .await
        .expect("own owner");
    assert_eq!(own.into_inner().key.expect("key").owner_id, "acme");
    let status = keys
        .mint(mint("globex", &[]))
        .await
        .expect_err("other owner");
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = keys
        .mint(mint("acme", &["keyward:admin"]))
        .await
        .expect_err("escalation");
    assert_eq!(status.code(), Code::PermissionDenied);

    // Another owner's key does not exist as far as this caller can tell.
    let status = keys
        .get(with_key(
            pb::GetRequest {
                id: other.id.clone(),
            },
            &owner_key,
        ))
        .await
        .expect_err("hidden");
    assert_eq!(status.code(), Code::NotFound);
    let status = keys
        .revoke(with_key(
            pb::RevokeRequest {
                id: other.id,
                reason: String::new(),
            },
            &owner_key,
        ))
        .await
        .expect_err("hidden");
    assert_eq!(status.code(), Code::NotFound);

    // List shows only its own owner's keys, and refuses to look elsewhere.
    let listed = keys
        .list(with_key(pb::ListRequest::default(), &owner_key))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.keys.len(), 2);
    assert!(listed.keys.iter().all(|k| k.owner_id == "acme"));
    let status = keys
        .list(with_key(
            pb::ListRequest {
                owner_id: "globex".into(),
                ..Default::default()
            },
            &owner_key,
        ))
        .await
        .expect_err("other owner");
    assert_eq!(status.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn bad_arguments_name_the_field_and_write_nothing() {
    let app = spawn_app().await;
    let before = app.row_counts().await;
    let mut keys = app.keys.clone();
    let mint = |req: pb::MintRequest| app.admin(req);
    let acme = || pb::MintRequest {
        owner_id: "acme".into(),
        ..Default::default()
    };
    let list = |page_size: Option<i32>, page_token: &str| {
        app.admin(pb::ListRequest {
            page_size,
            page_token: page_token.into(),
            ..Default::default()
        })
    };
    let unknown_id = uuid::Uuid::now_v7().to_string();

    let refusals: Vec<(&str, Result<(), tonic::Status>, Code, &str)> = vec![
        (
            "empty owner id",
            keys.mint(mint(pb::MintRequest::default())).await.map(drop),
            Code::InvalidArgument,
            "owner_id: ",
        ),
        (
            "bad prefix",
            keys.mint(mint(pb::MintRequest {
                prefix: "Live-".into(),
                ..acme()
            }))
            .await
            .map(drop),
            Code::InvalidArgument,
            "prefix: ",
        ),
        (
            "bad CIDR",
            keys.mint(mint(pb::MintRequest {
                ip_allow: vec!["10.0.0.0/8".into(), "10.0.0.0/40".into()],
                ..acme()
            }))
            .await
            .map(drop),
            Code::InvalidArgument,
            "ip_allow[1]: ",
        ),
        (
            "page size 0",
            keys.list(list(Some(0), "")).await.map(drop),
            Code::InvalidArgument,
            "page_size: ",
        ),
        (
            "page size 5000",
            keys.list(list(Some(5000), "")).await.map(drop),
            Code::InvalidArgument,
            "page_size: ",
        ),
        (
            "malformed page token",
            keys.list(list(None, "not-a-token")).await.map(drop),
            Code::InvalidArgument,
            "page_token: ",
        ),
        (
            "malformed id",
            keys.get(app.admin(pb::GetRequest { id: "42".into() }))
                .await
                .map(drop),
            Code::InvalidArgument,
            "id: ",
        ),
        (
            "unknown id (get)",
            keys.get(app.admin(pb::GetRequest {
                id: unknown_id.clone(),
            }))
            .await
            .map(drop),
            Code::NotFound,
            "id: ",
        ),
        (
            "unknown id (revoke)",
            keys.revoke(app.admin(pb::RevokeRequest {
                id: unknown_id.clone(),
                reason: String::new(),
            }))
            .await
            .map(drop),
            Code::NotFound,
            "id: ",
        ),
        (
            "unknown id (disable)",
            keys.disable(app.admin(pb::DisableRequest { id: unknown_id }))
                .await
                .map(drop),
            Code::NotFound,
            "id: ",
        ),
    ];
    for (what, result, code, field) in refusals {
        let status = result.expect_err(what);
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(
            status.message().starts_with(field),
            "{what}: message {:?} should name {field:?}",
            status.message()
        );
    }
    assert_eq!(app.row_counts().await, before, "a refused call wrote rows");
}
