//! Scenario 4: The admin plane: List at a million keys, sustained Mint.

use std::time::Duration;

use sqlx::{Connection as _, PgConnection};

use crate::{Ctx, Suite, admin, k, lat, verdict};

pub async fn run(suite: &mut Suite, ctx: &Ctx) {
    let Ctx {
        kw, url, admin_key, ..
    } = ctx;
    eprintln!("4. admin plane");
    let a = &suite.args;
    let mut conn = PgConnection::connect(url).await.expect("connect");
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM keys")
        .fetch_one(&mut conn)
        .await
        .expect("count");
    let tokens: Vec<String> = sqlx::query_scalar(
        "SELECT replace(id::text, '-', '') FROM keys ORDER BY random() LIMIT 2000",
    )
    .fetch_all(&mut conn)
    .await
    .expect("tokens");
    let l = admin::list_latency(kw.addr, admin_key, None, &tokens, a.duration).await;
    suite.table.row(
        &format!("List page of 100, whole table ({total} keys), random positions"),
        "tonic c1m1",
        lat(&l),
        "—".into(),
        "—".into(),
        &format!("p99 ≤ 5 ms: {}", verdict(l.p99 <= Duration::from_millis(5))),
    );
    let l = admin::list_latency(kw.addr, admin_key, Some("owner-500"), &tokens, a.duration).await;
    suite.table.row(
        "List page of 100, one owner's keys, paging",
        "tonic c1m1",
        lat(&l),
        "—".into(),
        "—".into(),
        &format!("p99 ≤ 5 ms: {}", verdict(l.p99 <= Duration::from_millis(5))),
    );
    // Mint last: its burst of inserts leaves Postgres busy (autovacuum,
    // checkpoint) for a while, which would weigh on the List figures.
    let mint = admin::mint_rate(kw.addr, admin_key, 32, a.duration * 2).await;
    suite.table.row(
        "Mint sustained",
        "tonic, 32 in flight",
        k(mint),
        "—".into(),
        "—".into(),
        &format!("≥ 2,000/s: {}", verdict(mint >= 2000.0)),
    );
}
