//! A key's life after Mint, and the accounts keys belong to: owners and
//! their suspension, Update, Rotate, Explain, the audit trail, leak reports
//! and canary keys.

use std::time::Duration;

use keyward::pb::{self, Reason};
use prost_types::FieldMask;
use tonic::Code;

use crate::helpers::{TestApp, eventually, never_minted, reason, spawn_app, spawn_replica};

fn mask(paths: &[&str]) -> Option<FieldMask> {
    Some(FieldMask {
        paths: paths.iter().map(|p| p.to_string()).collect(),
    })
}

pub async fn set_owner_state(app: &TestApp, owner: &str, state: pb::owner::State, why: &str) {
    app.owners
        .clone()
        .update(app.admin(pb::OwnerServiceUpdateRequest {
            id: owner.into(),
            owner: Some(pb::Owner {
                state: state.into(),
                state_reason: why.into(),
                ..Default::default()
            }),
            update_mask: mask(&["state", "state_reason"]),
        }))
        .await
        .expect("update owner");
}

/// Polls `replica` until `key` gets `want`, for at most a second.
async fn until(replica: &TestApp, key: &str, want: Reason) {
    eventually(Duration::from_secs(1), || async {
        let resp = replica.check_key(key).await.ok()?;
        (reason(&resp) == want).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("the replica never answered {want:?}"));
}

#[tokio::test]
async fn suspending_an_owner_refuses_all_its_keys_on_every_replica_and_resuming_restores_them() {
    let a = spawn_app().await;
    let b = spawn_replica(&a, &[]).await;
    let first = a.mint_for("acme").await.secret;
    let second = a.mint_for("acme").await.secret;
    let other = a.mint_for("globex").await.secret;
    for replica in [&a, &b] {
        for key in [&first, &second, &other] {
            assert!(replica.check_key(key).await.expect("check").allowed);
        }
    }

    set_owner_state(
        &a,
        "acme",
        pb::owner::State::Suspended,
        "subscription lapsed",
    )
    .await;
    for replica in [&a, &b] {
        for key in [&first, &second] {
            until(replica, key, Reason::OwnerInactive).await;
        }
        let resp = replica.check_key(&first).await.expect("check");
        assert_eq!(resp.http_status, 403);
        assert!(
            replica.check_key(&other).await.expect("check").allowed,
            "other owners are untouched"
        );
    }
    let owner = a
        .owners
        .clone()
        .get(a.admin(pb::OwnerServiceGetRequest { id: "acme".into() }))
        .await
        .expect("get owner")
        .into_inner();
    assert_eq!(owner.state(), pb::owner::State::Suspended);
    assert_eq!(owner.state_reason, "subscription lapsed");
    assert_eq!(owner.key_count, 2);

    set_owner_state(&a, "acme", pb::owner::State::Active, "").await;
    for replica in [&a, &b] {
        until(replica, &first, Reason::Ok).await;
        until(replica, &second, Reason::Ok).await;
    }
}

#[tokio::test]
async fn owners_are_created_listed_and_bounded_by_their_ceiling_and_quota() {
    let app = spawn_app().await;
    let mut owners = app.owners.clone();
    let created = owners
        .create(app.admin(pb::OwnerServiceCreateRequest {
            id: "initech".into(),
            display_name: "Initech".into(),
            allowed_scopes: vec!["reports:read".into()],
            allowed_resources: vec!["reports".into()],
            max_keys: 2,
            ..Default::default()
        }))
        .await
        .expect("create")
        .into_inner();
    assert_eq!(created.state(), pb::owner::State::Active);
    let again = owners
        .create(app.admin(pb::OwnerServiceCreateRequest {
            id: "initech".into(),
            ..Default::default()
        }))
        .await
        .expect_err("exists");
    assert_eq!(again.code(), Code::AlreadyExists);

    // The ceiling binds every Mint, admins included.
    let mint = |scopes: &[&str], resources: &[&str]| pb::MintRequest {
        owner_id: "initech".into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        resources: resources.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let mut keys = app.keys.clone();
    for (req, field) in [
        (mint(&["reports:write"], &["reports"]), "scopes[0]"),
        (mint(&["reports:read"], &[]), "resources"),
        (mint(&["reports:read"], &["billing"]), "resources[0]"),
    ] {
        let err = keys
            .mint(app.admin(req))
            .await
            .expect_err("outside the ceiling");
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        assert!(err.message().starts_with(field), "{}", err.message());
    }
    // The quota: two keys at once.
    for _ in 0..2 {
        keys.mint(app.admin(mint(&["reports:read"], &["reports"])))
            .await
            .expect("within the quota");
    }
    let err = keys
        .mint(app.admin(mint(&["reports:read"], &["reports"])))
        .await
        .expect_err("over the quota");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("max_keys 2"), "{}", err.message());
    let (key_rows, _, _) = app.row_counts().await;
    assert_eq!(key_rows, 3, "the admin key and two of initech's");

    // Owners page in id order; one is created by its first Mint.
    app.mint_for("zeta").await;
    let page = owners
        .list(app.admin(pb::OwnerServiceListRequest {
            page_size: Some(2),
            ..Default::default()
        }))
        .await
        .expect("list")
        .into_inner();
    let ids: Vec<_> = page.owners.iter().map(|o| o.id.as_str()).collect();
    assert_eq!(ids, ["initech", "ops"]);
    let rest = owners
        .list(app.admin(pb::OwnerServiceListRequest {
            page_token: page.next_page_token,
            ..Default::default()
        }))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(
        rest.owners
            .iter()
            .map(|o| o.id.as_str())
            .collect::<Vec<_>>(),
        ["zeta"]
    );
    assert!(rest.next_page_token.is_empty());
}

#[tokio::test]
async fn update_narrows_a_keys_scopes_and_another_replica_sees_it_at_once() {
    let a = spawn_app().await;
    let b = spawn_replica(&a, &[]).await;
    let minted = a
        .mint(pb::MintRequest {
            owner_id: "acme".into(),
            scopes: vec!["orders:read".into(), "orders:write".into()],
            ..Default::default()
        })
        .await;
    let id = minted.key.expect("key").id;
    let write = |key: &str| pb::CheckRequest {
        key: key.into(),
        required_scopes: vec!["orders:write".into()],
        ..Default::default()
    };
    assert!(b.check(write(&minted.secret)).await.expect("check").allowed);

    let updated = a
        .keys
        .clone()
        .update(a.admin(pb::UpdateRequest {
            id: id.clone(),
            key: Some(pb::ApiKey {
                scopes: vec!["orders:read".into()],
                name: "read only now".into(),
                ..Default::default()
            }),
            update_mask: mask(&["scopes", "name"]),
            add_credits: 0,
        }))
        .await
        .expect("update")
        .into_inner();
    assert_eq!(updated.scopes, ["orders:read"]);
    assert_eq!(updated.name, "read only now");
    eventually(Duration::from_secs(1), || async {
        let resp = b.check(write(&minted.secret)).await.ok()?;
        (reason(&resp) == Reason::ScopeMissing).then_some(())
    })
    .await
    .expect("B refuses the narrowed key");

    // Audited with what changed.
    let details: serde_json::Value = sqlx::query_scalar(
        "SELECT details FROM audit_events WHERE key_id = $1::uuid AND action = 'key.update'",
    )
    .bind(&id)
    .fetch_one(&a.db)
    .await
    .expect("audit");
    assert_eq!(
        details["scopes"]["from"],
        serde_json::json!(["orders:read", "orders:write"])
    );
    assert_eq!(details["scopes"]["to"], serde_json::json!(["orders:read"]));

    // Bad masks are refused with nothing written.
    let (_, _, events) = a.row_counts().await;
    for (update_mask, field) in [(None, "update_mask"), (mask(&["hash"]), "update_mask")] {
        let err = a
            .keys
            .clone()
            .update(a.admin(pb::UpdateRequest {
                id: id.clone(),
                key: None,
                update_mask,
                add_credits: 0,
            }))
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().starts_with(field), "{}", err.message());
    }
    assert_eq!(a.row_counts().await.2, events);
}

