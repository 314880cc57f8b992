//! Least privilege for `keyward:owner` keys: every admin RPC, tried by owner
//! A's management key against owner B's keys and against the limits of its
//! own owner. Each refusal writes nothing and is counted.

use std::time::Duration;

use keyward::pb::{self, Reason};
use prost_types::FieldMask;
use tonic::{Code, Status};

use crate::helpers::{Clients, TestApp, reason, spawn_app, spawn_replica, with_key};

fn mask(paths: &[&str]) -> Option<FieldMask> {
    Some(FieldMask {
        paths: paths.iter().map(|p| p.to_string()).collect(),
    })
}

/// Everything a refusal must leave as it was: every row of every table.
async fn snapshot(app: &TestApp) -> Vec<String> {
    // Usage writes may touch last_used_at meanwhile: that is not the call's.
    sqlx::query_scalar(
        "SELECT t FROM (SELECT (to_jsonb(k) - 'last_used_at')::text AS t FROM keys k UNION ALL \
         SELECT o::text FROM owners o UNION ALL SELECT a::text FROM audit_events a) x ORDER BY 1",
    )
    .fetch_all(&app.db)
    .await
    .expect("snapshot")
}

struct World {
    app: TestApp,
    /// owner A's management key (keyward:owner), expiring in an hour.
    a_key: String,
    a_key_id: String,
    /// A data-plane key of A, disabled by an admin.
    a_disabled_by_admin: String,
    /// Another keyward:owner key of A.
    a_other_manager: String,
    /// B's data key and B's management key.
    b_key: String,
    b_manager: String,
}

async fn world() -> World {
    let app = spawn_app().await;
    app.owners
        .clone()
        .create(app.admin(pb::OwnerServiceCreateRequest {
            id: "a".into(),
            allowed_scopes: vec![
                "orders:read".into(),
                "orders:write".into(),
                "keyward:owner".into(),
            ],
            ..Default::default()
        }))
        .await
        .expect("owner a");
    let mint = |owner: &str, scopes: &[&str]| pb::MintRequest {
        owner_id: owner.into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        expiry: Some(pb::mint_request::Expiry::Ttl(prost_types::Duration {
            seconds: 3600,
            nanos: 0,
        })),
        ..Default::default()
    };
    let a = app.mint(mint("a", &["keyward:owner"])).await;
    let a_disabled = app.mint(mint("a", &["orders:read"])).await;
    let a_disabled_id = a_disabled.key.expect("key").id;
    app.keys
        .clone()
        .disable(app.admin(pb::DisableRequest {
            id: a_disabled_id.clone(),
        }))
        .await
        .expect("admin disables");
    let a_other = app.mint(mint("a", &["keyward:owner"])).await;
    let b = app.mint(mint("b", &["orders:read"])).await;
    let b_manager = app.mint(mint("b", &["keyward:owner"])).await;
    World {
        a_key: a.secret,
        a_key_id: a.key.expect("key").id,
        a_disabled_by_admin: a_disabled_id,
        a_other_manager: a_other.key.expect("key").id,
        b_key: b.key.expect("key").id,
        b_manager: b_manager.key.expect("key").id,
        app,
    }
}

/// Runs one call with A's key; asserts the code, that nothing was written,
/// and that the refusal was counted.
async fn refused<F, Fut, T>(w: &World, what: &str, code: Code, call: F)
where
    F: FnOnce(Clients, String) -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
    T: std::fmt::Debug,
{
    let before = snapshot(&w.app).await;
    let refusals = w.app.replica.admin_stats().refused();
    let result = call(w.app.clients(), w.a_key.clone()).await;
    let err = result.expect_err(what);
    assert_eq!(err.code(), code, "{what}: {err:?}");
    assert_eq!(snapshot(&w.app).await, before, "{what} wrote something");
    if code == Code::PermissionDenied {
        assert_eq!(
            w.app.replica.admin_stats().refused(),
            refusals + 1,
            "{what}: the refusal was not counted"
        );
    }
}

