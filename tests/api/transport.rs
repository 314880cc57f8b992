//! The transport: TLS and mTLS on the gRPC addresses (driven with the real
//! grpcurl, as an operator would), certificates rotated under a running
//! server, the admin plane on an address of its own, and start-up refusing
//! bad TLS files. Every key and certificate is generated when the test runs,
//! into a scratch directory removed at the end.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::Duration,
};

use crate::certs::{TestCa, write_pair, write_pem};
use keyward::{
    pb::{self, check_service_client::CheckServiceClient, key_service_client::KeyServiceClient},
    startup::Application,
    telemetry,
};
use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    process::Command,
};
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::helpers::{self, CapturedLogs, eventually, spawn_app_with, with_key};

/// The longest any one wait in these tests may take.
const WAIT: Duration = Duration::from_secs(10);

/// What the server certificates are issued for: clients dial 127.0.0.1 and
/// grpcurl checks the IP address, tonic the name `localhost`.
const SERVER_NAMES: &[&str] = &["localhost", "127.0.0.1"];

const HEALTH: &str = "grpc.health.v1.Health";
const KEYS: &str = "keyward.v1.KeyService";
const OWNERS: &str = "keyward.v1.OwnerService";
const AUDIT: &str = "keyward.v1.AuditService";
const LEAKS: &str = "keyward.v1.LeakService";
const CHECKS: &str = "keyward.v1.CheckService";
const ENVOY: &str = "envoy.service.auth.v3.Authorization";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A directory of its own under the system's temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "keyward-transport-{}",
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::create_dir_all(&dir).expect("create the scratch directory");
        Self(dir)
    }

    fn dir(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn arg(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temp path")
}

/// A server certificate from `ca` written to `dir/{name}.crt` and `.key`.
fn server_files(dir: &Path, ca: &TestCa, name: &str) -> (PathBuf, PathBuf) {
    write_pair(dir, name, &ca.server_cert(SERVER_NAMES))
}

/// Replaces `path` the way a Secret update does: the new contents are
/// written beside it, then renamed over it.
fn replace(path: &Path, contents: &str) {
    let staged = path.with_extension("staged");
    std::fs::write(&staged, contents).expect("write the new file");
    std::fs::rename(&staged, path).expect("rename it over the old one");
}

// --- grpcurl -------------------------------------------------------------

fn grpcurl_binary() -> PathBuf {
    let local = repo().join(".tools/bin/grpcurl");
    if local.exists() {
        return local;
    }
    PathBuf::from("grpcurl")
}

/// How grpcurl reaches a server: the flags before the address.
#[derive(Clone)]
struct Via(Vec<String>);

impl Via {
    fn plaintext() -> Self {
        Self(vec!["-plaintext".into()])
    }

    /// TLS, trusting the CA certificate in `ca`.
    fn tls(ca: &Path) -> Self {
        Self(vec!["-cacert".into(), arg(ca).into()])
    }

    /// TLS with a client certificate.
    fn mtls(ca: &Path, (cert, key): &(PathBuf, PathBuf)) -> Self {
        let mut via = Self::tls(ca);
        via.0.extend([
            "-cert".into(),
            arg(cert).into(),
            "-key".into(),
            arg(key).into(),
        ]);
        via
    }

    /// Also `flags` (e.g. proto files when the server has no reflection).
    fn with(mut self, flags: &[&str]) -> Self {
        self.0.extend(flags.iter().map(|f| f.to_string()));
        self
    }
}

/// What one grpcurl run printed.
#[derive(Debug)]
struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Ran {
    #[track_caller]
    fn expect_ok(&self) -> &Self {
        assert!(
            self.ok,
            "grpcurl failed:\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// Asserts grpcurl failed with `needle` in what it printed; returns the
    /// message.
    #[track_caller]
    fn expect_failure(&self, needle: &str) -> &str {
        assert!(
            !self.ok,
            "grpcurl should have failed, it printed:\n{}",
            self.stdout
        );
        assert!(
            self.stderr.contains(needle),
            "grpcurl failed without {needle:?}:\n{}",
            self.stderr
        );
        &self.stderr
    }

    #[track_caller]
    fn json(&self) -> Value {
        self.expect_ok();
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }

    /// The lines of `grpcurl list`.
    #[track_caller]
    fn services(&self) -> BTreeSet<String> {
        self.expect_ok();
        self.stdout
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

async fn grpcurl(via: &Via, addr: SocketAddr, call: &[&str]) -> Ran {
    grpcurl_with(via, &[], addr, call).await
}

/// `grpcurl {via} {options} {addr} {call}`, bounded.
async fn grpcurl_with(via: &Via, options: &[&str], addr: SocketAddr, call: &[&str]) -> Ran {
    let mut cmd = Command::new(grpcurl_binary());
    cmd.current_dir(repo())
        .args(["-connect-timeout", "5", "-max-time", "10"])
        .args(&via.0)
        .args(options)
        .arg(addr.to_string())
        .args(call)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("grpcurl finishes within 30s")
        .expect("run grpcurl (./scripts/test installs it into .tools)");
    Ran {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn list(via: &Via, addr: SocketAddr) -> Ran {
    grpcurl(via, addr, &["list"]).await
}

/// `grpcurl list` expected to fail to connect: a plaintext client to a TLS
/// address may only give up at its connect timeout, so a short one.
async fn refused_list(via: &Via, addr: SocketAddr) -> String {
    grpcurl_with(via, &["-connect-timeout", "2"], addr, &["list"])
        .await
        .expect_failure("Failed to dial target host")
        .to_owned()
}

async fn health(via: &Via, addr: SocketAddr) -> Ran {
    grpcurl_with(via, &["-d", "{}"], addr, &["grpc.health.v1.Health/Check"]).await
}

async fn mint(via: &Via, addr: SocketAddr, admin_key: &str, owner: &str) -> Ran {
    let auth = format!("authorization: Bearer {admin_key}");
    let body = serde_json::json!({ "ownerId": owner }).to_string();
    grpcurl_with(
        via,
        &["-H", &auth, "-d", &body],
        addr,
        &["keyward.v1.KeyService/Mint"],
    )
    .await
}

async fn check(via: &Via, addr: SocketAddr, secret: &str) -> Ran {
    let body = serde_json::json!({ "key": secret }).to_string();
    grpcurl_with(
        via,
        &["-d", &body],
        addr,
        &["keyward.v1.CheckService/Check"],
    )
    .await
}

/// Envoy's ext_authz call for a request carrying `authorization: Bearer
/// {secret}`.
async fn envoy_check(via: &Via, addr: SocketAddr, secret: &str) -> Ran {
    let body = serde_json::json!({
        "attributes": {"request": {"http": {"headers": {
            "authorization": format!("Bearer {secret}"),
        }}}}
    })
    .to_string();
    grpcurl_with(
        via,
        &["-d", &body],
        addr,
        &["envoy.service.auth.v3.Authorization/Check"],
    )
    .await
}

/// Envoy's answer lets the request through.
#[track_caller]
fn assert_envoy_ok(ran: &Ran) {
    let answer = ran.json();
    assert!(answer.get("okResponse").is_some(), "{answer}");
    assert_eq!(answer.get("deniedResponse"), None, "{answer}");
}

#[track_caller]
fn assert_serving(ran: &Ran) {
    assert_eq!(ran.json()["status"], "SERVING", "{ran:?}");
}

/// A minted secret, from grpcurl's answer to Mint.
#[track_caller]
fn secret(ran: &Ran) -> String {
    let minted = ran.json();
    let secret = minted["secret"].as_str().expect("secret").to_owned();
    assert!(secret.starts_with("kw_live_"), "{secret}");
    secret
}

#[track_caller]
fn assert_allowed(ran: &Ran) {
    let answer = ran.json();
    assert_eq!(answer["allowed"], true, "{answer}");
    assert_eq!(answer["reason"], "OK", "{answer}");
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

// --- tonic clients ---------------------------------------------------------

/// A tonic connection over TLS to `addr`, trusting `cas`, with a client
/// certificate if given. Connected before it returns.
async fn tls_channel(
    addr: SocketAddr,
    cas: &[&TestCa],
    identity: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new().domain_name("localhost");
    for ca in cas {
        tls = tls.ca_certificate(Certificate::from_pem(ca.cert_pem()));
    }
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(tls)?
        .connect_timeout(WAIT)
        .timeout(WAIT)
        .connect()
        .await
}

/// A plaintext tonic connection, connected lazily (the first call dials).
fn plaintext_channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_timeout(WAIT)
        .timeout(WAIT)
        .connect_lazy()
}

async fn tonic_health(channel: Channel) -> Result<i32, tonic::Status> {
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(|r| r.into_inner().status)
}

const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;

/// A plaintext gRPC client to a TLS address gets no answer.
#[track_caller]
fn assert_transport_failure(result: Result<i32, tonic::Status>) {
    let err = result.expect_err("a plaintext call to a TLS address");
    assert!(
        matches!(err.code(), Code::Unavailable | Code::Unknown),
        "{err:?}"
    );
    assert!(err.message().contains("transport error"), "{err:?}");
}

// --- A raw TLS client ------------------------------------------------------

/// Connects with rustls (ALPN h2), trusting `ca`, with a client certificate
/// if given; sends the HTTP/2 preface and reads the server's first frame.
/// Returns the certificate the server presented, or the TLS error (the
/// server's alert, say) as text.
async fn tls_probe(
    addr: SocketAddr,
    ca: &TestCa,
    identity: Option<&(String, String)>,
) -> Result<CertificateDer<'static>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).expect("CA PEM"))
        .expect("add the CA");
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).expect("client cert PEM")],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("client key PEM"),
            )
            .expect("client certificate"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let exchange = async {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from("localhost").expect("server name");
        let mut tls = connector.connect(name, tcp).await?;
        let presented = tls
            .get_ref()
            .1
            .peer_certificates()
            .expect("peer certificate")[0]
            .clone();
        // Under TLS 1.3 the client's handshake is done before the server has
        // judged its certificate: a refusal arrives on the first read.
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        let mut header = [0u8; 9];
        tls.read_exact(&mut header).await?;
        assert_eq!(header[3], 0x4, "the server's first frame is SETTINGS");
        Ok::<_, std::io::Error>(presented)
    };
    match tokio::time::timeout(WAIT, exchange).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => panic!("the TLS exchange with {addr} took over {WAIT:?}"),
    }
}

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).expect("certificate PEM")
}

// --- 1. TLS ----------------------------------------------------------------

#[tokio::test]
async fn grpcurl_with_the_ca_reaches_a_tls_keyward_and_plaintext_is_refused() {
    let scratch = Scratch::new();
    let (ca, stranger) = (TestCa::new("keyward CA"), TestCa::new("stranger CA"));
    let ca_path = ca.write_to(scratch.dir(), "ca.crt");
    let stranger_path = stranger.write_to(scratch.dir(), "stranger.crt");
    let served = ca.server_cert(SERVER_NAMES);
    let (cert, key) = write_pair(scratch.dir(), "tls", &served);
    let app = spawn_app_with(&["--tls-cert", arg(&cert), "--tls-key", arg(&key)]).await;
    let trusting = Via::tls(&ca_path);
    // The server presents the configured certificate and speaks HTTP/2.
    let presented = tls_probe(app.addr, &ca, None).await.expect("TLS");
    assert_eq!(presented, der(&served.0));

    let services = list(&trusting, app.addr).await.services();
    for service in [KEYS, CHECKS, ENVOY, HEALTH] {
        assert!(services.contains(service), "{service} in {services:?}");
    }
    assert_serving(&health(&trusting, app.addr).await);
    let minted = mint(&trusting, app.addr, &app.admin_key, "acme").await;
    assert_allowed(&check(&trusting, app.addr, &secret(&minted)).await);

    // A plaintext client: grpcurl and tonic both fail.
    refused_list(&Via::plaintext(), app.addr).await;
    assert_transport_failure(tonic_health(plaintext_channel(app.addr)).await);
    // A client that does not trust the server's CA refuses the certificate.
    let shown = refused_list(&Via::tls(&stranger_path), app.addr).await;
    assert!(
        shown.contains("certificate signed by unknown authority"),
        "{shown}"
    );

    // The refusals did not hurt the listener.
    assert_serving(&health(&trusting, app.addr).await);
}

// --- 2. mTLS ---------------------------------------------------------------

#[tokio::test]
async fn mtls_serves_clients_certified_by_the_client_ca_and_refuses_others_at_the_handshake() {
    let scratch = Scratch::new();
    let dir = scratch.dir();
    let (ca, clients, other) = (
        TestCa::new("keyward CA"),
        TestCa::new("client CA"),
        TestCa::new("other CA"),
    );
    let ca_path = ca.write_to(dir, "ca.crt");
    let client_ca = clients.write_to(dir, "client-ca.crt");
    let (cert, key) = server_files(dir, &ca, "tls");
    let envoy = clients.client_cert("envoy");
    let certified = write_pair(dir, "envoy", &envoy);
    let forged = write_pair(dir, "intruder", &other.client_cert("envoy"));
    let app = spawn_app_with(&[
        "--tls-cert",
        arg(&cert),
        "--tls-key",
        arg(&key),
        "--tls-client-ca",
        arg(&client_ca),
    ])
    .await;

    // The certified client is served.
    let good = Via::mtls(&ca_path, &certified);
    let services = list(&good, app.addr).await.services();
    assert!(services.contains(KEYS), "{services:?}");
    assert_serving(&health(&good, app.addr).await);
    let minted = mint(&good, app.addr, &app.admin_key, "acme").await;
    assert_allowed(&check(&good, app.addr, &secret(&minted)).await);
    // The certificate is no management key: Mint still wants one.
    let auth_less = grpcurl_with(
        &good,
        &["-d", r#"{"ownerId":"acme"}"#],
        app.addr,
        &["keyward.v1.KeyService/Mint"],
    )
    .await;
    auth_less.expect_failure("Unauthenticated");

    // No client certificate, or one from another CA: grpcurl cannot even
    // connect (so no reflection, no gRPC status) ...
    let anonymous = Via::tls(&ca_path);
    let shown = refused_list(&anonymous, app.addr).await;
    assert!(!shown.contains("Code:"), "{shown}");
    grpcurl_with(
        &anonymous,
        &["-connect-timeout", "2", "-d", "{}"],
        app.addr,
        &["grpc.health.v1.Health/Check"],
    )
    .await
    .expect_failure("Failed to dial target host");
    let shown = refused_list(&Via::mtls(&ca_path, &forged), app.addr).await;
    assert!(!shown.contains("Code:"), "{shown}");
    // ... because the TLS handshake is refused: the server's alert says why.
    tls_probe(app.addr, &ca, Some(&envoy))
        .await
        .expect("the certified client completes the handshake");
    let err = tls_probe(app.addr, &ca, None)
        .await
        .expect_err("an anonymous client");
    assert!(err.contains("CertificateRequired"), "{err}");
    let err = tls_probe(app.addr, &ca, Some(&other.client_cert("envoy")))
        .await
        .expect_err("a client certified by another CA");
    assert!(err.contains("UnknownCA"), "{err}");

    // tonic too: with the certificate served, without it refused.
    let channel = tls_channel(app.addr, &[&ca], Some(&envoy))
        .await
        .expect("connect with a client certificate");
    assert_eq!(tonic_health(channel).await.expect("health"), SERVING);
    let anonymous = match tls_channel(app.addr, &[&ca], None).await {
        // TLS 1.3: the client may finish its handshake before the server
        // has refused it; the refusal then arrives with the first call.
        Ok(channel) => tonic_health(channel)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(err) => Err(err.to_string()),
    };
    assert!(anonymous.is_err(), "an anonymous tonic client was served");

    // The refusals did not stop the listener.
    assert_serving(&health(&good, app.addr).await);
}

// --- 3. Rotation -----------------------------------------------------------

#[tokio::test]
async fn a_rotated_certificate_reaches_new_connections_while_open_ones_keep_working() {
    let scratch = Scratch::new();
    let dir = scratch.dir();
    let (first, second) = (TestCa::new("CA 1"), TestCa::new("CA 2"));
    let first_path = first.write_to(dir, "ca1.crt");
    let second_path = second.write_to(dir, "ca2.crt");
    let (cert_a, key_a) = first.server_cert(SERVER_NAMES);
    let cert = write_pem(dir, "tls.crt", &cert_a);
    let key = write_pem(dir, "tls.key", &key_a);
    let app = spawn_app_with(&[
        "--tls-cert",
        arg(&cert),
        "--tls-key",
        arg(&key),
        "--tls-reload-interval",
        "100ms",
    ])
    .await;

    // A connection opened now, trusting CA 1 only: should it reconnect after
    // the rotation, the new certificate would fail it. So its calls
    // succeeding later shows this very connection stayed open.
    assert_eq!(
        tls_probe(app.addr, &first, None).await.expect("TLS"),
        der(&cert_a)
    );
    let before = tls_channel(app.addr, &[&first], None)
        .await
        .expect("connect with certificate A");
    assert_eq!(tonic_health(before.clone()).await.expect("health"), SERVING);
    let minted = KeyServiceClient::new(before.clone())
        .mint(with_key(
            pb::MintRequest {
                owner_id: "acme".into(),
                ..Default::default()
            },
            &app.admin_key,
        ))
        .await
        .expect("mint over the first connection")
        .into_inner();
    list(&Via::tls(&first_path), app.addr).await.expect_ok();
    let shown = refused_list(&Via::tls(&second_path), app.addr).await;
    assert!(
        shown.contains("certificate signed by unknown authority"),
        "{shown}"
    );

    // The Secret is updated: certificate B from CA 2.
    let (cert_b, key_b) = second.server_cert(SERVER_NAMES);
    replace(&cert, &cert_b);
    replace(&key, &key_b);

    let trusting_second = Via::tls(&second_path);
    eventually(WAIT, || async {
        list(&trusting_second, app.addr).await.ok.then_some(())
    })
    .await
    .expect("new connections get certificate B within 10s");
    assert_serving(&health(&trusting_second, app.addr).await);
    assert_eq!(
        tls_probe(app.addr, &second, None).await.expect("TLS"),
        der(&cert_b)
    );
    let shown = refused_list(&Via::tls(&first_path), app.addr).await;
    assert!(
        shown.contains("certificate signed by unknown authority"),
        "{shown}"
    );
    // New tonic connections agree.
    let err = tls_channel(app.addr, &[&first], None)
        .await
        .expect_err("a new connection trusting only CA 1");
    assert!(
        format!("{err:?}").contains("UnknownIssuer"),
        "{}",
        telemetry::chain(&err)
    );
    let after = tls_channel(app.addr, &[&second], None)
        .await
        .expect("a new connection trusting CA 2");
    assert_eq!(tonic_health(after).await.expect("health"), SERVING);

    // The connection opened before the rotation still serves calls.
    assert_eq!(
        tonic_health(before.clone()).await.expect("old connection"),
        SERVING
    );
    let answer = CheckServiceClient::new(before)
        .check(pb::CheckRequest {
            key: minted.secret,
            ..Default::default()
        })
        .await
        .expect("check over the old connection")
        .into_inner();
    assert!(answer.allowed, "{answer:?}");
}

#[tokio::test]
async fn a_broken_renewal_is_logged_and_the_served_certificate_kept() {
    let logs = CapturedLogs::start();
    let scratch = Scratch::new();
    let dir = scratch.dir();
    let (first, second) = (TestCa::new("CA 1"), TestCa::new("CA 2"));
    let first_path = first.write_to(dir, "ca1.crt");
    let second_path = second.write_to(dir, "ca2.crt");
    let (cert, key) = server_files(dir, &first, "tls");
    let app = spawn_app_with(&[
        "--tls-cert",
        arg(&cert),
        "--tls-key",
        arg(&key),
        "--tls-reload-interval",
        "100ms",
    ])
    .await;
    let trusting_first = Via::tls(&first_path);
    list(&trusting_first, app.addr).await.expect_ok();

    replace(&cert, "not a certificate\n");
    let (warning, _) = eventually(WAIT, || async { logs.find("cannot use the TLS files") })
        .await
        .expect("the refused renewal is logged within 10s");
    assert!(warning.contains(arg(&cert)), "{warning}");
    assert!(warning.contains("WARN"), "{warning}");
    // Still certificate A, for new connections too.
    list(&trusting_first, app.addr).await.expect_ok();
    assert_serving(&health(&trusting_first, app.addr).await);

    // A good renewal after it is taken up.
    let (cert_b, key_b) = second.server_cert(SERVER_NAMES);
    replace(&key, &key_b);
    replace(&cert, &cert_b);
    let trusting_second = Via::tls(&second_path);
    eventually(WAIT, || async {
        list(&trusting_second, app.addr).await.ok.then_some(())
    })
    .await
    .expect("certificate B is served within 10s");
}

// --- 4. The admin address --------------------------------------------------

/// Flags for grpcurl to call keyward's services from the protos, where the
/// server has no reflection.
const PROTOS: &[&str] = &[
    "-import-path",
    "proto",
    "-import-path",
    "proto/vendor",
    "-proto",
    "keyward/v1/keys.proto",
    "-proto",
    "keyward/v1/check.proto",
    "-proto",
    "envoy/service/auth/v3/external_auth.proto",
];

#[tokio::test]
async fn with_an_admin_address_the_main_one_serves_only_checks_and_health() {
    let app = spawn_app_with(&["--admin-addr", "127.0.0.1:0"]).await;
    let admin_addr = app.replica.admin_addr().expect("an admin address");
    assert_ne!(admin_addr, app.addr);
    assert_eq!(app.replica.addr(), app.addr);

    // The management services are not on the main address.
    let mint_req = || pb::MintRequest {
        owner_id: "acme".into(),
        ..Default::default()
    };
    let err = app
        .keys
        .clone()
        .mint(app.admin(mint_req()))
        .await
        .expect_err("Mint on the main address");
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    let err = app
        .owners
        .clone()
        .list(app.admin(pb::OwnerServiceListRequest::default()))
        .await
        .expect_err("OwnerService on the main address");
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    let err = app
        .audit
        .clone()
        .list(app.admin(pb::AuditServiceListRequest::default()))
        .await
        .expect_err("AuditService on the main address");
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    let err = app
        .leaks
        .clone()
        .report(pb::ReportRequest::default())
        .await
        .expect_err("LeakService on the main address");
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    // grpcurl agrees (from the protos: the main address has no reflection).
    let plain = Via::plaintext();
    mint(
        &plain.clone().with(PROTOS),
        app.addr,
        &app.admin_key,
        "acme",
    )
    .await
    .expect_failure("Code: Unimplemented");
    list(&plain, app.addr)
        .await
        .expect_failure("does not support the reflection API");

    // The admin address mints (tonic and grpcurl) ...
    let minted = KeyServiceClient::new(plaintext_channel(admin_addr))
        .mint(app.admin(mint_req()))
        .await
        .expect("Mint on the admin address")
        .into_inner();
    let by_grpcurl = secret(&mint(&plain, admin_addr, &app.admin_key, "acme").await);
    // ... and the main address checks (tonic and grpcurl), and answers health.
    let answer = app.check_key(&minted.secret).await.expect("check");
    assert!(answer.allowed, "{answer:?}");
    assert_allowed(&check(&plain.clone().with(PROTOS), app.addr, &by_grpcurl).await);
    assert_envoy_ok(&envoy_check(&plain.clone().with(PROTOS), app.addr, &by_grpcurl).await);
    assert_eq!(
        tonic_health(plaintext_channel(app.addr))
            .await
            .expect("health"),
        SERVING
    );
    // Checks are not served on the admin address.
    let err = CheckServiceClient::new(plaintext_channel(admin_addr))
        .check(pb::CheckRequest {
            key: minted.secret,
            ..Default::default()
        })
        .await
        .expect_err("Check on the admin address");
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");

    // Reflection on the admin address lists the admin plane and health.
    let services = list(&plain, admin_addr).await.services();
    assert_eq!(services, set(&[KEYS, OWNERS, AUDIT, LEAKS, HEALTH]));
    assert_serving(&health(&plain, admin_addr).await);
}

#[tokio::test]
async fn one_address_serves_and_reflects_every_service_with_envoys_authorization() {
    let app = spawn_app_with(&[]).await;
    assert_eq!(app.replica.admin_addr(), None);
    let plain = Via::plaintext();

    let services = list(&plain, app.addr).await.services();
    assert_eq!(
        services,
        set(&[KEYS, OWNERS, AUDIT, LEAKS, CHECKS, ENVOY, HEALTH])
    );
    let described = grpcurl(&plain, app.addr, &["describe", ENVOY]).await;
    described.expect_ok();
    assert!(
        described
            .stdout
            .contains("rpc Check ( .envoy.service.auth.v3.CheckRequest )"),
        "{}",
        described.stdout
    );
    let request = grpcurl(
        &plain,
        app.addr,
        &["describe", "envoy.service.auth.v3.CheckRequest"],
    )
    .await;
    request.expect_ok();
    assert!(request.stdout.contains("attributes"), "{}", request.stdout);

    let minted = secret(&mint(&plain, app.addr, &app.admin_key, "acme").await);
    assert_allowed(&check(&plain, app.addr, &minted).await);
    assert_envoy_ok(&envoy_check(&plain, app.addr, &minted).await);
}

#[tokio::test]
async fn the_admin_address_can_have_its_own_tls_while_the_main_one_stays_plaintext() {
    let scratch = Scratch::new();
    let ca = TestCa::new("admin CA");
    let ca_path = ca.write_to(scratch.dir(), "ca.crt");
    let (cert, key) = server_files(scratch.dir(), &ca, "admin");
    let app = spawn_app_with(&[
        "--admin-addr",
        "127.0.0.1:0",
        "--admin-tls-cert",
        arg(&cert),
        "--admin-tls-key",
        arg(&key),
    ])
    .await;
    let admin_addr = app.replica.admin_addr().expect("an admin address");
    let trusting = Via::tls(&ca_path);

    // The admin address: TLS only.
    let services = list(&trusting, admin_addr).await.services();
    assert_eq!(services, set(&[KEYS, OWNERS, AUDIT, LEAKS, HEALTH]));
    let minted = secret(&mint(&trusting, admin_addr, &app.admin_key, "acme").await);
    refused_list(&Via::plaintext(), admin_addr).await;
    let over_tonic = KeyServiceClient::new(
        tls_channel(admin_addr, &[&ca], None)
            .await
            .expect("TLS to the admin address"),
    )
    .mint(app.admin(pb::MintRequest {
        owner_id: "acme".into(),
        ..Default::default()
    }))
    .await
    .expect("Mint over TLS")
    .into_inner();

    // The main address: plaintext, as before.
    for secret in [&minted, &over_tonic.secret] {
        let answer = app.check_key(secret).await.expect("check");
        assert!(answer.allowed, "{answer:?}");
    }
    assert_allowed(&check(&Via::plaintext().with(PROTOS), app.addr, &minted).await);
    grpcurl_with(
        &trusting,
        PROTOS,
        app.addr,
        &["keyward.v1.CheckService/Check"],
    )
    .await
    .expect_failure("Failed to dial target host");
}

#[tokio::test]
async fn the_admin_address_takes_the_main_tls_unless_given_its_own() {
    let scratch = Scratch::new();
    let ca = TestCa::new("keyward CA");
    let ca_path = ca.write_to(scratch.dir(), "ca.crt");
    let (cert, key) = server_files(scratch.dir(), &ca, "tls");
    let app = spawn_app_with(&[
        "--tls-cert",
        arg(&cert),
        "--tls-key",
        arg(&key),
        "--admin-addr",
        "127.0.0.1:0",
    ])
    .await;
    let admin_addr = app.replica.admin_addr().expect("an admin address");
    let trusting = Via::tls(&ca_path);

    // Both addresses are TLS: the admin plane is never plaintext by accident.
    let services = list(&trusting, admin_addr).await.services();
    assert_eq!(services, set(&[KEYS, OWNERS, AUDIT, LEAKS, HEALTH]));
    secret(&mint(&trusting, admin_addr, &app.admin_key, "acme").await);
    refused_list(&Via::plaintext(), admin_addr).await;
    let main = tls_channel(app.addr, &[&ca], None)
        .await
        .expect("TLS to the main address");
    assert_eq!(tonic_health(main).await.expect("health"), SERVING);
    assert_transport_failure(tonic_health(plaintext_channel(app.addr)).await);
}

// --- 5. Bad TLS settings ---------------------------------------------------

/// Builds the application with `flags` on `database_url`; returns the
/// start-up error's whole chain.
async fn start_up_error(database_url: &str, flags: &[&str]) -> String {
    let config = helpers::test_config(database_url, flags);
    match Application::build(&config).await {
        Ok(_) => panic!("start-up succeeded with {flags:?}"),
        Err(err) => telemetry::chain(&err),
    }
}

#[tokio::test]
async fn bad_tls_files_fail_start_up_with_an_error_naming_the_file() {
    let scratch = Scratch::new();
    let dir = scratch.dir();
    let ca = TestCa::new("keyward CA");
    let (cert, key) = server_files(dir, &ca, "tls");
    let (_, other_key) = server_files(dir, &ca, "other");
    let missing = dir.join("missing.crt");
    let database_url = helpers::fresh_database_url();

    let err = start_up_error(
        &database_url,
        &["--tls-cert", arg(&missing), "--tls-key", arg(&key)],
    )
    .await;
    assert!(
        err.starts_with(
            "invalid TLS settings for the main address: cannot read the TLS certificate"
        ),
        "{err}"
    );
    assert!(err.contains(arg(&missing)), "{err}");
    assert!(err.contains("No such file"), "{err}");

    let err = start_up_error(
        &database_url,
        &["--tls-cert", arg(&cert), "--tls-key", arg(&other_key)],
    )
    .await;
    assert_eq!(
        err,
        format!(
            "invalid TLS settings for the main address: the private key in {} does not match the certificate in {}",
            other_key.display(),
            cert.display()
        )
    );

    // A client CA file with no CA in it (a key, by mistake).
    let err = start_up_error(
        &database_url,
        &[
            "--tls-cert",
            arg(&cert),
            "--tls-key",
            arg(&key),
            "--tls-client-ca",
            arg(&key),
        ],
    )
    .await;
    assert_eq!(
        err,
        format!(
            "invalid TLS settings for the main address: no CA certificate in {}",
            key.display()
        )
    );

    // The admin address's own files are checked too, and named as its.
    let err = start_up_error(
        &database_url,
        &[
            "--admin-addr",
            "127.0.0.1:0",
            "--admin-tls-cert",
            arg(&missing),
            "--admin-tls-key",
            arg(&key),
        ],
    )
    .await;
    assert!(
        err.starts_with(
            "invalid TLS settings for the admin address: cannot read the TLS certificate"
        ),
        "{err}"
    );
    assert!(err.contains(arg(&missing)), "{err}");
}

#[tokio::test]
async fn the_binary_exits_with_the_error_naming_the_missing_file() {
    let scratch = Scratch::new();
    let ca = TestCa::new("keyward CA");
    let (_, key) = server_files(scratch.dir(), &ca, "tls");
    let missing = scratch.dir().join("missing.crt");
    let database_url = helpers::fresh_database_url();
    let run = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args([
            "--database-url",
            &database_url,
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "off",
            "--tls-cert",
            arg(&missing),
            "--tls-key",
            arg(&key),
        ])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("keyward exits within 60s")
        .expect("run keyward");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "keyward started: {stderr}");
    assert!(
        stderr.contains("invalid TLS settings for the main address"),
        "{stderr}"
    );
    assert!(stderr.contains(arg(&missing)), "{stderr}");
}

#[test]
fn a_certificate_without_its_key_is_refused_when_parsing_the_flags() {
    use clap::Parser as _;
    for flags in [
        &["--tls-cert", "tls.crt"][..],
        &["--tls-key", "tls.key"],
        &["--tls-client-ca", "ca.crt"],
        &["--admin-tls-cert", "admin.crt"],
    ] {
        let args = ["keyward"].iter().chain(flags);
        let err = keyward::config::Config::try_parse_from(args)
            .expect_err("a half TLS setting is refused");
        assert_eq!(
            err.kind(),
            clap::error::ErrorKind::MissingRequiredArgument,
            "{flags:?}: {err}"
        );
    }
}
