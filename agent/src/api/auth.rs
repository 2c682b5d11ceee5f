//! Roles come from the client certificate: a SAN URI `urn:uplink:role:<role>`.

use rustls::pki_types::CertificateDer;
use uplink_api::ROLE_URI_PREFIX;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Viewer,
    Operator,
    /// An agent's own certificate: it serves, it is never a client.
    Agent,
}

/// The role in a verified client certificate, or why there is none.
pub fn role_of(cert: &CertificateDer<'_>) -> Result<(Role, String), String> {
    let (_, x) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| format!("unreadable client certificate: {e}"))?;
    let subject = x
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or("")
        .to_string();
    let san = x
        .subject_alternative_name()
        .map_err(|e| format!("bad SAN: {e}"))?;
    let mut roles = Vec::new();
    for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
        if let GeneralName::URI(uri) = name
            && let Some(role) = uri.strip_prefix(ROLE_URI_PREFIX)
        {
            roles.push(match role {
                "viewer" => Role::Viewer,
                "operator" => Role::Operator,
                "agent" => Role::Agent,
                other => return Err(format!("unknown role {other:?} in the client certificate")),
            });
        }
    }
    match roles.as_slice() {
        [r] => Ok((*r, subject)),
        [] => Err(format!(
            "the client certificate carries no role (a SAN URI {ROLE_URI_PREFIX}viewer or {ROLE_URI_PREFIX}operator)"
        )),
        _ => Err("the client certificate carries more than one role".into()),
    }
}
