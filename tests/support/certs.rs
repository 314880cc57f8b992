//! A CA and certificates signed by it, generated when a test runs, so that no
//! key material is committed. Only rcgen and std: any test binary or
//! benchmark can include it with `#[path]`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A self-signed CA that issues server and client certificates.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    /// A new CA (with a new key) whose common name is `name`.
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("generate the CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("self-sign the CA");
        Self { issuer }
    }

    /// The CA certificate, PEM: what clients trust, or the server's client
    /// CA for mTLS.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// Writes the CA certificate to `dir/{name}`; returns its path.
    pub fn write_to(&self, dir: &Path, name: &str) -> PathBuf {
        write_pem(dir, name, &self.cert_pem())
    }

    /// `(cert_pem, key_pem)` of a server certificate for `names`: DNS
    /// names, or IP addresses ("127.0.0.1", "::1"), which become IP SANs.
    pub fn server_cert(&self, names: &[&str]) -> (String, String) {
        let cn = names.first().copied().unwrap_or("server");
        self.issue(names, cn, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// `(cert_pem, key_pem)` of a client certificate whose common name is
    /// `common_name`.
    pub fn client_cert(&self, common_name: &str) -> (String, String) {
        self.issue(&[], common_name, ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(&self, names: &[&str], cn: &str, usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        // `new` makes an IP SAN of every name that parses as an address.
        let mut params = CertificateParams::new(names).expect("valid subject alt names");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("generate a key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign the certificate");
        (cert.pem(), key.serialize_pem())
    }
}

/// Writes `{name}.crt` and `{name}.key` into `dir` from a `(cert_pem,
/// key_pem)` pair; returns `(cert_path, key_path)`.
pub fn write_pair(
    dir: &Path,
    name: &str,
    (cert_pem, key_pem): &(String, String),
) -> (PathBuf, PathBuf) {
    (
        write_pem(dir, &format!("{name}.crt"), cert_pem),
        write_pem(dir, &format!("{name}.key"), key_pem),
    )
}

/// Writes `pem` to `dir/{name}`; returns the path.
pub fn write_pem(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}
