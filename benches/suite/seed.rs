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

/// `n` more keys (owner `owner-0`, the same grant as the seeded ones) with
/// `rate_limits` (a JSON array, keys.rate_limits) and, with `credits`, one
/// shared bucket of that many credits (the first key's). COPY, then the
/// table settles like after `seed`.
pub async fn seed_limited(
    url: &str,
    n: usize,
    rate_limits: Option<&str>,
    credits: Option<u64>,
) -> Vec<String> {
    let prefix = KeyPrefix::parse("kw_live").expect("prefix");
    let mut conn = PgConnection::connect(url).await.expect("connect");
    let bucket = KeyId::new_v7();
    let mut copy = conn
        .copy_in_raw(
            "COPY keys (id, hash, prefix, start, owner_id, name, scopes, resources, \
                        rate_limits, bucket_id, has_credits) FROM STDIN",
        )
        .await
        .expect("copy");
    let mut chunk = String::with_capacity(1 << 20);
    let mut secrets = Vec::with_capacity(n);
    let limits = rate_limits.map_or_else(|| "\\N".to_owned(), |l| l.replace('\\', "\\\\"));
    for i in 0..n {
        let key = ApiKey::generate(&prefix);
        let id = if i == 0 { bucket } else { KeyId::new_v7() };
        let mut hex = String::with_capacity(64);
        for b in key.hash().as_bytes() {
            let _ = write!(hex, "{b:02x}");
        }
        let (bucket_col, has_credits) = match credits {
            Some(_) => (bucket.to_string(), "t"),
            None => ("\\N".to_owned(), "f"),
        };
        let _ = writeln!(
            chunk,
            "{id}\t\\\\x{hex}\tkw_live\t{}\towner-0\tlimited-{i}\t{{{SCOPE}}}\t{{{RESOURCE}}}\t{limits}\t{bucket_col}\t{has_credits}",
            key.start(),
        );
        secrets.push(key.expose_secret().to_owned());
    }
    copy.send(chunk.as_bytes()).await.expect("copy chunk");
    copy.finish().await.expect("copy finish");
    if let Some(credits) = credits {
        sqlx::query("INSERT INTO credits (bucket_id, remaining) VALUES ($1, $2)")
            .bind(bucket.as_uuid())
            .bind(i64::try_from(credits).expect("credits"))
            .execute(&mut conn)
            .await
            .expect("credits");
    }
    sqlx::query("VACUUM (ANALYZE) keys")
        .execute(&mut conn)
        .await
        .expect("vacuum");
    secrets
}