async fn rotate(app: &TestApp, id: &str, grace: Option<Duration>) -> pb::RotateResponse {
    app.keys
        .clone()
        .rotate(app.admin(pb::RotateRequest {
            id: id.into(),
            grace: grace.map(|g| prost_types::Duration {
                seconds: g.as_secs() as i64,
                nanos: g.subsec_nanos() as i32,
            }),
        }))
        .await
        .expect("rotate")
        .into_inner()
}

#[tokio::test]
async fn rotation_keeps_both_keys_working_through_the_grace_and_links_them() {
    let a = spawn_app().await;
    let b = spawn_replica(&a, &[]).await;
    let old = a
        .mint(pb::MintRequest {
            owner_id: "acme".into(),
            scopes: vec!["invoices:read".into()],
            name: "ci".into(),
            ..Default::default()
        })
        .await;
    let old_id = old.key.expect("key").id;
    let rotated = rotate(&a, &old_id, Some(Duration::from_secs(2))).await;
    let new = rotated.key.expect("new key");
    assert_ne!(rotated.secret, old.secret);
    assert_eq!(new.scopes, ["invoices:read"], "the grant is copied");
    assert_eq!(new.name, "ci");
    assert_eq!(new.rotated_from, old_id);
    assert_eq!(rotated.previous.expect("old key").replaced_by, new.id);

    for replica in [&a, &b] {
        assert!(replica.check_key(&old.secret).await.expect("check").allowed);
        assert!(
            replica
                .check_key(&rotated.secret)
                .await
                .expect("check")
                .allowed
        );
    }
    // Links show through Get and List.
    assert_eq!(a.get(&old_id).await.replaced_by, new.id);
    let listed = a
        .keys
        .clone()
        .list(a.admin(pb::ListRequest {
            owner_id: "acme".into(),
            ..Default::default()
        }))
        .await
        .expect("list")
        .into_inner();
    let link = listed
        .keys
        .iter()
        .find(|k| k.id == new.id)
        .expect("new key listed");
    assert_eq!(link.rotated_from, old_id);

    // After the grace the old key is expired; the new one works.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    for replica in [&a, &b] {
        let resp = replica.check_key(&old.secret).await.expect("check");
        assert_eq!(reason(&resp), Reason::Expired);
        assert!(
            replica
                .check_key(&rotated.secret)
                .await
                .expect("check")
                .allowed
        );
    }

    // A replaced key cannot be rotated again.
    let err = a
        .keys
        .clone()
        .rotate(a.admin(pb::RotateRequest {
            id: old_id,
            grace: None,
        }))
        .await
        .expect_err("already rotated");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
}

