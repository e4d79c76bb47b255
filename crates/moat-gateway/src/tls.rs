//! TLS interception: a certificate authority per sandbox (its key never
//! leaves the host), leaf certificates made on demand for the names a
//! sandbox connects to and cached, and the upstream side, which verifies
//! servers against the host's trust store plus extra CAs the daemon names.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate: {0}")]
    Cert(String),
    #[error("cannot read {path}: {err}")]
    Read { path: String, err: std::io::Error },
}

fn cert_err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Cert(e.to_string())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A sandbox's CA, as PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaPem {
    pub cert: String,
    pub key: String,
}

/// Make a new CA for the sandbox `name`.
pub fn new_ca(name: &str) -> Result<CaPem, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.distinguished_name.push(
        DnType::CommonName,
        format!("moat sandbox proxy CA ({name})"),
    );
    params
        .distinguished_name
        .push(DnType::OrganizationName, "moat");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let key = KeyPair::generate().map_err(cert_err)?;
    let cert = params.self_signed(&key).map_err(cert_err)?;
    Ok(CaPem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// Leaf certificates signed by one sandbox's CA, made on demand, cached by name.
pub struct Leaves {
    ca_cert: rcgen::Certificate,
    ca_key: KeyPair,
    cache: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl std::fmt::Debug for Leaves {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Leaves")
    }
}

impl Leaves {
    pub fn new(ca: &CaPem) -> Result<Leaves, TlsError> {
        let ca_key = KeyPair::from_pem(&ca.key).map_err(cert_err)?;
        let params = CertificateParams::from_ca_cert_pem(&ca.cert).map_err(cert_err)?;
        // Re-signing the same parameters with the same key gives the issuer
        // rcgen needs; leaves name the same subject and key as the installed CA.
        let ca_cert = params.self_signed(&ca_key).map_err(cert_err)?;
        Ok(Leaves {
            ca_cert,
            ca_key,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The certificate for `name` (a DNS name or an address).
    pub fn leaf(&self, name: &str) -> Result<Arc<CertifiedKey>, TlsError> {
        if let Some(hit) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            return Ok(Arc::clone(hit));
        }
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
        params.subject_alt_names = vec![match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(name.to_string().try_into().map_err(cert_err)?),
        }];
        params.distinguished_name.push(DnType::CommonName, name);
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2036, 1, 1);
        let key = KeyPair::generate().map_err(cert_err)?;
        let cert = params
            .signed_by(&key, &self.ca_cert, &self.ca_key)
            .map_err(cert_err)?;
        let der_key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = rustls::crypto::ring::sign::any_supported_type(&der_key).map_err(cert_err)?;
        let certified = Arc::new(CertifiedKey::new(
            vec![CertificateDer::from(cert.der().to_vec())],
            signing,
        ));
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), Arc::clone(&certified));
        Ok(certified)
    }
}

/// Picks the leaf by the SNI the client sent; without SNI, the CONNECT target.
#[derive(Debug)]
struct Resolver {
    leaves: Arc<Leaves>,
    fallback: String,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name().unwrap_or(&self.fallback);
        self.leaves.leaf(name).ok()
    }
}

/// The server side of an intercepted connection to `target`.
pub fn server_config(
    leaves: &Arc<Leaves>,
    target: &str,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(cert_err)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Resolver {
            leaves: Arc::clone(leaves),
            fallback: target.to_string(),
        }));
    // HTTP/2 where the client offers it, HTTP/1.1 otherwise.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The client side towards real servers: the host's trust store plus `extra_pem` files.
pub fn client_config(extra_pem: &[&Path]) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    for path in extra_pem {
        let text = std::fs::read(path).map_err(|err| TlsError::Read {
            path: path.display().to_string(),
            err,
        })?;
        for cert in rustls_pemfile::certs(&mut text.as_slice()).flatten() {
            roots.add(cert).map_err(cert_err)?;
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(cert_err)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_chain_to_the_sandbox_ca_and_are_cached() {
        use rustls::client::danger::ServerCertVerifier;
        let ca = new_ca("demo").unwrap();
        assert!(ca.cert.starts_with("-----BEGIN CERTIFICATE-----"));
        let leaves = Leaves::new(&ca).unwrap();
        let a = leaves.leaf("api.example.com").unwrap();
        let b = leaves.leaf("api.example.com").unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert!(leaves.leaf("10.1.2.3").is_ok());
        // A client that trusts only the sandbox's CA accepts the leaf.
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut ca.cert.as_bytes()).flatten() {
            roots.add(c).unwrap();
        }
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .unwrap();
        let name = rustls::pki_types::ServerName::try_from("api.example.com").unwrap();
        let now = rustls::pki_types::UnixTime::now();
        assert!(verifier
            .verify_server_cert(&a.cert[0], &[], &name, &[], now)
            .is_ok());
        let other = rustls::pki_types::ServerName::try_from("evil.example").unwrap();
        assert!(verifier
            .verify_server_cert(&a.cert[0], &[], &other, &[], now)
            .is_err());
    }
}
