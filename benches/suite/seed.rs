//! A bench database with N keys, written with COPY: the secrets stay in
//! memory so the load can present them; the table holds only their hashes.

use std::{fmt::Write as _, time::Instant};

use keyward::key::{ApiKey, KeyId, KeyPrefix};
use sqlx::{Connection as _, PgConnection};

pub const OWNERS: usize = 1000;
pub const RESOURCE: &str = "billing";
pub const SCOPE: &str = "invoices:read";

/// Keys `i` belongs to owner `owner-{i % OWNERS}`; every key holds
/// `invoices:read` for `billing`.
pub async fn seed(url: &str, n: usize) -> Vec<String> {
    let started = Instant::now();
    let prefix = KeyPrefix::parse("kw_live").expect("prefix");
    let mut conn = PgConnection::connect(url)
        .await
        .expect("connect to the bench database");
    sqlx::query("INSERT INTO owners (id) SELECT 'owner-' || g FROM generate_series(0, $1 - 1) g ON CONFLICT DO NOTHING")
        .bind(i32::try_from(OWNERS).expect("owners"))
        .execute(&mut conn)
        .await
        .expect("owners");
    let mut secrets = Vec::with_capacity(n);
    let mut copy = conn
        .copy_in_raw(
            "COPY keys (id, hash, prefix, start, owner_id, name, scopes, resources) FROM STDIN",
        )
        .await
        .expect("copy");
    let mut chunk = String::with_capacity(1 << 20);
    for i in 0..n {
        let key = ApiKey::generate(&prefix);
        let mut hex = String::with_capacity(64);
        for b in key.hash().as_bytes() {
            let _ = write!(hex, "{b:02x}");
        }
        let _ = writeln!(
            chunk,
            "{}\t\\\\x{hex}\tkw_live\t{}\towner-{}\tbench-{i}\t{{{SCOPE}}}\t{{{RESOURCE}}}",
            KeyId::new_v7(),
            key.start(),
            i % OWNERS,
        );
        secrets.push(key.expose_secret().to_owned());
        if chunk.len() > (1 << 20) - 256 {
            copy.send(chunk.as_bytes()).await.expect("copy chunk");
            chunk.clear();
        }
    }
    copy.send(chunk.as_bytes()).await.expect("copy chunk");
    copy.finish().await.expect("copy finish");
    // Settle the table before anything is measured: set hint bits and the
    // visibility map now (rather than on the first lookups), give autovacuum
    // nothing to do mid-run, and flush the load's dirty pages.
    sqlx::query("VACUUM (ANALYZE) keys")
        .execute(&mut conn)
        .await
        .expect("vacuum");
    sqlx::query("CHECKPOINT")
        .execute(&mut conn)
        .await
        .expect("checkpoint");
    eprintln!("seeded {n} keys in {:.1?}", started.elapsed());
    secrets
}
