//! CheckService.Check: every decision with its HTTP status, from a real server
//! on a real database.

use std::time::Duration;

use keyward::pb::{self, Reason};
use tonic::Code;

use crate::helpers::{never_minted, reason, spawn_app};

fn mint_request(owner: &str) -> pb::MintRequest {
    pb::MintRequest {
        owner_id: owner.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_fresh_key_is_allowed_raw_and_as_bearer() {
    let app = spawn_app().await;
    let minted = app
        .mint(pb::MintRequest {
            scopes: vec!["orders:read".into()],
            metadata: [("plan".to_owned(), "pro".to_owned())].into(),
            ..mint_request("acme")
        })
        .await;
    let key = minted.key.expect("key");

    for presented in [minted.secret.clone(), format!("Bearer {}", minted.secret)] {
        let resp = app.check_key(&presented).await.expect("check");
        assert!(resp.allowed, "{presented:?}: {resp:?}");
        assert_eq!(reason(&resp), Reason::Ok);
        assert_eq!(resp.http_status, 200);
        assert_eq!(resp.key_id, key.id);
        assert_eq!(resp.owner_id, "acme");
        assert_eq!(resp.scopes, ["orders:read"]);
        assert_eq!(resp.metadata.get("plan").map(String::as_str), Some("pro"));
    }
}

#[tokio::test]
async fn no_key_is_missing_key() {
    let app = spawn_app().await;
    let resp = app.check_key("").await.expect("check");
    assert!(!resp.allowed);
    assert_eq!(reason(&resp), Reason::MissingKey);
    assert_eq!(resp.http_status, 401);
}

#[tokio::test]
async fn a_wrong_checksum_is_malformed_and_never_reaches_the_store() {
    let app = spawn_app().await;
    let minted = app.mint(mint_request("acme")).await;
    let mut tampered = minted.secret.clone();
    let last = tampered.pop().expect("non-empty");
    tampered.push(if last == 'a' { 'b' } else { 'a' });

    // Cut the server off from its database.
    app.cut_off_database().await;
    // Control: a well-formed key the server has never seen needs the store
    // (the membership filter rules it out, but a few such lookups are
    // budgeted for keys minted elsewhere a moment ago), so it now cannot be
    // decided.
    let unseen = never_minted();
    let err = app
        .check_key(unseen.expose_secret())
        .await
        .expect_err("no store");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    // The tampered key is decided without the store.
    let resp = app
        .check_key(&tampered)
        .await
        .expect("decided without the store");
    assert!(!resp.allowed);
    assert_eq!(reason(&resp), Reason::MalformedKey);
    assert_eq!(resp.http_status, 401);
    assert!(resp.key_id.is_empty());
}

#[tokio::test]
async fn a_well_formed_key_that_was_never_minted_is_unknown() {
    let app = spawn_app().await;
    let stranger = never_minted();
    for _ in 0..2 {
        // The second answer comes from the negative cache; it must agree.
        let resp = app
            .check_key(stranger.expose_secret())
            .await
            .expect("check");
        assert_eq!(reason(&resp), Reason::UnknownKey);
        assert_eq!(resp.http_status, 401);
    }
}

#[tokio::test]
async fn a_revoked_key_is_denied_on_the_very_next_check() {
    let app = spawn_app().await;
    let minted = app.mint(mint_request("acme")).await;
    let id = minted.key.expect("key").id;
    // Warm: the key is allowed (and cached).
    assert!(app.check_key(&minted.secret).await.expect("check").allowed);

    let revoked = app.revoke(&id).await;
    assert_eq!(revoked.state(), pb::api_key::State::Revoked);

    let resp = app.check_key(&minted.secret).await.expect("check");
    assert!(!resp.allowed);
    assert_eq!(reason(&resp), Reason::Revoked);
    assert_eq!(resp.http_status, 401);
    assert_eq!(resp.key_id, id);
}

#[tokio::test]
async fn revoking_twice_is_not_an_error_and_keeps_the_first_revocation() {
    let app = spawn_app().await;
    let id = app.mint(mint_request("acme")).await.key.expect("key").id;
    let first = app.revoke(&id).await;
    let second = app.revoke(&id).await;
    assert_eq!(first.revoked_at, second.revoked_at);
    let (_, _, audit) = app.row_counts().await;
    // bootstrap + mint + one revoke.
    assert_eq!(audit, 3);
}

#[tokio::test]
async fn a_key_past_its_expiry_is_expired() {
    let app = spawn_app().await;
    let minted = app
        .mint(pb::MintRequest {
            expiry: Some(pb::mint_request::Expiry::Ttl(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            })),
            ..mint_request("acme")
        })
        .await;
    let expires_at = minted
        .key
        .as_ref()
        .and_then(|k| k.expires_at)
        .expect("expires_at");
    assert!(app.check_key(&minted.secret).await.expect("check").allowed);

    // Wait until the expiry instant has passed (bounded: the TTL is 1 s).
    let deadline = std::time::SystemTime::UNIX_EPOCH
        + Duration::new(expires_at.seconds as u64, expires_at.nanos as u32);
    if let Ok(left) = deadline.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(left + Duration::from_millis(50)).await;
    }

    let resp = app.check_key(&minted.secret).await.expect("check");
    assert_eq!(reason(&resp), Reason::Expired);
    assert_eq!(resp.http_status, 401);
}

