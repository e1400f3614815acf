//! The fleet's certificate authority: one self-signed CA that signs agent and replica
//! certificates.
//!
//! Every QUIC connection in Spillway is mutual TLS against this CA: replicas (and later the
//! hub) accept only clients whose certificate it signed, and agents accept only servers it
//! signed. The CA lives in a folder as `ca.pem` + `ca.key`; issued certificates are written
//! as `NAME.pem` + `NAME.key`. Private keys are created with mode 0600 and never overwritten.
//! The current time is passed in.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

/// File name of the CA certificate.
pub const CA_CERT: &str = "ca.pem";
/// File name of the CA private key.
pub const CA_KEY: &str = "ca.key";

/// How long the CA is valid.
const CA_VALIDITY_DAYS: i64 = 3650;
/// How long an issued certificate is valid.
const LEAF_VALIDITY_DAYS: i64 = 397;

/// What an issued certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// An agent: a TLS client.
    Agent,
    /// A replica or the hub: a TLS server, known by the given host names.
    Server,
}

/// The paths of a certificate and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM private key (mode 0600).
    pub key: PathBuf,
}

/// Creates a new CA in `dir`; refuses to replace an existing one.
pub fn init(dir: &Path, name: &str, now: SystemTime) -> anyhow::Result<Issued> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let paths = Issued {
        cert: dir.join(CA_CERT),
        key: dir.join(CA_KEY),
    };
    if paths.cert.exists() || paths.key.exists() {
        bail!("a CA already exists in {}", dir.display());
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::from(now);
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
    let cert = params.self_signed(&key)?;
    write_new(&paths.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&paths.cert, cert.pem().as_bytes(), 0o644)?;
    Ok(paths)
}

/// Issues a certificate named `name` signed by the CA in `ca_dir`, written to `out_dir`.
///
/// Agents are named by their certificate's common name and a DNS name; servers get every
/// entry of `hosts` (DNS names or IP addresses) as subject alternative names.
pub fn issue(
    ca_dir: &Path,
    out_dir: &Path,
    name: &str,
    role: Role,
    hosts: &[String],
    now: SystemTime,
) -> anyhow::Result<Issued> {
    let (cert_pem, key_pem) = Signer::open(ca_dir)?.issue(name, role, hosts, now)?;
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let paths = Issued {
        cert: out_dir.join(format!("{name}.pem")),
        key: out_dir.join(format!("{name}.key")),
    };
    write_new(&paths.key, key_pem.as_bytes(), 0o600)?;
    write_new(&paths.cert, cert_pem.as_bytes(), 0o644)?;
    Ok(paths)
}

/// The CA loaded once, for issuing many certificates in memory (load generators, tests).
pub struct Signer {
    issuer: Issuer<'static, KeyPair>,
}

impl Signer {
    /// Loads the CA in `ca_dir`.
    pub fn open(ca_dir: &Path) -> anyhow::Result<Signer> {
        Ok(Signer {
            issuer: load_issuer(ca_dir)?,
        })
    }