#[tokio::test]
async fn rotation_with_no_grace_refuses_the_old_key_at_once_on_every_replica() {
    let a = spawn_app().await;
    let b = spawn_replica(&a, &[]).await;
    let old = a.mint_for("acme").await;
    for replica in [&a, &b] {
        assert!(replica.check_key(&old.secret).await.expect("check").allowed);
    }
    let rotated = rotate(&a, &old.key.expect("key").id, Some(Duration::ZERO)).await;
    for replica in [&a, &b] {
        until(replica, &old.secret, Reason::Expired).await;
        assert!(
            replica
                .check_key(&rotated.secret)
                .await
                .expect("check")
                .allowed
        );
    }
    // The grace is bounded.
    let err = a
        .keys
        .clone()
        .rotate(a.admin(pb::RotateRequest {
            id: rotated.key.expect("key").id,
            grace: Some(prost_types::Duration {
                seconds: 8 * 86_400,
                nanos: 0,
            }),
        }))
        .await
        .expect_err("too long");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("grace:"), "{}", err.message());
}

#[tokio::test]
async fn explain_gives_every_rules_verdict_without_counting_as_use() {
    let app = spawn_app().await;
    let minted = app
        .mint(pb::MintRequest {
            owner_id: "acme".into(),
            scopes: vec!["invoices:read".into()],
            resources: vec!["billing".into()],
            ip_allow: vec!["10.0.0.0/8".into()],
            ..Default::default()
        })
        .await;
    let id = minted.key.expect("key").id;
    let explain = |resource: &str, ip: &str| pb::ExplainRequest {
        id: id.clone(),
        resource: resource.into(),
        required_scopes: vec!["invoices:write".into()],
        client_ip: ip.into(),
    };
    let answer = app
        .keys
        .clone()
        .explain(app.admin(explain("orders", "192.0.2.1")))
        .await
        .expect("explain")
        .into_inner();
    assert!(!answer.allowed);
    assert_eq!(answer.reason(), Reason::IpForbidden);
    let verdicts: Vec<(&str, bool)> = answer
        .rules
        .iter()
        .map(|r| (r.rule.as_str(), r.passed))
        .collect();
    assert_eq!(
        verdicts,
        [
            ("canary", true),
            ("revoked", true),
            ("expiry", true),
            ("disabled", true),
            ("owner", true),
            ("ip_allow", false),
            ("resources", false),
            ("scopes", false),
        ]
    );
    let missing = answer
        .rules
        .iter()
        .find(|r| r.rule == "scopes")
        .expect("scopes rule");
    assert!(
        missing.detail.contains("invoices:write"),
        "{}",
        missing.detail
    );

    // Not use: nothing is recorded for the key.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(app.get(&id).await.last_used_at.is_none());
}

