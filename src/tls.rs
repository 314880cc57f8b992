//! TLS and mTLS for the gRPC listeners, with certificates re-read when their
//! files change.
//!
//! cert-manager renews a certificate by rewriting its Kubernetes Secret, and
//! the kubelet then swaps the mounted files (a symlink flip). A restart per
//! renewal would drop every open connection, so [`TlsAcceptor`] polls the
//! files' contents instead and swaps in a new [`ServerConfig`] when they
//! changed and are valid. Each connection keeps the config it was accepted
//! with, so a swap touches only new connections. A bad new file is logged and
//! the old certificate kept: a broken renewal must not take the service down.

use std::{
    fmt, io,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use arc_swap::ArcSwap;
use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    server::{WebPkiClientVerifier, danger::ClientCertVerifier},
    sign::{CertifiedKey, SingleCertAndKey},
};
use rustls_pki_types::{
    CertificateDer, PrivateKeyDer,
    pem::{self, PemObject},
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::{JoinHandle, JoinSet},
    time::{Instant, MissedTickBehavior, Sleep},
};
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::net::Coalescing;

/// How long a client has to finish its TLS handshake: a client that connects
/// and then stalls would otherwise hold a socket and a task indefinitely.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The shortest reload interval: `tokio::time::interval` panics on zero.
const MIN_RELOAD_INTERVAL: Duration = Duration::from_millis(10);

/// How long accepting pauses after an error that is not one connection's
/// (typically out of file descriptors): retrying at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// The only application protocol offered: gRPC runs over HTTP/2.
const ALPN_H2: &[u8] = b"h2";

const CERT: &str = "TLS certificate";
const KEY: &str = "TLS private key";
const CLIENT_CA: &str = "client CA";

/// Where the PEM files are. Symlinks are followed on every read, as a
/// Kubernetes Secret volume needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The leaf certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// With a path: mTLS, every client must present a certificate issued by
    /// one of the CAs in this file.
    pub client_ca: Option<PathBuf>,
}

/// Why the TLS files cannot be used. Every variant names the file; none
/// carries key bytes.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the {what} {}", .path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The reason is fixed text rather than the parser's message, which can
    /// quote a byte of the file (of a private key, too).
    #[error("the {what} {} is not valid PEM: {reason}", .path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        reason: &'static str,
    },
    #[error("no certificate in {}", .path.display())]
    NoCertificate { path: PathBuf },
    #[error("invalid certificate in {}", .path.display())]
    InvalidCertificate {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("no private key in {}", .path.display())]
    NoPrivateKey { path: PathBuf },
    #[error("unusable private key in {}", .path.display())]
    InvalidKey {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error(
        "the private key in {} does not match the certificate in {}",
        .key.display(),
        .cert.display()
    )]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("no CA certificate in {}", .path.display())]
    NoClientCa { path: PathBuf },
    #[error("invalid client CA {}", .path.display())]
    InvalidClientCa {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot build the TLS configuration")]
    Config(#[source] rustls::Error),
}

/// Turns accepted TCP connections into TLS connections with the current
/// certificate. Clones share the certificate (and its reloads).
#[derive(Clone)]
pub struct TlsAcceptor {
    inner: Arc<Inner>,
}

struct Inner {
    files: TlsFiles,
    served: ArcSwap<Served>,
}

/// A config and the file contents it was built from, swapped together so a
/// poll compares the files with what is really being served.
struct Served {
    config: Arc<ServerConfig>,
    contents: Contents,
}

/// The bytes of the files. Deliberately not `Debug`: it holds the key.
#[derive(PartialEq, Eq)]
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsAcceptor")
            .field("files", &self.inner.files)
            .finish_non_exhaustive()
    }
}