#[tokio::test]
async fn an_owner_key_cannot_reach_another_owners_keys_through_any_rpc() {
    let w = world().await;
    let b = w.b_key.clone();
    let nf = Code::NotFound;
    let pd = Code::PermissionDenied;
    refused(&w, "Get", nf, |app, k| {
        let b = b.clone();
        async move {
            app.keys
                .clone()
                .get(with_key(pb::GetRequest { id: b }, &k))
                .await
        }
    })
    .await;
    refused(&w, "Revoke", nf, |app, k| {
        let b = b.clone();
        async move {
            app.keys
                .clone()
                .revoke(with_key(
                    pb::RevokeRequest {
                        id: b,
                        reason: String::new(),
                    },
                    &k,
                ))
                .await
        }
    })
    .await;
    refused(&w, "Disable", nf, |app, k| {
        let b = b.clone();
        async move {
            app.keys
                .clone()
                .disable(with_key(pb::DisableRequest { id: b }, &k))
                .await
        }
    })
    .await;
    refused(&w, "Enable", nf, |app, k| {
        let b = b.clone();
        async move {
            app.keys
                .clone()
                .enable(with_key(pb::EnableRequest { id: b }, &k))
                .await
        }
    })
    .await;
    refused(&w, "Update", nf, |app, k| {
        let b = b.clone();
        async move {
            app.keys
                .clone()
                .update(with_key(
                    pb::UpdateRequest {
                        id: b,
                        key: Some(pb::ApiKey {
                            name: "mine now".into(),
                            ..Default::default()
                        }),
                        update_mask: mask(&["name"]),
                        add_credits: 0,
                    },
                    &k,
                ))
                .await
        }
    })
    .await;
    refused(&w, "Rotate", nf, |app, k| {
        let b = b.clone();
        async move {
            app.keys
                .clone()
                .rotate(with_key(pb::RotateRequest { id: b, grace: None }, &k))
                .await
        }
    })
    .await;
    refused(&w, "Explain (admin only)", pd, |app, k| {
        let b = b.clone();
        async move {
            app.keys
                .clone()
                .explain(with_key(
                    pb::ExplainRequest {
                        id: b,
                        ..Default::default()
                    },
                    &k,
                ))
                .await
        }
    })
    .await;
    refused(&w, "List of owner b", pd, |app, k| async move {
        app.keys
            .clone()
            .list(with_key(
                pb::ListRequest {
                    owner_id: "b".into(),
                    ..Default::default()
                },
                &k,
            ))
            .await
    })
    .await;
    refused(&w, "Mint for owner b", pd, |app, k| async move {
        app.keys
            .clone()
            .mint(with_key(
                pb::MintRequest {
                    owner_id: "b".into(),
                    ..Default::default()
                },
                &k,
            ))
            .await
    })
    .await;
    refused(&w, "OwnerService.Get of b", nf, |app, k| async move {
        app.owners
            .clone()
            .get(with_key(pb::OwnerServiceGetRequest { id: "b".into() }, &k))
            .await
    })
    .await;
    refused(&w, "OwnerService.Update of b", pd, |app, k| async move {
        app.owners
            .clone()
            .update(with_key(
                pb::OwnerServiceUpdateRequest {
                    id: "b".into(),
                    owner: Some(pb::Owner {
                        state: pb::owner::State::Suspended.into(),
                        ..Default::default()
                    }),
                    update_mask: mask(&["state"]),
                },
                &k,
            ))
            .await
    })
    .await;
    refused(&w, "OwnerService.Create", pd, |app, k| async move {
        app.owners
            .clone()
            .create(with_key(
                pb::OwnerServiceCreateRequest {
                    id: "c".into(),
                    ..Default::default()
                },
                &k,
            ))
            .await
    })
    .await;
    refused(&w, "OwnerService.List", pd, |app, k| async move {
        app.owners
            .clone()
            .list(with_key(pb::OwnerServiceListRequest::default(), &k))
            .await
    })
    .await;
    refused(&w, "AuditService.List of b", pd, |app, k| async move {
        app.audit
            .clone()
            .list(with_key(
                pb::AuditServiceListRequest {
                    owner_id: "b".into(),
                    ..Default::default()
                },
                &k,
            ))
            .await
    })
    .await;
    // B's management key is just as unreachable.
    let bm = w.b_manager.clone();
    refused(&w, "Revoke of b's manager", nf, |app, k| async move {
        app.keys
            .clone()
            .revoke(with_key(
                pb::RevokeRequest {
                    id: bm,
                    reason: String::new(),
                },
                &k,
            ))
            .await
    })
    .await;
}

