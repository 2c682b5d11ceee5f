//! mTLS for the gRPC port: client certificates are required and verified against the
//! configured CA. The server's certificate and key, and the CA bundle, are re-read when
//! their files change, so a rotation or a CA rollover (cert-manager) reaches new
//! connections without a restart.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

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

/// The client verifier, rebuilt from the CA file when it changes on disk. A file that
/// does not load (half written, not PEM) keeps the previous CA until it does.
#[derive(Debug)]
struct ReloadingCa {
    ca: PathBuf,
    current: Mutex<(Option<SystemTime>, Arc<dyn ClientCertVerifier>)>,
}

impl ReloadingCa {
    fn load(ca: &Path) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in load_certs(ca)? {
            roots.add(c).map_err(|e| file_error(ca, e))?;
        }
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))
    }

    fn get(&self) -> Arc<dyn ClientCertVerifier> {
        let mut cur = match self.current.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mtime = Reloading::mtime(&self.ca);
        if mtime != cur.0 {
            match Self::load(&self.ca) {
                Ok(v) => {
                    tracing::info!(ca = %self.ca.display(), "reloaded the API client CA");
                    *cur = (mtime, v);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "API client CA changed but does not load; keeping the old one");
                    // Not again on every handshake: the next change of the file retries.
                    cur.0 = mtime;
                }
            }
        }
        cur.1.clone()
    }
}

impl ClientCertVerifier for ReloadingCa {
    /// No CA names are sent: they live behind the lock and may change between handshakes.
    /// Clients present their one certificate regardless.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.get()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.get().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.get().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.get().supported_verify_schemes()
    }
}

/// rustls server config: TLS 1.2/1.3, h2, client certificates required.
pub fn server_config(api: &ApiConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let verifier = ReloadingCa {
        ca: api.ca.clone(),
        current: Mutex::new((Reloading::mtime(&api.ca), ReloadingCa::load(&api.ca)?)),
    };
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
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(resolver));
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}