impl TlsAcceptor {
    /// Reads the files now; an error here fails start-up.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let contents = read_contents(&files)?;
        let config = build(&files, &contents)?;
        Ok(Self {
            inner: Arc::new(Inner {
                files,
                served: ArcSwap::from_pointee(Served { config, contents }),
            }),
        })
    }

    /// Re-reads the files every `every` (at least 10 ms) and swaps in a new
    /// config when their contents changed and are valid; when they are not,
    /// logs a WARN naming the file and keeps the old one. Contents, not
    /// mtimes, are compared: in a Secret update the `tls.crt` link itself
    /// never changes (only `..data`, which it goes through, is swapped), and
    /// a rewrite can keep an mtime within its granularity. Stops when `stop`
    /// turns true or its sender is dropped.
    pub fn spawn_reloader(
        &self,
        every: Duration,
        mut stop: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        let mut reloader = Reloader {
            inner: self.inner.clone(),
            failure: None,
        };
        let every = every.max(MIN_RELOAD_INTERVAL);
        tokio::spawn(async move {
            // The files were read by `load`: the first poll is one period on.
            let mut ticker = tokio::time::interval_at(Instant::now() + every, every);
            ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                if *stop.borrow_and_update() {
                    return;
                }
                tokio::select! {
                    _ = ticker.tick() => {
                        reloader.poll().await;
                    }
                    changed = stop.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                }
            }
        })
    }

    /// The TLS connections made from `listener`'s TCP connections, for
    /// `tonic::transport::Server::serve_with_incoming_shutdown`.
    ///
    /// Handshakes run concurrently, so a slow or failing client delays no
    /// other; each must finish within [`HANDSHAKE_TIMEOUT`]. A failed
    /// handshake is logged at DEBUG and dropped. The stream never ends and
    /// never yields an error (the `Result` is what tonic's bound asks for):
    /// accept errors are handled here. Dropping it closes the listener and
    /// abandons the handshakes in progress.
    pub fn incoming(
        &self,
        listener: TcpListener,
    ) -> impl Stream<Item = io::Result<TlsConn>> + Send + 'static {
        self.incoming_with_timeout(listener, HANDSHAKE_TIMEOUT)
    }

    fn incoming_with_timeout(&self, listener: TcpListener, timeout: Duration) -> Incoming {
        Incoming {
            listener,
            acceptor: self.clone(),
            timeout,
            handshakes: JoinSet::new(),
            paused: None,
        }
    }

    fn config(&self) -> Arc<ServerConfig> {
        self.inner.served.load().config.clone()
    }
}

/// Reads all the files, following symlinks.
fn read_contents(files: &TlsFiles) -> Result<Contents, TlsError> {
    fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
        std::fs::read(path).map_err(|source| TlsError::Read {
            what,
            path: path.to_owned(),
            source,
        })
    }
    Ok(Contents {
        cert: read(CERT, &files.cert)?,
        key: read(KEY, &files.key)?,
        client_ca: files
            .client_ca
            .as_deref()
            .map(|path| read(CLIENT_CA, path))
            .transpose()?,
    })
}