#[tokio::test]
async fn an_owner_key_cannot_escalate_within_its_own_owner() {
    let w = world().await;
    let pd = Code::PermissionDenied;
    let mint_as = |scopes: &'static [&'static str], expiry: Option<pb::mint_request::Expiry>| {
        move |app: Clients, k: String| async move {
            app.keys
                .clone()
                .mint(with_key(
                    pb::MintRequest {
                        owner_id: "a".into(),
                        scopes: scopes.iter().map(|s| s.to_string()).collect(),
                        expiry,
                        ..Default::default()
                    },
                    &k,
                ))
                .await
        }
    };
    let hour = || {
        Some(pb::mint_request::Expiry::Ttl(prost_types::Duration {
            seconds: 1800,
            nanos: 0,
        }))
    };
    refused(
        &w,
        "mint keyward:admin",
        pd,
        mint_as(&["keyward:admin"], hour()),
    )
    .await;
    refused(
        &w,
        "mint keyward:owner",
        pd,
        mint_as(&["keyward:owner"], hour()),
    )
    .await;
    refused(
        &w,
        "mint outside the ceiling",
        pd,
        mint_as(&["billing:read"], hour()),
    )
    .await;
    refused(
        &w,
        "mint a key that outlives the manager",
        pd,
        mint_as(&["orders:read"], None),
    )
    .await;
    let day = Some(pb::mint_request::Expiry::Ttl(prost_types::Duration {
        seconds: 86_400,
        nanos: 0,
    }));
    refused(
        &w,
        "mint a key expiring after the manager",
        pd,
        mint_as(&["orders:read"], day),
    )
    .await;

    let disabled = w.a_disabled_by_admin.clone();
    refused(
        &w,
        "re-enable what an admin disabled",
        pd,
        |app, k| async move {
            app.keys
                .clone()
                .enable(with_key(pb::EnableRequest { id: disabled }, &k))
                .await
        },
    )
    .await;

    let manager = w.a_other_manager.clone();
    for what in ["revoke", "disable", "update", "rotate"] {
        let manager = manager.clone();
        refused(
            &w,
            &format!("{what} another management key"),
            pd,
            |app, k| async move {
                let mut keys = app.keys.clone();
                match what {
                    "revoke" => keys
                        .revoke(with_key(
                            pb::RevokeRequest {
                                id: manager,
                                reason: String::new(),
                            },
                            &k,
                        ))
                        .await
                        .map(|_| ()),
                    "disable" => keys
                        .disable(with_key(pb::DisableRequest { id: manager }, &k))
                        .await
                        .map(|_| ()),
                    "update" => keys
                        .update(with_key(
                            pb::UpdateRequest {
                                id: manager,
                                key: Some(pb::ApiKey::default()),
                                update_mask: mask(&["name"]),
                                add_credits: 0,
                            },
                            &k,
                        ))
                        .await
                        .map(|_| ()),
                    _ => keys
                        .rotate(with_key(
                            pb::RotateRequest {
                                id: manager,
                                grace: None,
                            },
                            &k,
                        ))
                        .await
                        .map(|_| ()),
                }
            },
        )
        .await;
    }

    // A data-plane key of A, and what the manager may not make of it.
    let data = w
        .app
        .keys
        .clone()
        .mint(with_key(
            pb::MintRequest {
                owner_id: "a".into(),
                scopes: vec!["orders:read".into()],
                expiry: hour(),
                ..Default::default()
            },
            &w.a_key,
        ))
        .await
        .expect("the manager mints within its limits")
        .into_inner()
        .key
        .expect("key")
        .id;
    for (what, scopes) in [
        ("grant keyward:admin by update", vec!["keyward:admin"]),
        ("update beyond the ceiling", vec!["billing:read"]),
    ] {
        let data = data.clone();
        refused(&w, what, pd, |app, k| async move {
            app.keys
                .clone()
                .update(with_key(
                    pb::UpdateRequest {
                        id: data,
                        key: Some(pb::ApiKey {
                            scopes: scopes.iter().map(|s| s.to_string()).collect(),
                            ..Default::default()
                        }),
                        update_mask: mask(&["scopes"]),
                        add_credits: 0,
                    },
                    &k,
                ))
                .await
        })
        .await;
    }
    let data_for_expiry = data.clone();
    refused(
        &w,
        "update the expiry past the manager's",
        pd,
        |app, k| async move {
            app.keys
                .clone()
                .update(with_key(
                    pb::UpdateRequest {
                        id: data_for_expiry,
                        key: Some(pb::ApiKey::default()),
                        update_mask: mask(&["expires_at"]),
                        add_credits: 0,
                    },
                    &k,
                ))
                .await
        },
    )
    .await;

    // What it may do: change its data keys, and revoke itself.
    w.app
        .keys
        .clone()
        .disable(with_key(pb::DisableRequest { id: data.clone() }, &w.a_key))
        .await
        .expect("disable its own data key");
    w.app
        .keys
        .clone()
        .enable(with_key(pb::EnableRequest { id: data }, &w.a_key))
        .await
        .expect("enable what it disabled");
    w.app
        .keys
        .clone()
        .revoke(with_key(
            pb::RevokeRequest {
                id: w.a_key_id.clone(),
                reason: "done".into(),
            },
            &w.a_key,
        ))
        .await
        .expect("revoke itself");
}