#[tokio::test]
async fn a_disabled_key_is_denied_until_enabled_again() {
    let app = spawn_app().await;
    let minted = app.mint(mint_request("acme")).await;
    let id = minted.key.expect("key").id;
    let mut keys = app.keys.clone();

    let disabled = keys
        .disable(app.admin(pb::DisableRequest { id: id.clone() }))
        .await
        .expect("disable")
        .into_inner();
    assert_eq!(disabled.state(), pb::api_key::State::Disabled);
    let resp = app.check_key(&minted.secret).await.expect("check");
    assert_eq!(reason(&resp), Reason::Disabled);
    assert_eq!(resp.http_status, 401);

    keys.enable(app.admin(pb::EnableRequest { id }))
        .await
        .expect("enable");
    assert!(app.check_key(&minted.secret).await.expect("check").allowed);
}

#[tokio::test]
async fn a_key_outside_its_resources_is_resource_forbidden() {
    let app = spawn_app().await;
    let minted = app
        .mint(pb::MintRequest {
            resources: vec!["billing".into()],
            ..mint_request("acme")
        })
        .await;
    let check = |resource: &str| pb::CheckRequest {
        key: minted.secret.clone(),
        resource: resource.into(),
        ..Default::default()
    };
    assert!(app.check(check("billing")).await.expect("check").allowed);

    let resp = app.check(check("orders")).await.expect("check");
    assert_eq!(reason(&resp), Reason::ResourceForbidden);
    assert_eq!(resp.http_status, 403);
    // Identity is reported on denials, permissions only on allows.
    assert_eq!(resp.owner_id, "acme");
    assert!(resp.scopes.is_empty());
}

#[tokio::test]
async fn a_key_missing_a_required_scope_is_scope_missing() {
    let app = spawn_app().await;
    let minted = app
        .mint(pb::MintRequest {
            scopes: vec!["orders:read".into()],
            ..mint_request("acme")
        })
        .await;
    let check = |scopes: &[&str]| pb::CheckRequest {
        key: minted.secret.clone(),
        required_scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    assert!(
        app.check(check(&["orders:read"]))
            .await
            .expect("check")
            .allowed
    );

    let resp = app
        .check(check(&["orders:read", "orders:write"]))
        .await
        .expect("check");
    assert_eq!(reason(&resp), Reason::ScopeMissing);
    assert_eq!(resp.http_status, 403);
    assert!(resp.message.contains("orders:write"), "{}", resp.message);
}

#[tokio::test]
async fn a_key_used_outside_its_ip_allow_list_is_ip_forbidden() {
    let app = spawn_app().await;
    let minted = app
        .mint(pb::MintRequest {
            ip_allow: vec!["10.0.0.0/8".into(), "192.0.2.7".into()],
            ..mint_request("acme")
        })
        .await;
    let from = |ip: &str| pb::CheckRequest {
        key: minted.secret.clone(),
        client_ip: ip.into(),
        ..Default::default()
    };
    assert!(app.check(from("10.9.8.7")).await.expect("check").allowed);
    assert!(app.check(from("192.0.2.7")).await.expect("check").allowed);

    for outside in ["192.0.2.8", ""] {
        let resp = app.check(from(outside)).await.expect("check");
        assert_eq!(reason(&resp), Reason::IpForbidden, "from {outside:?}");
        assert_eq!(resp.http_status, 403);
    }
}

#[tokio::test]
async fn a_client_ip_that_is_not_an_address_is_an_invalid_argument() {
    let app = spawn_app().await;
    let minted = app.mint(mint_request("acme")).await;
    let err = app
        .check(pb::CheckRequest {
            key: minted.secret,
            client_ip: "10.0.0.300".into(),
            ..Default::default()
        })
        .await
        .expect_err("invalid");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("client_ip: "),
        "{}",
        err.message()
    );
}