/// The server config for these contents: ALPN h2, TLS 1.2 and 1.3, ring
/// (named here, so no process-wide default provider is needed), and with a
/// client CA a client certificate required.
fn build(files: &TlsFiles, contents: &Contents) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());

    let chain = certificates(&contents.cert, CERT, &files.cert)?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: files.cert.clone(),
        });
    }
    let key = match PrivateKeyDer::from_pem_slice(&contents.key) {
        Ok(key) => key,
        Err(pem::Error::NoItemsFound) => {
            return Err(TlsError::NoPrivateKey {
                path: files.key.clone(),
            });
        }
        Err(err) => return Err(pem_error(KEY, &files.key, &err)),
    };
    let key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::InvalidKey {
            path: files.key.clone(),
            source,
        })?;
    // `CertifiedKey::from_der` (and so `with_single_cert`) runs this check
    // too, but its error does not say which file is wrong.
    let certified = CertifiedKey::new(chain, key);
    match certified.keys_match() {
        // `Unknown`: the key cannot report its public half; ring's all can.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(_)) => {
            return Err(TlsError::KeyMismatch {
                key: files.key.clone(),
                cert: files.cert.clone(),
            });
        }
        Err(source) => {
            return Err(TlsError::InvalidCertificate {
                path: files.cert.clone(),
                source,
            });
        }
    }

    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?;
    let builder = match (&files.client_ca, &contents.client_ca) {
        (Some(path), Some(pem)) => {
            builder.with_client_cert_verifier(client_verifier(path, pem, &provider)?)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// A verifier that requires a client certificate issued by a CA in `pem`:
/// anonymous clients are refused.
fn client_verifier(
    path: &Path,
    pem: &[u8],
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let invalid = |source: Box<dyn std::error::Error + Send + Sync>| TlsError::InvalidClientCa {
        path: path.to_owned(),
        source,
    };
    let cas = certificates(pem, CLIENT_CA, path)?;
    if cas.is_empty() {
        return Err(TlsError::NoClientCa {
            path: path.to_owned(),
        });
    }
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots.add(ca).map_err(|e| invalid(Box::new(e)))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| invalid(Box::new(e)))
}

/// Every certificate in `pem` (other PEM sections, such as a key, skipped).
fn certificates(
    pem: &[u8],
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| pem_error(what, path, &err))
}

fn pem_error(what: &'static str, path: &Path, err: &pem::Error) -> TlsError {
    let reason = match err {
        pem::Error::MissingSectionEnd { .. } => "a section has no END line",
        pem::Error::IllegalSectionStart { .. } => "a BEGIN line is malformed",
        pem::Error::Base64Decode(_) => "a section is not valid base64",
        pem::Error::SectionTooLarge => "a section is too large",
        _ => "it cannot be parsed",
    };
    TlsError::Pem {
        what,
        path: path.to_owned(),
        reason,
    }
}

/// The state of one `spawn_reloader` task.
struct Reloader {
    inner: Arc<Inner>,
    /// The last refusal, so that files left broken are warned about once,
    /// not on every poll.
    failure: Option<Failure>,
}

#[derive(PartialEq, Eq)]
enum Failure {
    /// The error's text.
    Unreadable(String),
    Invalid(Contents),
}

/// What one poll did.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Unchanged,
    Reloaded,
    /// The files changed but cannot be used; the old config stays.
    Refused,
}

/// What the files hold, compared with what is served.
enum Reread {
    Same,
    /// Two reads in a row differed: the files are being replaced right now.
    Moving,
    Changed(Contents, Result<Arc<ServerConfig>, TlsError>),
    Unreadable(TlsError),
}

impl Reloader {
    async fn poll(&mut self) -> Outcome {
        let inner = self.inner.clone();
        // Off the async workers: a hung volume must not stall one.
        let reread = match tokio::task::spawn_blocking(move || reread(&inner)).await {
            Ok(reread) => reread,
            Err(err) => {
                tracing::warn!(error = %err, "cannot re-read the TLS files");
                return Outcome::Refused;
            }
        };
        match reread {
            Reread::Same => {
                self.failure = None;
                Outcome::Unchanged
            }
            Reread::Moving => {
                tracing::debug!("the TLS files are being replaced; re-reading them next time");
                Outcome::Unchanged
            }
            Reread::Changed(contents, Ok(config)) => {
                self.inner
                    .served
                    .store(Arc::new(Served { config, contents }));
                self.failure = None;
                tracing::info!(
                    cert = %self.inner.files.cert.display(),
                    "TLS certificate reloaded; new connections use it"
                );
                Outcome::Reloaded
            }
            Reread::Changed(contents, Err(err)) => {
                self.refuse(Failure::Invalid(contents), &err);
                Outcome::Refused
            }
            Reread::Unreadable(err) => {
                self.refuse(Failure::Unreadable(err.to_string()), &err);
                Outcome::Refused
            }
        }
    }

