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

/// A value loaded from files and loaded again, at the next handshake, when any of their
/// modification times changes. A change that does not load (a half-written cert/key pair,
/// a broken PEM file) keeps the previous value, and the handshake after tries again.
struct Watched<T> {
    what: &'static str,
    files: Vec<PathBuf>,
    load: Box<dyn Fn() -> Result<T, TlsError> + Send + Sync>,
    current: Mutex<(Vec<Option<SystemTime>>, T)>,
}

impl<T: Clone> Watched<T> {
    /// Loads now: a value that does not load at start is an error, not a fallback.
    fn new(
        what: &'static str,
        files: Vec<PathBuf>,
        load: impl Fn() -> Result<T, TlsError> + Send + Sync + 'static,
    ) -> Result<Watched<T>, TlsError> {
        let first = load()?;
        let stamps = Self::stamps(&files);
        Ok(Watched {
            what,
            files,
            load: Box::new(load),
            current: Mutex::new((stamps, first)),
        })
    }

    fn stamps(files: &[PathBuf]) -> Vec<Option<SystemTime>> {
        files
            .iter()
            .map(|p| fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    }

    fn get(&self) -> T {
        let mut cur = match self.current.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        let stamps = Self::stamps(&self.files);
        if stamps != cur.0 {
            match (self.load)() {
                Ok(v) => {
                    tracing::info!(file = %self.files[0].display(), "reloaded the {}", self.what);
                    *cur = (stamps, v);
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    "{} changed but does not load; keeping the old one",
                    self.what
                ),
            }
        }
        cur.1.clone()
    }
}

impl<T> std::fmt::Debug for Watched<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched")
            .field("what", &self.what)
            .field("files", &self.files)
            .finish()
    }
}

/// The server's certificate and key, reloaded when either file changes.
fn certified_key(
    what: &'static str,
    cert: &Path,
    key: &Path,
) -> Result<Watched<Arc<CertifiedKey>>, TlsError> {
    let (c, k) = (cert.to_owned(), key.to_owned());
    Watched::new(what, vec![c.clone(), k.clone()], move || {
        let ck = CertifiedKey::from_der(load_certs(&c)?, load_key(&k)?, &provider())
            .map_err(|e| file_error(&k, format!("does not match {}: {e}", c.display())))?;
        Ok(Arc::new(ck))
    })
}

impl ResolvesServerCert for Watched<Arc<CertifiedKey>> {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// A server config without client authentication (for `/metrics` over HTTPS); the
/// certificate is reloaded on change like the API's.
pub fn plain_server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(certified_key("metrics certificate", cert, key)?));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The client verifier over the CA file's certificates, rebuilt when the file changes.
fn client_verifier(ca: &Path) -> Result<Watched<Arc<dyn ClientCertVerifier>>, TlsError> {
    let ca = ca.to_owned();
    Watched::new("API client CA", vec![ca.clone()], move || {
        let mut roots = RootCertStore::empty();
        for c in load_certs(&ca)? {
            roots.add(c).map_err(|e| file_error(&ca, e))?;
        }
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))
    })
}

impl ClientCertVerifier for Watched<Arc<dyn ClientCertVerifier>> {
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
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(client_verifier(&api.ca)?))
        .with_cert_resolver(Arc::new(certified_key(
            "API certificate",
            &api.cert,
            &api.key,
        )?));
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    // No resumption: a resumed session skips the client certificate check, so a client
    // whose CA was rolled out of api.ca could come back on an old ticket or session id.
    // Every connection does a full handshake against the CAs loaded now.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    cfg.ticketer = Arc::new(NoTickets);
    Ok(Arc::new(cfg))
}

/// A ticketer that never issues tickets (TLS 1.2 session tickets off).
#[derive(Debug)]
struct NoTickets;

impl rustls::server::ProducesTickets for NoTickets {
    fn enabled(&self) -> bool {
        false
    }

    fn lifetime(&self) -> u32 {
        0
    }

    fn encrypt(&self, _plain: &[u8]) -> Option<Vec<u8>> {
        None
    }

    fn decrypt(&self, _cipher: &[u8]) -> Option<Vec<u8>> {
        None
    }
}