#[tokio::test]
async fn a_revoked_management_key_is_refused_even_by_a_replica_that_missed_the_notice() {
    let a = spawn_app().await;
    let b = spawn_replica(&a, &[]).await;
    let manager = a
        .mint(pb::MintRequest {
            owner_id: "acme".into(),
            scopes: vec!["keyward:owner".into()],
            ..Default::default()
        })
        .await;
    let list = || with_key(pb::ListRequest::default(), &manager.secret);
    b.keys
        .clone()
        .list(list())
        .await
        .expect("B caches the manager");
    // The Mint's own notice may arrive just as B fills its cache and spoil
    // that fill (a harmless extra lookup later); cache it again once the
    // notice is surely in.
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.keys
        .clone()
        .list(list())
        .await
        .expect("B caches the manager");

    // Revoked without a notice reaching anyone.
    sqlx::query("ALTER TABLE keys DISABLE TRIGGER keys_notify_change")
        .execute(&a.db)
        .await
        .expect("disable trigger");
    sqlx::query("UPDATE keys SET revoked_at = now() WHERE id = $1::uuid")
        .bind(manager.key.as_ref().expect("key").id.clone())
        .execute(&a.db)
        .await
        .expect("revoke by hand");
    sqlx::query("ALTER TABLE keys ENABLE TRIGGER keys_notify_change")
        .execute(&a.db)
        .await
        .expect("enable trigger");
    tokio::time::sleep(Duration::from_millis(100)).await;
    // B's cache still says yes to the key as a data key...
    let cached = b.check_key(&manager.secret).await.expect("check");
    assert!(cached.allowed, "{cached:?}");
    // ...but every admin call re-reads it.
    let err = b.keys.clone().list(list()).await.expect_err("revoked");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("REVOKED"), "{}", err.message());
    // And B's cache learned it.
    assert_eq!(
        reason(&b.check_key(&manager.secret).await.expect("check")),
        Reason::Revoked
    );
}