#[tokio::test]
async fn the_audit_trail_lists_a_scripted_run_in_order_with_paging_and_owner_keys_see_only_their_own()
 {
    let app = spawn_app().await;
    let acme = app.mint_for("acme").await.key.expect("key").id;
    let globex = app.mint_for("globex").await.key.expect("key").id;
    app.revoke(&acme).await;
    app.keys
        .clone()
        .disable(app.admin(pb::DisableRequest { id: globex.clone() }))
        .await
        .expect("disable");
    set_owner_state(&app, "acme", pb::owner::State::Suspended, "unpaid").await;

    // Everything since the bootstrap, two at a time.
    let mut events = Vec::new();
    let mut token = String::new();
    loop {
        let page = app
            .audit
            .clone()
            .list(app.admin(pb::AuditServiceListRequest {
                page_size: Some(2),
                page_token: token,
                ..Default::default()
            }))
            .await
            .expect("list audit")
            .into_inner();
        assert!(page.events.len() <= 2);
        events.extend(page.events);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let run: Vec<(&str, &str, &str)> = events
        .iter()
        .skip(1) // the bootstrap key's own mint
        .map(|e| (e.action.as_str(), e.key_id.as_str(), e.owner_id.as_str()))
        .collect();
    assert_eq!(
        run,
        [
            ("key.mint", acme.as_str(), "acme"),
            ("key.mint", globex.as_str(), "globex"),
            ("key.revoke", acme.as_str(), "acme"),
            ("key.disable", globex.as_str(), "globex"),
            ("owner.update", "", "acme"),
        ]
    );
    let admin_id = app.admin_id.clone();
    for e in &events[1..] {
        assert_eq!(e.actor_key_id, admin_id);
        assert_eq!(e.remote_addr, "127.0.0.1", "{e:?}");
    }
    let suspension = events
        .last()
        .expect("event")
        .details
        .as_ref()
        .expect("details");
    assert!(suspension.fields.contains_key("state"), "{suspension:?}");

    // Filters combine: the key's own events.
    let page = app
        .audit
        .clone()
        .list(app.admin(pb::AuditServiceListRequest {
            key_id: acme.clone(),
            action: "key.revoke".into(),
            ..Default::default()
        }))
        .await
        .expect("filtered")
        .into_inner();
    assert_eq!(page.events.len(), 1);

    // An owner key sees only its owner's events.
    let owner_key = app
        .mint(pb::MintRequest {
            owner_id: "globex".into(),
            scopes: vec!["keyward:owner".into()],
            ..Default::default()
        })
        .await
        .secret;
    let seen = app
        .audit
        .clone()
        .list(crate::helpers::with_key(
            pb::AuditServiceListRequest::default(),
            &owner_key,
        ))
        .await
        .expect("owner's events")
        .into_inner();
    assert!(!seen.events.is_empty());
    assert!(
        seen.events.iter().all(|e| e.owner_id == "globex"),
        "{seen:?}"
    );
    let err = app
        .audit
        .clone()
        .list(crate::helpers::with_key(
            pb::AuditServiceListRequest {
                owner_id: "acme".into(),
                ..Default::default()
            },
            &owner_key,
        ))
        .await
        .expect_err("another owner's events");
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn a_leak_report_answers_alike_for_real_and_forged_keys_and_revokes_the_real_one() {
    let app = spawn_app().await;
    let leaked = app.mint_for("acme").await;
    let id = leaked.key.expect("key").id;
    let report = |secret: String| pb::ReportRequest {
        secret,
        source: "https://paste.example/abc".into(),
    };
    // No management key needed.
    let real = app
        .leaks
        .clone()
        .report(report(leaked.secret.clone()))
        .await
        .expect("report a real key");
    let forged = app
        .leaks
        .clone()
        .report(report(never_minted().expose_secret().to_owned()))
        .await
        .expect("report a forged key");
    assert_eq!(real.get_ref(), forged.get_ref());
    assert_eq!(
        prost::Message::encode_to_vec(real.get_ref()),
        prost::Message::encode_to_vec(forged.get_ref())
    );

    eventually(Duration::from_secs(2), || async {
        let key = app.get(&id).await;
        (key.state() == pb::api_key::State::Revoked).then_some(())
    })
    .await
    .expect("the reported key is revoked");
    let key = app.get(&id).await;
    assert_eq!(key.revoked_reason, "LEAKED");
    let resp = app.check_key(&leaked.secret).await.expect("check");
    assert_eq!(reason(&resp), Reason::Revoked);
    let (actor, remote, details): (String, Option<String>, serde_json::Value) = sqlx::query_as(
        "SELECT actor, host(remote_addr), details FROM audit_events \
         WHERE key_id = $1::uuid AND action = 'key.revoke'",
    )
    .bind(&id)
    .fetch_one(&app.db)
    .await
    .expect("audit");
    assert_eq!(actor, "leak-report");
    assert_eq!(remote.as_deref(), Some("127.0.0.1"));
    assert_eq!(details["found_at"], "https://paste.example/abc");

    // Reports are throttled per address, whatever the key.
    let mut refused = None;
    for _ in 0..12 {
        if let Err(err) = app
            .leaks
            .clone()
            .report(report(never_minted().expose_secret().to_owned()))
            .await
        {
            refused = Some(err);
            break;
        }
    }
    assert_eq!(refused.expect("throttled").code(), Code::ResourceExhausted);
}

#[tokio::test]
async fn a_canary_key_is_refused_as_an_unknown_key_and_reported() {
    let app = spawn_app().await;
    let canary = app
        .mint(pb::MintRequest {
            owner_id: "acme".into(),
            canary: true,
            ..Default::default()
        })
        .await;
    let id = canary.key.as_ref().expect("key").id.clone();
    assert!(canary.key.expect("key").canary);
    let logs = crate::helpers::CapturedLogs::start();

    let tripped = app
        .check(pb::CheckRequest {
            key: canary.secret.clone(),
            resource: "billing".into(),
            client_ip: "192.0.2.44".into(),
            ..Default::default()
        })
        .await
        .expect("check");
    let unknown = app
        .check(pb::CheckRequest {
            key: never_minted().expose_secret().into(),
            resource: "billing".into(),
            client_ip: "192.0.2.45".into(),
            ..Default::default()
        })
        .await
        .expect("check");
    assert_eq!(
        tripped, unknown,
        "nothing tells a canary from an unknown key"
    );
    assert_eq!(reason(&tripped), Reason::UnknownKey);

    eventually(Duration::from_secs(2), || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM audit_events WHERE key_id = $1::uuid \
             AND action = 'key.canary_tripped' AND host(remote_addr) = '192.0.2.44' \
             AND details->>'resource' = 'billing'",
        )
        .bind(&id)
        .fetch_one(&app.db)
        .await
        .ok()?;
        (n == 1).then_some(())
    })
    .await
    .expect("the audit event");
    let line = logs.find("canary key presented").expect("a WARN line");
    assert!(
        line.contains("WARN") && line.contains("192.0.2.44") && line.contains("billing"),
        "{line}"
    );
}
