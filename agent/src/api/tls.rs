//! mTLS for the gRPC port: client certificates are required and verified against the
//! configured CA; the server's certificate and key are re-read when their files change,
//! so a rotation (cert-manager) reaches new connections without a restart.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;

use crate::config::ApiConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(String),
}

fn file_error(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no PEM certificate in file"));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| file_error(path, format!("no usable PEM private key: {e}")))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server certificate, reloaded when the cert or key file changes on disk.
#[derive(Debug)]
struct Reloading {
    cert: PathBuf,
    key: PathBuf,
    current: Mutex<(Option<SystemTime>, Option<SystemTime>, Arc<CertifiedKey>)>,
}

impl Reloading {
    fn load(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
        let chain = load_certs(cert)?;
        let key_der = load_key(key)?;
        let ck = CertifiedKey::from_der(chain, key_der, &provider())
            .map_err(|e| file_error(key, format!("does not match {}: {e}", cert.display())))?;
        Ok(Arc::new(ck))
    }

    fn mtime(p: &Path) -> Option<SystemTime> {
        fs::metadata(p).and_then(|m| m.modified()).ok()
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut cur = self.current.lock().ok()?;
        let (c, k) = (Self::mtime(&self.cert), Self::mtime(&self.key));
        if (c, k) != (cur.0, cur.1) {
            // A half-written pair (cert updated, key not yet) fails to load: keep the old
            // one and try again on the next handshake.
            match Self::load(&self.cert, &self.key) {
                Ok(ck) => {
                    tracing::info!(cert = %self.cert.display(), "reloaded the API certificate");
                    *cur = (c, k, ck);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "API certificate changed but does not load yet; keeping the old one")
                }
            }
        }
        Some(cur.2.clone())
    }
}

/// A server config without client authentication (for `/metrics` over HTTPS); the
/// certificate is reloaded on change like the API's.
pub fn plain_server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let first = Reloading::load(cert, key)?;
    let resolver = Reloading {
        cert: cert.to_owned(),
        key: key.to_owned(),
        current: Mutex::new((Reloading::mtime(cert), Reloading::mtime(key), first)),
    };
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// rustls server config: TLS 1.2/1.3, h2, client certificates required.
pub fn server_config(api: &ApiConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(&api.ca)? {
        roots.add(c).map_err(|e| file_error(&api.ca, e))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let first = Reloading::load(&api.cert, &api.key)?;
    let resolver = Reloading {
        cert: api.cert.clone(),
        key: api.key.clone(),
        current: Mutex::new((
            Reloading::mtime(&api.cert),
            Reloading::mtime(&api.key),
            first,
        )),
    };
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(resolver));
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}