#[tokio::test]
async fn the_last_active_admin_key_cannot_be_revoked_or_disabled() {
    let app = spawn_app().await;
    let before = snapshot(&app).await;
    let mut keys = app.keys.clone();
    let err = keys
        .revoke(app.admin(pb::RevokeRequest {
            id: app.admin_id.clone(),
            reason: "oops".into(),
        }))
        .await
        .expect_err("last admin");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("keyward bootstrap"),
        "{}",
        err.message()
    );
    let err = keys
        .disable(app.admin(pb::DisableRequest {
            id: app.admin_id.clone(),
        }))
        .await
        .expect_err("last admin");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(snapshot(&app).await, before, "nothing written");

    // With a second admin key, the first may go.
    let second = app
        .mint(pb::MintRequest {
            owner_id: "ops".into(),
            scopes: vec!["keyward:admin".into()],
            ..Default::default()
        })
        .await;
    keys.revoke(with_key(
        pb::RevokeRequest {
            id: app.admin_id.clone(),
            reason: "rotated".into(),
        },
        &second.secret,
    ))
    .await
    .expect("revoke the first admin key");
    // Now the second is the last.
    let err = keys
        .revoke(with_key(
            pb::RevokeRequest {
                id: second.key.expect("key").id,
                reason: String::new(),
            },
            &second.secret,
        ))
        .await
        .expect_err("last admin");
    assert_eq!(err.code(), Code::FailedPrecondition);
}

/// Revoke reads the key without a lock and writes only if the row is still
/// the one it read. Here, between the read and the write (inside the guard,
/// which runs between them), another admin makes the data-plane key a
/// management key, which an owner key may not revoke: the revocation is
/// judged again on the key as it now is, and refused, writing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_judges_a_key_changed_after_it_was_read_as_it_now_is() {
    use std::sync::atomic::{AtomicU32, Ordering};

    use keyward::{
        key::{KeyId, KeyRecord},
        store::{Actor, Refusal, StoreError},
    };

    let app = spawn_app().await;
    let minted = app.mint_for("acme").await.key.expect("key");
    let id = KeyId::parse(&minted.id).expect("key id");
    let judged = AtomicU32::new(0);
    // What an owner key's Revoke asks (`Caller::may_change`).
    let guard = |key: &KeyRecord| {
        if judged.fetch_add(1, Ordering::SeqCst) == 0 {
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(
                    sqlx::query(
                        "UPDATE keys SET scopes = scopes || 'keyward:owner'::text WHERE id = $1",
                    )
                    .bind(id.as_uuid())
                    .execute(&app.db),
                )
            })
            .expect("make it a management key");
        }
        if key.is_management_key() {
            Err(Refusal::PermissionDenied("a management key".into()))
        } else {
            Ok(())
        }
    };
    let admin = KeyId::parse(&app.admin_id).expect("admin id");
    let result = app
        .replica
        .store()
        .revoke_key(id, Some("test"), None, &guard, &Actor::key(admin, None))
        .await;

    assert!(
        matches!(
            result,
            Err(StoreError::Refused(Refusal::PermissionDenied(_)))
        ),
        "{result:?}"
    );
    assert_eq!(
        judged.load(Ordering::SeqCst),
        2,
        "judged as read, then as locked"
    );
    let key = app.get(&minted.id).await;
    assert!(key.revoked_at.is_none(), "{key:?}");
    assert!(key.scopes.iter().any(|s| s == "keyward:owner"));
    let revocations: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE action = 'key.revoke'")
            .fetch_one(&app.db)
            .await
            .expect("audit");
    assert_eq!(revocations, 0);
}
