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

/// Certificates are valid for 1 day at least and 100 years at most.
pub const MAX_DAYS: i64 = 36_500;

/// Writes `text` to `path` with `mode`. Never follows a symlink; an existing file is
/// refused unless `force`, and then replaced with a new file (so a key is 0600 even when
/// the file it replaces was not).
fn write_file(path: &Path, text: &str, mode: u32, force: bool) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            bail!(
                "{} is a symbolic link; refusing to write through it",
                path.display()
            )
        }
        Ok(_) if !force => bail!(
            "{} already exists; refusing to overwrite it (--force replaces it)",
            path.display()
        ),
        Ok(_) => {
            fs::remove_file(path).with_context(|| format!("cannot replace {}", path.display()))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot check {}", path.display())),
    }
    // create_new + O_NOFOLLOW: a file or link that appeared since the check is not used.
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    std::io::Write::write_all(&mut f, text.as_bytes())?;
    Ok(())
}

fn check_days(days: i64) -> Result<()> {
    if !(1..=MAX_DAYS).contains(&days) {
        bail!("--days {days}: must be between 1 and {MAX_DAYS}");
    }
    Ok(())
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

/// Creates `dir/ca.crt` and `dir/ca.key`; refuses to overwrite an existing CA.
pub fn init(dir: &Path, days: i64) -> Result<()> {
    check_days(days)?;
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
    write_file(&key, &kp.serialize_pem(), 0o600, false)?;
    write_file(&crt, &cert.pem(), 0o644, false)?;
    println!("{}\n{}", crt.display(), key.display());
    Ok(())
}

/// Issues `dir/<name>.crt` and `.key` signed by `dir/ca.*`.
/// Refuses to overwrite existing files unless `force`; the CA's own files never.
pub fn issue(dir: &Path, subject: Subject, days: i64, force: bool) -> Result<()> {
    check_days(days)?;
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
    if name == "ca" {
        bail!("invalid name \"ca\": ca.crt and ca.key are the CA's own files; pick another name");
    }
    if name.starts_with('.') {
        bail!("invalid name {name:?}: must not start with '.'");
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
    // Both are checked before either is written, so a refusal leaves nothing half-done.
    if !force {
        for p in [&crt, &key] {
            if fs::symlink_metadata(p).is_ok() {
                bail!(
                    "{} already exists; refusing to overwrite it (--force replaces it)",
                    p.display()
                );
            }
        }
    }
    write_file(&key, &kp.serialize_pem(), 0o600, force)?;
    write_file(&crt, &cert.pem(), 0o644, force)?;
    println!("{}\n{}", crt.display(), key.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("uplinkctl-certs-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn issue_never_overwrites_the_ca_or_an_existing_pair_without_force() {
        let d = dir("ow");
        init(&d, 30).unwrap();
        let ca = fs::read(d.join("ca.crt")).unwrap();
        let e = issue(&d, Subject::Viewer("ca".into()), 30, true).unwrap_err();
        assert!(e.to_string().contains("CA's own files"), "{e}");
        assert_eq!(fs::read(d.join("ca.crt")).unwrap(), ca);
        issue(&d, Subject::Viewer("v".into()), 30, false).unwrap();
        let first = fs::read(d.join("v.crt")).unwrap();
        let e = issue(&d, Subject::Viewer("v".into()), 30, false).unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        assert_eq!(fs::read(d.join("v.crt")).unwrap(), first);
        // A key file that exists with loose permissions is replaced by a 0600 one.
        fs::set_permissions(d.join("v.key"), fs::Permissions::from_mode(0o644)).unwrap();
        issue(&d, Subject::Viewer("v".into()), 30, true).unwrap();
        assert_ne!(fs::read(d.join("v.crt")).unwrap(), first);
        let mode = fs::metadata(d.join("v.key")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_symlink_where_a_key_goes_is_refused_and_days_are_bounded() {
        let d = dir("ln");
        init(&d, 30).unwrap();
        let target = d.join("elsewhere");
        fs::write(&target, "keep").unwrap();
        std::os::unix::fs::symlink(&target, d.join("op.key")).unwrap();
        let e = issue(&d, Subject::Operator("op".into()), 30, true).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert_eq!(fs::read_to_string(&target).unwrap(), "keep");
        for days in [0, -1, MAX_DAYS + 1] {
            let e = issue(&d, Subject::Viewer("x".into()), days, false).unwrap_err();
            assert!(e.to_string().contains("--days"), "{e}");
        }
        fs::remove_dir_all(&d).unwrap();
    }
}