    fn refuse(&mut self, failure: Failure, err: &TlsError) {
        if self.failure.as_ref() != Some(&failure) {
            tracing::warn!(
                error = %crate::telemetry::chain(err),
                "cannot use the TLS files; still serving the previous certificate"
            );
        }
        self.failure = Some(failure);
    }
}

/// Reads the files and, when they differ from what is served, builds their
/// config. Blocking.
fn reread(inner: &Inner) -> Reread {
    let files = &inner.files;
    let first = match read_contents(files) {
        Ok(contents) => contents,
        Err(err) => return Reread::Unreadable(err),
    };
    if first == inner.served.load().contents {
        return Reread::Same;
    }
    // A Secret update swaps all files at once, but between reading the
    // certificate and the key this poll could see a new certificate with the
    // old key: only contents read the same twice are judged.
    match read_contents(files) {
        Ok(second) if second == first => {}
        _ => return Reread::Moving,
    }
    let config = build(files, &first);
    Reread::Changed(first, config)
}

/// The stream behind [`TlsAcceptor::incoming`].
struct Incoming {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    timeout: Duration,
    handshakes: JoinSet<Option<TlsConn>>,
    /// Set after an accept error that is not one connection's.
    paused: Option<Pin<Box<Sleep>>>,
}

impl Incoming {
    /// Takes a connection off the listener and starts its handshake; `true`
    /// when it made progress (and should be called again).
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(pause) = &mut self.paused {
            if pause.as_mut().poll(cx).is_pending() {
                return false;
            }
            self.paused = None;
        }
        match self.listener.poll_accept(cx) {
            Poll::Pending => false,
            Poll::Ready(Ok((tcp, peer))) => {
                // The config now: a reload later affects only later clients.
                let config = self.acceptor.config();
                self.handshakes
                    .spawn(handshake(config, tcp, peer, self.timeout));
                true
            }
            Poll::Ready(Err(err)) if is_connection_error(&err) => {
                tracing::debug!(error = %err, "accepted connection was already gone");
                true
            }
            Poll::Ready(Err(err)) => {
                tracing::warn!(
                    error = %err,
                    pause = ?ACCEPT_BACKOFF,
                    "cannot accept connections; pausing"
                );
                self.paused = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                true
            }
        }
    }
}

/// Errors that concern one connection, not the listener.
fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
    )
}

impl Stream for Incoming {
    type Item = io::Result<TlsConn>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            let accepted = this.poll_accept(cx);
            match this.handshakes.poll_join_next(cx) {
                Poll::Ready(Some(Ok(Some(conn)))) => return Poll::Ready(Some(Ok(conn))),
                // Failed, and logged.
                Poll::Ready(Some(Ok(None))) => {}
                Poll::Ready(Some(Err(err))) => {
                    tracing::warn!(error = %err, "a TLS handshake task failed");
                }
                // Both wakers are registered (an empty set only grows here).
                Poll::Ready(None) | Poll::Pending if !accepted => return Poll::Pending,
                Poll::Ready(None) | Poll::Pending => {}
            }
        }
    }
}

async fn handshake(
    config: Arc<ServerConfig>,
    tcp: TcpStream,
    peer: SocketAddr,
    timeout: Duration,
) -> Option<TlsConn> {
    // gRPC's small messages must not wait for Nagle.
    if let Err(err) = tcp.set_nodelay(true) {
        tracing::debug!(%peer, error = %err, "cannot set TCP_NODELAY");
    }
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(Coalescing(tcp));
    match tokio::time::timeout(timeout, accept).await {
        Ok(Ok(tls)) => Some(Coalescing(tls)),
        Ok(Err(err)) => {
            tracing::debug!(%peer, error = %err, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, ?timeout, "TLS handshake timed out");
            None
        }
    }
}

/// An accepted TLS connection, handshake done.
pub type TlsConn = Coalescing<tokio_rustls::server::TlsStream<Coalescing>>;