    /// A new key and a certificate for it: `(certificate PEM, key PEM)`.
    pub fn issue(
        &self,
        name: &str,
        role: Role,
        hosts: &[String],
        now: SystemTime,
    ) -> anyhow::Result<(String, String)> {
        check_name(name)?;
        let params = leaf_params(name, role, hosts, now)?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// Signs an agent's certificate signing request (DER) for `name`: the certificate carries
/// the request's public key and nothing else from it — the name, usages and validity are the
/// CA's. Returns the certificate as PEM.
pub fn sign_agent_request(
    ca_dir: &Path,
    csr_der: &[u8],
    name: &str,
    now: SystemTime,
) -> anyhow::Result<String> {
    check_name(name)?;
    let issuer = load_issuer(ca_dir)?;
    let der = rustls_pki_types::CertificateSigningRequestDer::from(csr_der);
    let mut csr = rcgen::CertificateSigningRequestParams::from_der(&der)
        .context("the certificate request is not a valid, self-signed PKCS#10 request")?;
    csr.params = leaf_params(name, Role::Agent, &[], now)?;
    Ok(csr.signed_by(&issuer)?.pem())
}

/// Refuses names that would not make plain file and certificate names.
pub fn check_name(name: &str) -> anyhow::Result<()> {
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || name.len() > 64 || name.starts_with('.') || !name.chars().all(plain) {
        bail!("{name:?} is not a valid name: use 1–64 letters, digits, '-', '_' or '.'");
    }
    Ok(())
}

fn load_issuer(ca_dir: &Path) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let ca_pem = read(&ca_dir.join(CA_CERT))?;
    let ca_key = KeyPair::from_pem(&read(&ca_dir.join(CA_KEY))?).context("reading the CA key")?;
    Issuer::from_ca_cert_pem(&ca_pem, ca_key).context("reading the CA certificate")
}

/// What every certificate this CA issues to an agent or a server says.
fn leaf_params(
    name: &str,
    role: Role,
    hosts: &[String],
    now: SystemTime,
) -> anyhow::Result<CertificateParams> {
    let sans = match role {
        Role::Agent => vec![name.to_owned()],
        Role::Server if hosts.is_empty() => vec![name.to_owned()],
        Role::Server => hosts.to_vec(),
    };
    let mut params = CertificateParams::new(sans)
        .with_context(|| format!("{name:?} is not a valid DNS name or address"))?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![match role {
        Role::Agent => ExtendedKeyUsagePurpose::ClientAuth,
        Role::Server => ExtendedKeyUsagePurpose::ServerAuth,
    }];
    let now = OffsetDateTime::from(now);
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(LEAF_VALIDITY_DAYS);
    Ok(params)
}

/// The SHA-256 digest of the CA certificate in `ca_dir`, hex: the pin in enrolment tokens.
pub fn fingerprint(ca_dir: &Path) -> anyhow::Result<String> {
    let path = ca_dir.join(CA_CERT);
    let der = crate::tls::read_certs(&path)?
        .into_iter()
        .next()
        .with_context(|| format!("{} holds no certificate", path.display()))?;
    Ok(ring::digest::digest(&ring::digest::SHA256, der.as_ref())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The common name of a DER certificate (how the hub names the agent on a connection).
pub fn common_name(cert_der: &[u8]) -> anyhow::Result<String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) =
        X509Certificate::from_der(cert_der).map_err(|e| anyhow::anyhow!("bad certificate: {e}"))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .context("the certificate has no common name")?;
    Ok(cn
        .as_str()
        .context("the common name is not text")?
        .to_owned())
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Writes a file that must not exist yet, with `mode` from its creation on.
pub(crate) fn write_new(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_ca_issues_certificates_and_keeps_its_keys_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let ca = init(dir.path(), "test fleet", now).expect("init");
        let mode = std::fs::metadata(&ca.key)
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(
            init(dir.path(), "again", now).is_err(),
            "an existing CA is never replaced"
        );

        let agent = issue(dir.path(), dir.path(), "gw-1", Role::Agent, &[], now).expect("agent");
        let server = issue(
            dir.path(),
            dir.path(),
            "replica",
            Role::Server,
            &["localhost".into(), "127.0.0.1".into()],
            now,
        )
        .expect("server");
        for issued in [&agent, &server] {
            let pem = std::fs::read_to_string(&issued.cert).expect("cert");
            assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
            let mode = std::fs::metadata(&issued.key)
                .expect("key")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(
            issue(dir.path(), dir.path(), "gw-1", Role::Agent, &[], now).is_err(),
            "an issued key is never overwritten"
        );
        for bad in ["bad name!", "../escape", "", ".hidden"] {
            assert!(
                issue(dir.path(), dir.path(), bad, Role::Agent, &[], now).is_err(),
                "{bad:?}"
            );
        }
    }
}
