//! `uplinkctl certs`: a CA and the certificates agents and operators present. The role is
//! a SAN URI `urn:uplink:role:<agent|operator|viewer>`.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use uplink_api::ROLE_URI_PREFIX;

pub enum Subject {
    Agent { name: String, sans: Vec<String> },
    Operator(String),
    Viewer(String),
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    std::io::Write::write_all(&mut f, text.as_bytes())?;
    Ok(())
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

/// Creates `dir/ca.crt` and `dir/ca.key`; refuses to overwrite an existing CA.
pub fn init(dir: &Path, days: i64) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    if crt.exists() || key.exists() {
        bail!(
            "{} already holds a CA (ca.crt/ca.key); refusing to overwrite it",
            dir.display()
        );
    }
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "uplink CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, days);
    let kp = KeyPair::generate()?;
    let cert = params.self_signed(&kp)?;
    fs::write(&crt, cert.pem())?;
    write_private(&key, &kp.serialize_pem())?;
    println!("{}\n{}", crt.display(), key.display());
    Ok(())
}

/// Issues `dir/<name>.crt` and `.key` signed by `dir/ca.*`.
pub fn issue(dir: &Path, subject: Subject, days: i64) -> Result<()> {
    let ca_pem = fs::read_to_string(dir.join("ca.crt")).with_context(|| {
        format!(
            "no CA in {}: run `uplinkctl certs init --dir {}` first",
            dir.display(),
            dir.display()
        )
    })?;
    let ca_key = KeyPair::from_pem(
        &fs::read_to_string(dir.join("ca.key"))
            .with_context(|| format!("cannot read {}", dir.join("ca.key").display()))?,
    )?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .context("ca.crt is not a usable CA certificate")?;
    let (name, role, sans) = match subject {
        Subject::Agent { name, sans } => (name, "agent", sans),
        Subject::Operator(name) => (name, "operator", Vec::new()),
        Subject::Viewer(name) => (name, "viewer", Vec::new()),
    };
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        bail!("invalid name {name:?}: use letters, digits, '-', '_' or '.'");
    }
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, name.clone());
    params
        .subject_alt_names
        .push(SanType::URI(format!("{ROLE_URI_PREFIX}{role}").try_into()?));
    for san in &sans {
        params
            .subject_alt_names
            .push(match san.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    san.clone()
                        .try_into()
                        .with_context(|| format!("invalid --san {san:?}"))?,
                ),
            });
    }
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    // Agent certificates may also authenticate as clients, so that using one against an
    // agent is refused by the role check with a clear message rather than by the handshake.
    params.extended_key_usages = if role == "agent" {
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ]
    } else {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    };
    validity(&mut params, days);
    let kp = KeyPair::generate()?;
    let cert = params.signed_by(&kp, &issuer)?;
    let (crt, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    fs::write(&crt, cert.pem())?;
    write_private(&key, &kp.serialize_pem())?;
    println!("{}\n{}", crt.display(), key.display());
    Ok(())
}