/// The TCP connection's, so `Request::remote_addr` (which looks for
/// `TcpConnectInfo` first) works in handlers as without TLS.
impl Connected for TlsConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    use rustls::{ClientConfig, pki_types::ServerName};
    use tokio::io::{AsyncReadExt as _, AsyncWrite as _, AsyncWriteExt as _};
    use tokio_stream::StreamExt as _;

    use super::*;

    /// Every wait in these tests is bounded by this.
    const WAIT: Duration = Duration::from_secs(5);

    struct Ca(CertifiedIssuer<'static, KeyPair>);

    impl Ca {
        fn new(name: &str) -> Self {
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            Self(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
        }

        fn pem(&self) -> String {
            self.0.pem()
        }

        /// `(cert_pem, key_pem)` for localhost and 127.0.0.1.
        fn server(&self) -> (String, String) {
            self.leaf(
                &["localhost", "127.0.0.1"],
                "server",
                ExtendedKeyUsagePurpose::ServerAuth,
            )
        }

        fn client(&self, name: &str) -> (String, String) {
            self.leaf(&[], name, ExtendedKeyUsagePurpose::ClientAuth)
        }

        fn leaf(&self, names: &[&str], cn: &str, eku: ExtendedKeyUsagePurpose) -> (String, String) {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            let mut params = CertificateParams::new(names).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = vec![eku];
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.0).unwrap();
            (cert.pem(), key.serialize_pem())
        }
    }

    fn der(cert_pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()
    }

    /// A temporary directory, removed on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new() -> Self {
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!("keyward-tls-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }

        fn write(&self, name: &str, contents: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, contents).unwrap();
            path
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A Secret volume as the kubelet lays it out: `tls.crt` ->
    /// `..data/tls.crt`, `..data` -> a timestamped directory; an update
    /// writes a new directory and renames a new `..data` link over the old.
    struct SecretVolume {
        dir: Dir,
        version: u32,
    }

    impl SecretVolume {
        fn new(files: &[(&str, &str)]) -> Self {
            let mut volume = Self {
                dir: Dir::new(),
                version: 0,
            };
            volume.update(files);
            for (name, _) in files {
                symlink(format!("..data/{name}"), volume.dir.0.join(name)).unwrap();
            }
            volume
        }

        fn update(&mut self, files: &[(&str, &str)]) {
            self.version += 1;
            let version = format!("..v{}", self.version);
            std::fs::create_dir(self.dir.0.join(&version)).unwrap();
            for (name, contents) in files {
                std::fs::write(self.dir.0.join(&version).join(name), contents).unwrap();
            }
            let tmp = self.dir.0.join("..data_tmp");
            symlink(&version, &tmp).unwrap();
            std::fs::rename(&tmp, self.dir.0.join("..data")).unwrap();
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.0.join(name)
        }
    }

    /// `incoming()` on a loopback port, every connection echoing what it
    /// reads.
    async fn serve(acceptor: &TlsAcceptor) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Box::pin(acceptor.incoming(listener));
        tokio::spawn(async move {
            while let Some(conn) = incoming.next().await {
                let mut conn = conn.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n @ 1..) = conn.read(&mut buf).await {
                        if conn.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    fn client_config(trusted: &[&Ca], identity: Option<(String, String)>) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        for ca in trusted {
            roots.add(der(&ca.pem())).unwrap();
        }
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots);
        let mut config = match identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![der(&cert)],
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }

    type Client = tokio_rustls::client::TlsStream<TcpStream>;

    async fn connect(addr: SocketAddr, config: &Arc<ClientConfig>) -> io::Result<Client> {
        let connector = tokio_rustls::TlsConnector::from(config.clone());
        let attempt = async {
            let tcp = TcpStream::connect(addr).await?;
            connector
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
        };
        tokio::time::timeout(WAIT, attempt).await?
    }

    /// A round trip through the echo. Under TLS 1.3 a client finishes its
    /// handshake before the server has checked its certificate, so a refused
    /// client certificate shows here, not in `connect`.
    async fn ping(client: &mut Client) -> io::Result<()> {
        let round_trip = async {
            client.write_all(b"ping").await?;
            let mut buf = [0u8; 4];
            client.read_exact(&mut buf).await?;
            assert_eq!(&buf, b"ping");
            Ok(())
        };
        tokio::time::timeout(WAIT, round_trip).await?
    }

    async fn served(addr: SocketAddr, config: &Arc<ClientConfig>) -> io::Result<Client> {
        let mut client = connect(addr, config).await?;
        ping(&mut client).await?;
        Ok(client)
    }

    fn presented(client: &Client) -> CertificateDer<'static> {
        client.get_ref().1.peer_certificates().unwrap()[0].clone()
    }

    /// A server on `ca`'s certificate, its files in `dir`.
    fn acceptor(dir: &Dir, ca: &Ca, client_ca: Option<&Ca>) -> (TlsAcceptor, String) {
        let (cert, key) = ca.server();
        let files = TlsFiles {
            cert: dir.write("tls.crt", &cert),
            key: dir.write("tls.key", &key),
            client_ca: client_ca.map(|ca| dir.write("ca.crt", &ca.pem())),
        };
        (TlsAcceptor::load(files).unwrap(), cert)
    }

    #[tokio::test]
    async fn a_trusting_client_gets_h2_and_exchanges_bytes() {
        let (dir, ca) = (Dir::new(), Ca::new("ca"));
        let (acceptor, cert) = acceptor(&dir, &ca, None);
        let addr = serve(&acceptor).await;

        let client = served(addr, &client_config(&[&ca], None)).await.unwrap();
        assert_eq!(client.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        assert_eq!(presented(&client), der(&cert));
    }

    #[tokio::test]
    async fn a_client_not_trusting_the_ca_fails_and_the_next_is_served() {
        let (dir, ca, other) = (Dir::new(), Ca::new("ca"), Ca::new("other"));
        let (acceptor, _) = acceptor(&dir, &ca, None);
        let addr = serve(&acceptor).await;

        let err = connect(addr, &client_config(&[&other], None))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("UnknownIssuer"), "{err}");
        served(addr, &client_config(&[&ca], None)).await.unwrap();
    }

    #[tokio::test]
    async fn mtls_serves_only_clients_certified_by_the_client_ca() {
        let dir = Dir::new();
        let (ca, clients, other) = (Ca::new("ca"), Ca::new("clients"), Ca::new("other"));
        let (acceptor, _) = acceptor(&dir, &ca, Some(&clients));
        let addr = serve(&acceptor).await;

        let good = client_config(&[&ca], Some(clients.client("envoy")));
        served(addr, &good).await.unwrap();
        let anonymous = client_config(&[&ca], None);
        assert!(served(addr, &anonymous).await.is_err());
        let stranger = client_config(&[&ca], Some(other.client("envoy")));
        assert!(served(addr, &stranger).await.is_err());
        // The refusals did not stop the listener.
        served(addr, &good).await.unwrap();
    }

    #[tokio::test]
    async fn a_rotated_secret_is_served_to_new_connections_and_old_ones_stay() {
        let (ca, next) = (Ca::new("ca"), Ca::new("next"));
        let ((cert, key), (next_cert, next_key)) = (ca.server(), next.server());
        let mut volume = SecretVolume::new(&[("tls.crt", &cert), ("tls.key", &key)]);
        let acceptor = TlsAcceptor::load(TlsFiles {
            cert: volume.path("tls.crt"),
            key: volume.path("tls.key"),
            client_ca: None,
        })
        .unwrap();
        let (stop, stopped) = watch::channel(false);
        let reloader = acceptor.spawn_reloader(Duration::from_millis(20), stopped);
        let addr = serve(&acceptor).await;
        let trusting_both = client_config(&[&ca, &next], None);
        let mut before = served(addr, &trusting_both).await.unwrap();
        assert_eq!(presented(&before), der(&cert));

        volume.update(&[("tls.crt", &next_cert), ("tls.key", &next_key)]);
        let deadline = Instant::now() + WAIT;
        loop {
            let client = served(addr, &trusting_both).await.unwrap();
            if presented(&client) == der(&next_cert) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the new certificate was not served"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ping(&mut before).await.unwrap();

        stop.send(true).unwrap();
        tokio::time::timeout(WAIT, reloader).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn bad_new_files_are_refused_and_the_old_certificate_kept() {
        let (ca, next) = (Ca::new("ca"), Ca::new("next"));
        let ((cert, key), (next_cert, next_key)) = (ca.server(), next.server());
        let (_, unrelated_key) = next.server();
        let mut volume = SecretVolume::new(&[("tls.crt", &cert), ("tls.key", &key)]);
        let acceptor = TlsAcceptor::load(TlsFiles {
            cert: volume.path("tls.crt"),
            key: volume.path("tls.key"),
            client_ca: None,
        })
        .unwrap();
        let mut reloader = Reloader {
            inner: acceptor.inner.clone(),
            failure: None,
        };
        let addr = serve(&acceptor).await;
        let trusting_both = client_config(&[&ca, &next], None);
        let still_old = async || {
            let client = served(addr, &trusting_both).await.unwrap();
            assert_eq!(presented(&client), der(&cert));
        };

        assert_eq!(reloader.poll().await, Outcome::Unchanged);
        volume.update(&[("tls.crt", "garbage"), ("tls.key", &key)]);
        assert_eq!(reloader.poll().await, Outcome::Refused);
        // Still refused (and warned about once) while the files stay bad.
        assert_eq!(reloader.poll().await, Outcome::Refused);
        still_old().await;

        volume.update(&[("tls.crt", &next_cert), ("tls.key", &unrelated_key)]);
        assert_eq!(reloader.poll().await, Outcome::Refused);
        still_old().await;

        std::fs::remove_file(volume.path("tls.key")).unwrap();
        assert_eq!(reloader.poll().await, Outcome::Refused);
        still_old().await;
        symlink("..data/tls.key", volume.path("tls.key")).unwrap();

        volume.update(&[("tls.crt", &next_cert), ("tls.key", &next_key)]);
        assert_eq!(reloader.poll().await, Outcome::Reloaded);
        let client = served(addr, &trusting_both).await.unwrap();
        assert_eq!(presented(&client), der(&next_cert));
        assert_eq!(reloader.poll().await, Outcome::Unchanged);
    }

    #[test]
    fn load_errors_name_the_file_and_the_cause() {
        let (dir, ca) = (Dir::new(), Ca::new("ca"));
        let (cert, key) = ca.server();
        let (_, other_key) = ca.server();
        let cert_path = dir.write("tls.crt", &cert);
        let key_path = dir.write("tls.key", &key);
        let load = |cert: &Path, key: &Path, client_ca: Option<&Path>| {
            let files = TlsFiles {
                cert: cert.to_owned(),
                key: key.to_owned(),
                client_ca: client_ca.map(Path::to_owned),
            };
            crate::telemetry::chain(&TlsAcceptor::load(files).unwrap_err())
        };
        let shown = |path: &Path| path.display().to_string();

        let missing = dir.0.join("missing.crt");
        let err = load(&missing, &key_path, None);
        assert!(err.starts_with("cannot read the TLS certificate"), "{err}");
        assert!(err.contains(&shown(&missing)), "{err}");
        assert!(err.contains("No such file"), "{err}");

        // A key where the certificate should be, and the other way round.
        let err = load(&key_path, &key_path, None);
        assert_eq!(err, format!("no certificate in {}", shown(&key_path)));
        let err = load(&cert_path, &cert_path, None);
        assert_eq!(err, format!("no private key in {}", shown(&cert_path)));

        let broken = dir.write(
            "broken.key",
            "-----BEGIN PRIVATE KEY-----\nnot*base64\n-----END PRIVATE KEY-----\n",
        );
        let err = load(&cert_path, &broken, None);
        assert_eq!(
            err,
            format!(
                "the TLS private key {} is not valid PEM: a section is not valid base64",
                shown(&broken)
            )
        );

        let other_key_path = dir.write("other.key", &other_key);
        let err = load(&cert_path, &other_key_path, None);
        assert_eq!(
            err,
            format!(
                "the private key in {} does not match the certificate in {}",
                shown(&other_key_path),
                shown(&cert_path)
            )
        );

        let err = load(&cert_path, &key_path, Some(&key_path));
        assert_eq!(err, format!("no CA certificate in {}", shown(&key_path)));

        let not_a_key = dir.write(
            "not-a.key",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        );
        let err = load(&cert_path, &not_a_key, None);
        assert!(
            err.starts_with(&format!("unusable private key in {}", shown(&not_a_key))),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_stalled_handshake_neither_blocks_others_nor_lasts() {
        let (dir, ca) = (Dir::new(), Ca::new("ca"));
        let (acceptor, _) = acceptor(&dir, &ca, None);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let timeout = Duration::from_secs(2);
        let mut incoming = Box::pin(acceptor.incoming_with_timeout(listener, timeout));
        let config = client_config(&[&ca], None);

        // Connects, says nothing.
        let mut stalled = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        let client = tokio::spawn(async move { connect(addr, &config).await });
        let conn = tokio::time::timeout(WAIT, incoming.next()).await.unwrap();
        conn.unwrap().unwrap();
        client.await.unwrap().unwrap();
        assert!(
            started.elapsed() < timeout,
            "the stalled client held up the next"
        );

        // Keep polling the stream, as the server would, while the stalled
        // client waits to be hung up on.
        let poll = tokio::spawn(async move { incoming.next().await.map(|c| c.is_ok()) });
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(WAIT, stalled.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert!(started.elapsed() >= timeout);
        poll.abort();
    }

    #[tokio::test]
    async fn a_connection_reports_its_peer_and_no_vectored_writes() {
        let (dir, ca) = (Dir::new(), Ca::new("ca"));
        let (acceptor, _) = acceptor(&dir, &ca, None);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Box::pin(acceptor.incoming(listener));
        let config = client_config(&[&ca], None);
        let client = tokio::spawn(async move { connect(addr, &config).await });

        let conn = tokio::time::timeout(WAIT, incoming.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let client = client.await.unwrap().unwrap();
        let info = conn.connect_info();
        assert_eq!(
            info.remote_addr(),
            Some(client.get_ref().0.local_addr().unwrap())
        );
        assert_eq!(info.local_addr(), Some(addr));
        assert!(!conn.is_write_vectored());
        assert!(conn.0.get_ref().0.0.nodelay().unwrap());
    }

    /// The stream and the connections satisfy tonic's bounds, and an mTLS
    /// gRPC call goes through them.
    #[tokio::test]
    async fn tonic_serves_grpc_over_it() {
        use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server};
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

        let dir = Dir::new();
        let (ca, clients) = (Ca::new("ca"), Ca::new("clients"));
        let (acceptor, _) = acceptor(&dir, &ca, Some(&clients));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_reporter, health) = tonic_health::server::health_reporter();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(
            Server::builder()
                .add_service(health)
                .serve_with_incoming_shutdown(acceptor.incoming(listener), async move {
                    let _ = stopped.await;
                }),
        );

        let (cert, key) = clients.client("envoy");
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca.pem()))
            .identity(Identity::from_pem(cert, key));
        let channel = Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect_timeout(WAIT)
            .timeout(WAIT)
            .connect()
            .await
            .unwrap();
        let status = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, 1, "SERVING");

        stop.send(()).unwrap();
        tokio::time::timeout(WAIT, server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}
