//! KeyService.List: keyset pagination and owner filtering.

use std::collections::HashSet;

use keyward::pb;

use crate::helpers::spawn_app;

#[tokio::test]
async fn list_pages_through_250_keys_without_gaps_or_repeats_and_filters_by_owner() {
    let app = spawn_app().await;
    let mut minted = Vec::new();
    for i in 0..250 {
        minted.push(app.mint_for("acme").await.key.expect("key").id);
        // Another owner's keys interleave with acme's in id order.
        if i % 10 == 0 {
            app.mint_for("globex").await;
        }
    }

    let mut keys = app.keys.clone();
    let mut seen = Vec::new();
    let mut page_sizes = Vec::new();
    let mut token = String::new();
    loop {
        let page = keys
            .list(app.admin(pb::ListRequest {
                owner_id: "acme".into(),
                page_size: Some(100),
                page_token: token.clone(),
                include_revoked: false,
            }))
            .await
            .expect("list")
            .into_inner();
        page_sizes.push(page.keys.len());
        assert!(page.keys.iter().all(|k| k.owner_id == "acme"));
        seen.extend(page.keys.into_iter().map(|k| k.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        assert!(page_sizes.len() < 10, "pagination does not end");
    }
    assert_eq!(page_sizes, [100, 100, 50]);
    assert_eq!(seen.len(), 250);
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 250, "repeats");
    assert_eq!(seen, minted, "keys in creation order, none missing");
}

#[tokio::test]
async fn list_hides_revoked_keys_unless_asked() {
    let app = spawn_app().await;
    let kept = app.mint_for("acme").await.key.expect("key").id;
    let gone = app.mint_for("acme").await.key.expect("key").id;
    app.revoke(&gone).await;
    let mut keys = app.keys.clone();
    let list = |include_revoked| {
        app.admin(pb::ListRequest {
            owner_id: "acme".into(),
            include_revoked,
            ..Default::default()
        })
    };

    let active = keys.list(list(false)).await.expect("list").into_inner();
    let ids: Vec<_> = active.keys.iter().map(|k| k.id.as_str()).collect();
    assert_eq!(ids, [kept.as_str()]);

    let all = keys.list(list(true)).await.expect("list").into_inner();
    let ids: Vec<_> = all.keys.iter().map(|k| k.id.as_str()).collect();
    assert_eq!(ids, [kept.as_str(), gone.as_str()]);
    assert_eq!(all.keys[1].state(), pb::api_key::State::Revoked);
}

#[tokio::test]
async fn list_defaults_to_pages_of_fifty() {
    let app = spawn_app().await;
    for _ in 0..55 {
        app.mint_for("acme").await;
    }
    let page = app
        .keys
        .clone()
        .list(app.admin(pb::ListRequest {
            owner_id: "acme".into(),
            ..Default::default()
        }))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(page.keys.len(), 50);
    assert!(!page.next_page_token.is_empty());
}
