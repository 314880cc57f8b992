//! keyward's connections to PostgreSQL as deployments make them: over TLS
//! verified against a private CA (`sslmode=verify-full`), and through a real
//! PgBouncer in transaction pooling mode with LISTEN on a direct connection.
//! Every certificate is generated when the test runs.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use keyward::{
    key::ApiKey,
    pb,
    pb::Reason,
    startup::{self, Application},
    telemetry,
};
use sqlx::{Connection as _, PgConnection};
use tokio::{net::TcpStream, task::JoinSet};

use crate::helpers::{
    TestApp, eventually, never_minted,
    private::{PgBouncer, PgOptions, PrivatePostgres, SslFiles},
    reason, spawn_app_on, spawn_replica, test_config, with_key,
};

use crate::certs::{TestCa, write_pair};

/// A directory for one test's PEM files, removed on drop.
struct PemDir(PathBuf);

impl PemDir {
    fn new() -> Self {
        let random = uuid::Uuid::now_v7().simple().to_string();
        let path = std::env::temp_dir().join(format!("keyward-dbtls-{}", &random[16..]));
        std::fs::create_dir(&path).expect("create the PEM directory");
        Self(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PemDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A private PostgreSQL with TLS on, serving `cert` (PEM pair) from `dir`.
async fn tls_postgres(dir: &Path, name: &str, cert: &(String, String)) -> PrivatePostgres {
    let (cert_pem, key_pem) = write_pair(dir, name, cert);
    PrivatePostgres::start_with(PgOptions {
        ssl: Some(SslFiles { cert_pem, key_pem }),
        settings: Vec::new(),
    })
    .await
}

/// `url` (no query yet) requiring TLS verified against `root`, host name
/// included.
fn verify_full(url: &str, root: &Path) -> String {
    format!("{url}?sslmode=verify-full&sslrootcert={}", root.display())
}

/// A plaintext connection of the test's own to `pg`, to look at its
/// backends.
async fn inspect(pg: &PrivatePostgres) -> PgConnection {
    PgConnection::connect(&format!("{}?sslmode=disable", pg.url("postgres")))
        .await
        .expect("connect to the private postgres")
}

/// `Application::build` on `url` fails (bounded in time); the error chain.
async fn build_fails(url: &str) -> String {
    let config = test_config(url, &[]);
    let built = tokio::time::timeout(Duration::from_secs(30), Application::build(&config))
        .await
        .expect("start-up gives up within 30 s");
    match built {
        Ok(_) => panic!("keyward started on {url}"),
        Err(err) => telemetry::chain(&err),
    }
}

#[tokio::test]
async fn keyward_reaches_postgres_over_verified_tls_and_refuses_a_server_its_ca_did_not_sign() {
    let dir = PemDir::new();
    let ca = TestCa::new("keyward test database CA");
    let root = ca.write_to(dir.path(), "ca.pem");
    let pg = tls_postgres(
        dir.path(),
        "server",
        &ca.server_cert(&["localhost", "127.0.0.1"]),
    )
    .await;

    // Works: the admin plane (Mint) and the hot path (a cold Check, read
    // from the store), the listener included (its own connection).
    let app = spawn_app_on(verify_full(&pg.url("keyward"), &root), &[]).await;
    let minted = app.mint_for("acme").await;
    let checked = app.check_key(&minted.secret).await.expect("check");
    assert!(checked.allowed, "{checked:?}");
    assert_eq!(checked.key_id, minted.key.as_ref().expect("key").id);

    // The server sees TLS on every connection of this replica: the pools'
    // and the LISTEN connection's.
    let id = app.replica.instance_id().to_owned();
    let backends: Vec<(String, bool, Option<String>)> = sqlx::query_as(
        "SELECT a.application_name, s.ssl, s.version \
         FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.application_name IN ($1, $2)",
    )
    .bind(format!("keyward {id}"))
    .bind(format!("keyward-listener {id}"))
    .fetch_all(&mut inspect(&pg).await)
    .await
    .expect("pg_stat_ssl");
    println!("keyward's backends: {backends:?}");
    let ssl: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
         WHERE ssl AND application_name LIKE 'keyward%'",
    )
    .fetch_one(&mut inspect(&pg).await)
    .await
    .expect("count TLS backends");
    assert!(ssl > 0, "no keyward backend uses TLS: {backends:?}");
    assert!(
        backends
            .iter()
            .any(|(name, ..)| name == &format!("keyward-listener {id}")),
        "the listener's connection: {backends:?}"
    );
    assert!(
        backends
            .iter()
            .any(|(name, ..)| name == &format!("keyward {id}")),
        "a pooled connection: {backends:?}"
    );
    for (name, ssl, version) in &backends {
        assert!(ssl, "{name} is plaintext");
        assert!(
            version.as_deref().is_some_and(|v| v.starts_with("TLSv1.")),
            "{name}: {version:?}"
        );
    }

    // The same server, with another CA's certificate as the root: start-up
    // fails, and says why.
    let other = TestCa::new("some other CA");
    let other_root = other.write_to(dir.path(), "other-ca.pem");
    let chain = build_fails(&verify_full(&pg.url("keyward"), &other_root)).await;
    println!("with another CA as the root: {chain}");
    assert!(
        chain.starts_with("cannot prepare the database"),
        "names the step: {chain}"
    );
    // What sqlx reports: the rustls error inside an I/O error, which
    // repeats it as its source ("error communicating with database: invalid
    // peer certificate: UnknownIssuer: invalid peer certificate:
    // UnknownIssuer"). It does not say "TLS", but names the certificate and
    // why it was refused.
    assert!(
        chain.contains("invalid peer certificate") && chain.contains("UnknownIssuer"),
        "names the cause: {chain}"
    );
}

#[tokio::test]
async fn verify_full_refuses_a_certificate_for_another_host_name() {
    let dir = PemDir::new();
    let ca = TestCa::new("keyward test database CA");
    let root = ca.write_to(dir.path(), "ca.pem");
    // Signed by the trusted CA, but for another name than the one dialled.
    let pg = tls_postgres(
        dir.path(),
        "elsewhere",
        &ca.server_cert(&["db.elsewhere.invalid"]),
    )
    .await;
    for host in ["127.0.0.1", "localhost"] {
        let url = pg.url("keyward").replace("127.0.0.1", host);
        let chain = build_fails(&verify_full(&url, &root)).await;
        println!("{host}: {chain}");
        assert!(
            chain.starts_with("cannot prepare the database"),
            "names the step: {chain}"
        );
        // "invalid peer certificate: certificate not valid for name
        // \"127.0.0.1\"; certificate is only valid for
        // DnsName(\"db.elsewhere.invalid\")" (twice: see above).
        assert!(
            chain.contains(&format!(
                r#"invalid peer certificate: certificate not valid for name "{host}""#
            )) && chain.contains("db.elsewhere.invalid"),
            "names the cause: {chain}"
        );
    }
    // The same certificate is fine when the name is not checked
    // (`verify-ca`): what failed above is the name alone.
    let url = format!(
        "{}?sslmode=verify-ca&sslrootcert={}",
        pg.url("postgres"),
        root.display()
    );
    let mut conn = tokio::time::timeout(Duration::from_secs(10), PgConnection::connect(&url))
        .await
        .expect("connect in time")
        .expect("verify-ca connects");
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .expect("pg_stat_ssl");
    assert!(ssl);
}

// --- PgBouncer in transaction mode ---------------------------------------
//
// keyward's pooled connections go through PgBouncer 1.18 (`pool_mode =
// transaction`), LISTEN and migrations straight to PostgreSQL
// (`--listen-database-url`). PgBouncer ignores startup parameters, so the
// statement timeout keyward would send at connection start cannot reach the
// server: `--db-statement-timeout 0s` (set it on the role instead).
//
// Without `--listen-database-url` keyward would take the PgBouncer URL for a
// direct one: named prepared statements (which outlive the transaction
// PgBouncer lent the server connection for), sqlx's migration lock (a
// session advisory lock) and LISTEN, which would stay on a server
// connection that goes back to PgBouncer's pool after its transaction, so
// that notices never reach the listener and other replicas' revocations
// never evict this replica's cache. In fact it does not get that far: it
// fails at start-up (the last test below).

/// The settings behind a transaction-pooling PgBouncer. The check pool's
/// acquire timeout is raised from its fail-fast 100 ms: every hand-out is a
/// `BEGIN` round trip through PgBouncer, which queues it while its own 10
/// server connections are busy, and the bursts below want answers, not
/// fail-fast UNAVAILABLEs.
fn bouncer_flags(direct: &str) -> Vec<String> {
    [
        "--listen-database-url",
        direct,
        "--db-statement-timeout",
        "0s",
        "--db-check-acquire-timeout",
        "2s",
        "--db-lookup-timeout",
        "5s",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// A private PostgreSQL, a private transaction-pooling PgBouncer in front
/// of it, and keyward through that PgBouncer with [`bouncer_flags`] and
/// `extra`; the flags, for replicas.
async fn behind_bouncer(extra: &[&str]) -> (PrivatePostgres, PgBouncer, Vec<String>, TestApp) {
    let pg = PrivatePostgres::start().await;
    let bouncer = PgBouncer::start(pg.port()).await;
    let mut flags = bouncer_flags(&pg.url("keyward"));
    flags.extend(extra.iter().map(|f| (*f).to_owned()));
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let a = spawn_app_on(bouncer.url("keyward"), &args).await;
    (pg, bouncer, flags, a)
}

/// A connection straight to `pg`'s keyward database, past PgBouncer, after
/// running `setup` on it (the tests' slow triggers).
async fn keyward_db_with(pg: &PrivatePostgres, setup: &'static str) -> PgConnection {
    let mut db = PgConnection::connect(&pg.url("keyward"))
        .await
        .expect("connect");
    sqlx::raw_sql(setup)
        .execute(&mut db)
        .await
        .expect("run the test's set-up on the database");
    db
}

/// A replica of `a` with `flags` (from [`behind_bouncer`]).
async fn replica_behind_bouncer(a: &TestApp, flags: &[String]) -> TestApp {
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    spawn_replica(a, &args).await
}

/// How many of the server connections to keyward's database on `pg` meet
/// `condition` (on `pg_stat_activity`).
async fn keyward_backends(pg: &PrivatePostgres, condition: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = 'keyward' AND {condition}"
    )))
    .fetch_one(&mut inspect(pg).await)
    .await
    .expect("pg_stat_activity")
}

/// keyward's log holds none of PostgreSQL's warnings of a `BEGIN` inside a
/// transaction or a `COMMIT` outside one.
fn assert_postgres_never_warned(logs: &crate::helpers::CapturedLogs) {
    for warning in [
        "there is already a transaction in progress",
        "there is no transaction in progress",
    ] {
        assert_eq!(logs.find(warning), None, "PostgreSQL warned");
    }
}

/// One minted key, with what a check must answer for it.
#[derive(Clone, Debug)]
struct Minted {
    secret: String,
    id: String,
    owner: String,
    tag: String,
}

/// Mints `n` keys through `app`, `lanes` calls at a time, each with its own
/// owner and a `tag` in its metadata, so that an answer built from another
/// key's row is told apart.
async fn mint_distinct(app: &TestApp, label: &str, n: usize, lanes: usize) -> Vec<Minted> {
    let mut tasks = tokio::task::JoinSet::new();
    for lane in 0..lanes {
        let mut keys = app.keys.clone();
        let admin = app.admin_key.clone();
        let label = label.to_owned();
        tasks.spawn(async move {
            let mut out = Vec::new();
            for i in (lane..n).step_by(lanes) {
                let owner = format!("{label}-owner-{i}");
                let tag = format!("{label}-{i}");
                let minted = keys
                    .mint(with_key(
                        pb::MintRequest {
                            owner_id: owner.clone(),
                            name: tag.clone(),
                            metadata: HashMap::from([("tag".to_owned(), tag.clone())]),
                            ..Default::default()
                        },
                        &admin,
                    ))
                    .await
                    .unwrap_or_else(|e| panic!("mint {tag} through PgBouncer: {e:?}"))
                    .into_inner();
                out.push(Minted {
                    secret: minted.secret,
                    id: minted.key.expect("minted key").id,
                    owner,
                    tag,
                });
            }
            out
        });
    }
    let mut all = Vec::new();
    while let Some(lane) = tasks.join_next().await {
        all.extend(lane.expect("mint task"));
    }
    all
}

/// What `resp` says about `key` is what was minted for it (its own row,
/// not another's).
fn assert_answers_for(key: &Minted, resp: &pb::CheckResponse, on: &str) {
    assert!(resp.allowed, "{on}: {} refused: {resp:?}", key.tag);
    assert_eq!(
        resp.key_id, key.id,
        "{on}: {} answered with another key",
        key.tag
    );
    assert_eq!(resp.owner_id, key.owner, "{on}: {}", key.tag);
    assert_eq!(
        resp.metadata.get("tag"),
        Some(&key.tag),
        "{on}: {}",
        key.tag
    );
}

/// Forgets `keys` on `app`: their next check reads the store.
fn make_cold(app: &TestApp, keys: &[Minted]) {
    for key in keys {
        let hash = ApiKey::parse(&key.secret)
            .expect("minted key parses")
            .hash();
        app.replica.checker().invalidate(&hash);
    }
}

/// Checks every key on both replicas at once (one call per key per
/// replica, all in flight together); panics on any wrong answer.
async fn check_all_at_once(a: &TestApp, b: &TestApp, keys: &[Minted], revoked: &[Minted]) {
    let mut calls = tokio::task::JoinSet::new();
    for (on, app) in [("A", a), ("B", b)] {
        for (key, want_allowed) in keys
            .iter()
            .map(|k| (k, true))
            .chain(revoked.iter().map(|k| (k, false)))
        {
            let mut checks = app.checks.clone();
            let key = key.clone();
            calls.spawn(async move {
                let resp = checks
                    .check(pb::CheckRequest {
                        key: key.secret.clone(),
                        ..Default::default()
                    })
                    .await
                    .map(|r| r.into_inner());
                (on, key, want_allowed, resp)
            });
        }
    }
    let mut answered = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while let Some(done) = tokio::time::timeout_at(deadline, calls.join_next())
        .await
        .expect("the burst is answered within 60 s")
    {
        let (on, key, want_allowed, resp) = done.expect("check task");
        let resp = resp.unwrap_or_else(|e| panic!("{on}: check of {} failed: {e:?}", key.tag));
        if want_allowed {
            assert_answers_for(&key, &resp, on);
        } else {
            assert_eq!(
                reason(&resp),
                Reason::Revoked,
                "{on}: {}: {resp:?}",
                key.tag
            );
            assert_eq!(resp.key_id, key.id, "{on}: {}", key.tag);
        }
        answered += 1;
    }
    assert_eq!(answered, 2 * (keys.len() + revoked.len()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_behind_a_transaction_pooling_pgbouncer_mint_check_list_and_revoke() {
    let (pg, bouncer, flags, a) = behind_bouncer(&[]).await;
    let b = replica_behind_bouncer(&a, &flags).await;
    let direct = pg.url("keyward");
    assert!(a.database_url.contains(&format!(":{}/", bouncer.port())));

    // Mint: several keys through A, concurrently.
    let first = mint_distinct(&a, "first", 6, 3).await;

    // Check misses: each key is new to B, which reads it through PgBouncer.
    let lookups = b.replica.store().stats().key_lookups();
    for key in &first {
        let resp = b.check_key(&key.secret).await.expect("check on B");
        assert_answers_for(key, &resp, "B");
    }
    let read = b.replica.store().stats().key_lookups() - lookups;
    assert!(
        read >= first.len() as u64,
        "B read each key: {read} lookups"
    );
    for key in &first {
        let resp = a.check_key(&key.secret).await.expect("check on A");
        assert_answers_for(key, &resp, "A");
    }
    // A never-minted key is refused, not confused with a stored one.
    let unknown = b
        .check_key(never_minted().expose_secret())
        .await
        .expect("check");
    assert_eq!(reason(&unknown), Reason::UnknownKey, "{unknown:?}");

    // List, on either replica: the keys, with their own owners.
    for (on, app) in [("A", &a), ("B", &b)] {
        for key in &first {
            let page = app
                .keys
                .clone()
                .list(app.admin(pb::ListRequest {
                    owner_id: key.owner.clone(),
                    page_size: Some(10),
                    page_token: String::new(),
                    include_revoked: true,
                }))
                .await
                .unwrap_or_else(|e| panic!("{on}: list {}: {e:?}", key.owner))
                .into_inner();
            let ids: Vec<&str> = page.keys.iter().map(|k| k.id.as_str()).collect();
            assert_eq!(ids, [key.id.as_str()], "{on}: {}", key.owner);
            assert_eq!(page.keys[0].name, key.tag);
        }
    }

    // Revoke through A: B, which has the key cached, denies it soon (the
    // notice reaches B's listener on its direct connection).
    let gone = &first[0];
    a.revoke(&gone.id).await;
    let (_, took) = eventually(Duration::from_secs(5), || async {
        let resp = b.check_key(&gone.secret).await.ok()?;
        (reason(&resp) == Reason::Revoked).then_some(())
    })
    .await
    .expect("B denies the revoked key within 5 s");
    println!("the revocation through A reached B after {took:?}");
    assert!(b.replica.revocation_lag().notices() >= 1);
    let listed = a.get(&gone.id).await;
    assert!(listed.revoked_at.is_some(), "{listed:?}");

    // Concurrent cold checks of many distinct keys on both replicas: 50
    // keys minted on both replicas at once, forgotten on both, then all
    // checked on both at once, with the revoked key among them, a few
    // rounds. Every answer is the key's own row.
    let mut many = mint_distinct(&a, "a", 25, 4).await;
    many.extend(mint_distinct(&b, "b", 25, 4).await);
    assert_eq!(many.len(), 50);
    let revoked = [gone.clone()];
    for round in 0..3 {
        let before = (
            a.replica.store().stats().key_lookups(),
            b.replica.store().stats().key_lookups(),
        );
        make_cold(&a, &many);
        make_cold(&b, &many);
        make_cold(&a, &revoked);
        make_cold(&b, &revoked);
        check_all_at_once(&a, &b, &many, &revoked).await;
        let after = (
            a.replica.store().stats().key_lookups(),
            b.replica.store().stats().key_lookups(),
        );
        println!(
            "round {round}: {} lookups on A, {} on B",
            after.0 - before.0,
            after.1 - before.1
        );
        assert!(
            after.0 - before.0 >= 50 && after.1 - before.1 >= 50,
            "the checks were misses: {before:?} -> {after:?}"
        );
    }

    // The pooled connections are in no transaction when idle: nothing holds
    // a server connection (PgBouncer lends them per transaction) or a lock.
    let settled = eventually(Duration::from_secs(5), || async {
        let open = keyward_backends(&pg, "state LIKE 'idle in transaction%'").await;
        (open == 0).then_some(())
    })
    .await;
    assert!(settled.is_some(), "idle connections keep transactions open");

    // Both replicas stop cleanly, and their last usage write (a batched
    // statement through PgBouncer) lands: every checked key has been used.
    let (mut a, mut b) = (a, b);
    a.stop().await;
    b.stop().await;
    let ids: Vec<uuid::Uuid> = many
        .iter()
        .chain(&first)
        .map(|k| k.id.parse().expect("key id is a uuid"))
        .collect();
    let used: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM keys WHERE id = ANY($1) AND last_used_at IS NOT NULL",
    )
    .bind(&ids)
    .fetch_one(&mut PgConnection::connect(&direct).await.expect("connect"))
    .await
    .expect("count used keys");
    assert_eq!(used, ids.len() as i64, "usage written through PgBouncer");
}

/// Behind a transaction-pooling PgBouncer every use of a pooled connection
/// is one transaction, which sqlx's release of the connection commits: in a
/// task of its own, after the caller has answered. A write must not be
/// answered before it is committed: another replica would not find the key
/// it was told exists (under load this refused freshly minted keys with
/// UNKNOWN_KEY), and a commit that failed would lose a key already handed
/// out. Here every commit that wrote an owner, a key or credits takes 300 ms
/// longer (a deferred trigger runs at commit), so an answer sent before its
/// commit is caught every time, not only on a loaded machine. Nor is
/// PostgreSQL sent a `BEGIN` inside the pooled connection's transaction or a
/// `COMMIT` after it ended: each is a WARNING in keyward's log.
#[tokio::test]
async fn behind_a_transaction_pooling_pgbouncer_a_write_is_committed_before_it_is_answered() {
    let logs = crate::helpers::CapturedLogs::start();
    let (pg, _bouncer, flags, a) = behind_bouncer(&[]).await;
    let b = replica_behind_bouncer(&a, &flags).await;
    let mut db = keyward_db_with(
        &pg,
        "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN PERFORM pg_sleep(0.3); RETURN NULL; END $$; \
         CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT OR UPDATE ON owners \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit(); \
         CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT OR UPDATE ON keys \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit(); \
         CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT OR UPDATE ON credits \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();",
    )
    .await;

    // Mint through A for a new owner (the owner's row, then the key's):
    // both are in the database when Mint answers.
    let minted = a
        .mint(pb::MintRequest {
            owner_id: "slow-commit".into(),
            credits: Some(pb::Credits {
                remaining: 100,
                refill: None,
            }),
            ..Default::default()
        })
        .await;
    let id: uuid::Uuid = minted.key.expect("minted key").id.parse().expect("uuid");
    let (owners, keys): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM owners WHERE id = 'slow-commit'), \
                (SELECT count(*) FROM keys WHERE id = $1)",
    )
    .bind(id)
    .fetch_one(&mut db)
    .await
    .expect("read the rows");
    assert_eq!((owners, keys), (1, 1), "Mint answered before its commit");

    // B, which has never seen the key, finds it at once, and the block of
    // credits it reserved for the check is spent in the database when the
    // check is answered.
    let resp = b.check_key(&minted.secret).await.expect("check on B");
    assert!(resp.allowed, "B refused a key A had minted: {resp:?}");
    let remaining: i64 =
        sqlx::query_scalar("SELECT remaining FROM credits c JOIN keys k ON COALESCE(k.bucket_id, k.id) = c.bucket_id WHERE k.id = $1")
            .bind(id)
            .fetch_one(&mut db)
            .await
            .expect("read the credits");
    assert!(
        remaining < 100,
        "B answered before its reservation was committed: {remaining} remaining"
    );

    // A change of several statements in a transaction of its own: Revoke
    // (lock, update, audit), then B refuses the key.
    let revoked = a.revoke(&id.to_string()).await;
    assert!(revoked.revoked_at.is_some(), "{revoked:?}");
    let revoked_at: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT revoked_at FROM keys WHERE id = $1")
            .bind(id)
            .fetch_one(&mut db)
            .await
            .expect("read the key");
    assert!(revoked_at.is_some(), "Revoke answered before its commit");
    let refused = crate::helpers::eventually(Duration::from_secs(5), || async {
        let resp = b.check_key(&minted.secret).await.ok()?;
        (reason(&resp) == Reason::Revoked).then_some(())
    })
    .await;
    assert!(refused.is_some(), "B still allows the revoked key");
    assert_postgres_never_warned(&logs);
}

/// Behind a transaction-pooling PgBouncer, a change cut short (here by the
/// database call's deadline, while its audit event is being written) is
/// rolled back, not committed when its connection goes back to the pool:
/// nothing of it is written, the key stays enabled, and PostgreSQL has
/// nothing to warn of.
#[tokio::test]
async fn behind_a_transaction_pooling_pgbouncer_a_change_cut_short_writes_nothing() {
    let logs = crate::helpers::CapturedLogs::start();
    let (pg, _bouncer, _, a) = behind_bouncer(&["--db-call-timeout", "1s"]).await;
    let minted = a.mint_for("cut-short").await;
    let id = minted.key.expect("minted key").id;
    let mut db = keyward_db_with(
        &pg,
        "CREATE FUNCTION slow_audit() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN PERFORM pg_sleep(2); RETURN NEW; END $$; \
         CREATE TRIGGER slow_audit BEFORE INSERT ON audit_events FOR EACH ROW \
             WHEN (NEW.action = 'key.disable') EXECUTE FUNCTION slow_audit();",
    )
    .await;

    let mut keys = a.keys.clone();
    let request = a.admin(pb::DisableRequest { id: id.clone() });
    let disable = tokio::spawn(async move { keys.disable(request).await });
    // It is cut short while writing its audit event, after the key's update.
    let reached = eventually(Duration::from_secs(5), || async {
        let writing = keyward_backends(
            &pg,
            "state = 'active' AND query LIKE '%INSERT INTO audit_events%'",
        )
        .await;
        (writing == 1).then_some(())
    })
    .await;
    assert!(reached.is_some(), "Disable never reached its audit event");
    let cut = disable
        .await
        .expect("disable task")
        .expect_err("Disable outlasts its deadline");
    println!("Disable cut short: {cut:?}");
    // Once the statement in flight has ended, the connection is idle.
    let settled = eventually(Duration::from_secs(10), || async {
        let busy = keyward_backends(&pg, "state <> 'idle'").await;
        (busy == 0).then_some(())
    })
    .await;
    assert!(settled.is_some(), "a connection stays busy");
    let (disabled, events): (bool, i64) = sqlx::query_as(
        "SELECT (SELECT disabled_at IS NOT NULL FROM keys WHERE id = $1::uuid), \
                (SELECT count(*) FROM audit_events WHERE action = 'key.disable')",
    )
    .bind(&id)
    .fetch_one(&mut db)
    .await
    .expect("read the key");
    assert_eq!(
        (disabled, events),
        (false, 0),
        "half of Disable was committed"
    );
    let resp = a.check_key(&minted.secret).await.expect("check");
    assert!(resp.allowed, "{resp:?}");
    assert_postgres_never_warned(&logs);
}

/// Without `--listen-database-url` keyward takes the PgBouncer URL for a
/// direct one, and fails. Its statements are then named (sqlx's
/// `sqlx_s_1`, ...) and prepared on whatever server connection PgBouncer
/// pairs each client connection with, and a later client connection finds
/// an earlier one's statement there: "prepared statement \"sqlx_s_1\"
/// already exists" (PgBouncer 1.18, sqlx 0.9). Measured on a fresh
/// database:
///
/// - `keyward serve` (`Application::build`): the migrations happen to
///   succeed through PgBouncer, then the listener's start (LISTEN, then
///   `SELECT clock_timestamp()` and the membership filter's load on the
///   pool) fails that way on every retry until start-up gives up after 15 s:
///   "cannot listen for cache invalidations";
/// - `keyward bootstrap`, which is quick and tested here: the first
///   statement on the pool after the migrations (the owner upsert, `WITH
///   created AS (INSERT INTO owners ...)`) fails at once.
///
/// Failing is the safe outcome (a replica serving with its LISTEN behind
/// PgBouncer would not hear revocations); neither message names the fix.
#[tokio::test]
async fn without_a_direct_listen_url_keyward_fails_behind_a_transaction_pooling_pgbouncer() {
    let pg = PrivatePostgres::start().await;
    let bouncer = PgBouncer::start(pg.port()).await;
    let config = test_config(&bouncer.url("keyward"), &["--db-statement-timeout", "0s"]);
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        startup::bootstrap(&config, "ops", "admin"),
    )
    .await
    .expect("bootstrap gives up within 30 s");
    let chain = match result {
        Ok(_) => panic!("bootstrap worked with named statements behind PgBouncer"),
        Err(err) => telemetry::chain(&err),
    };
    println!("without --listen-database-url: {chain}");
    assert!(chain.starts_with("cannot prepare the database"), "{chain}");
    assert!(
        chain.contains(r#"prepared statement "sqlx_s_1" already exists"#),
        "{chain}"
    );
    // The direct URL is fine: the same bootstrap with it works.
    let direct = pg.url("keyward");
    let config = test_config(
        &bouncer.url("keyward"),
        &[
            "--db-statement-timeout",
            "0s",
            "--listen-database-url",
            &direct,
        ],
    );
    startup::bootstrap(&config, "ops", "admin")
        .await
        .expect("bootstrap with --listen-database-url");
}

/// A TCP link to a loopback port, on a loopback port of its own, where every
/// new connection waits `delay` before its first byte goes through: a
/// database slower to reach than a check lookup waits for a connection (a
/// distant server, TLS over a long round trip, a loaded machine). `cut`
/// closes every connection open through it, as a network blip does.
struct SlowLink {
    port: u16,
    open: Arc<Mutex<JoinSet<()>>>,
    accepting: tokio::task::JoinHandle<()>,
}

impl SlowLink {
    async fn start(upstream: u16, delay: Duration) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the link");
        let port = listener.local_addr().expect("the link's address").port();
        let open = Arc::new(Mutex::new(JoinSet::new()));
        let links = open.clone();
        let accepting = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                links.lock().expect("links").spawn(async move {
                    tokio::time::sleep(delay).await;
                    if let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Self {
            port,
            open,
            accepting,
        }
    }

    fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Closes every connection open through the link; new ones still go
    /// through, as slowly.
    fn cut(&self) {
        self.open.lock().expect("links").abort_all();
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        self.accepting.abort();
        self.cut();
    }
}

#[tokio::test]
async fn check_connections_slower_to_open_than_a_lookup_waits_still_open_and_serve() {
    let pg = PrivatePostgres::start().await;
    // Every connection takes 400 ms to open: four times what a check lookup
    // waits for one (100 ms), a fifth of what an admin call waits (2 s).
    let link = SlowLink::start(pg.port(), Duration::from_millis(400)).await;
    let app = spawn_app_on(link.url("keyward"), &[]).await;

    // Start-up opened every check connection, though none opens within a
    // lookup's wait...
    let [checks, _] = app.replica.store().pool_stats();
    assert_eq!((checks.name, checks.size), ("check", 6), "{checks:?}");
    // ... so the first calls' misses are decided: each Mint's management key
    // is looked up (a miss on a check connection), then the key.
    let minted = app.mint_for("acme").await;
    let checked = app.check_key(&minted.secret).await.expect("check");
    assert!(checked.allowed, "{checked:?}");
    // A key this replica has not seen (minted through another), whose first
    // check here is a miss.
    let unchecked = spawn_replica(&app, &[]).await.mint_for("acme").await;

    // Every connection through the link closes. A miss now needs a check
    // connection opened anew, which takes longer than it waits: the first
    // ones fail closed (UNAVAILABLE), but the connections they started keep
    // opening, and a miss a moment later is decided on one of them.
    link.cut();
    // As the listener's lost connection does, a moment later: each idle
    // connection is pinged before its next use.
    app.replica.store().suspect_connections();
    let lookups = app.replica.store().stats().key_lookups();
    let unavailable = std::cell::Cell::new(0);
    let (answer, took) = eventually(Duration::from_secs(10), || async {
        match app.check_key(&unchecked.secret).await {
            Ok(answer) => Some(answer),
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                unavailable.set(unavailable.get() + 1);
                None
            }
        }
    })
    .await
    .expect("a miss is decided again within 10 s of the cut");
    println!(
        "decided {took:?} after the cut, after {} UNAVAILABLE",
        unavailable.get()
    );
    assert!(answer.allowed, "{answer:?}");
    assert_eq!(answer.key_id, unchecked.key.as_ref().expect("key").id);
    assert!(
        app.replica.store().stats().key_lookups() > lookups,
        "the check was a miss, read from the store"
    );
}
