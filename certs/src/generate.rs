//! Generating an ECDSA P-256 CA and certificates it signs (rcgen), and writing them
//! as a Kubernetes TLS Secret's files.

use crate::CertError;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256,
};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use time::OffsetDateTime;

/// The validity window of a certificate.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Start.
    pub not_before: SystemTime,
    /// End.
    pub not_after: SystemTime,
}

impl Validity {
    /// From an hour ago (clock skew between nodes) to `days` from now.
    pub fn days(days: u32) -> Validity {
        let now = SystemTime::now();
        Validity {
            not_before: now - Duration::from_secs(3600),
            not_after: now + Duration::from_secs(u64::from(days) * 86_400),
        }
    }

    fn apply(&self, params: &mut CertificateParams) {
        params.not_before = OffsetDateTime::from(self.not_before);
        params.not_after = OffsetDateTime::from(self.not_after);
    }
}

/// A CA and a certificate it signed, as PEM.
#[derive(Debug, Clone)]
pub struct Pki {
    /// The CA certificate (`ca.crt`).
    pub ca_cert: String,
    /// The CA's private key (`ca.key`).
    pub ca_key: String,
    /// The leaf certificate (`tls.crt`).
    pub cert: String,
    /// The leaf's private key (`tls.key`).
    pub key: String,
}

/// The DNS names a webhook Service is reached by.
pub fn service_sans(service: &str, namespace: &str, extra: &[String]) -> Vec<String> {
    let mut sans = vec![
        service.to_string(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ];
    for name in extra {
        if !sans.contains(name) {
            sans.push(name.clone());
        }
    }
    sans
}

/// A new CA (`CN=<common_name>`) with its key.
pub fn new_ca(common_name: &str, validity: Validity) -> Result<(String, String), CertError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity.apply(&mut params);
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Which side of a TLS connection a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// A server certificate for the given names.
    Server,
    /// A client certificate (for mTLS), named by its common name.
    Client,
}

/// A certificate signed by the CA (`ca_cert`, `ca_key` as PEM): for `Server`, `names`
/// are its SANs, each an IP address SAN when it parses as one (a webhook registered
/// by `url: https://IP:PORT/...`) and a DNS SAN otherwise (the first is also the CN); for `Client`, `names[0]` is the CN.
/// Returns (certificate PEM, key PEM).
pub fn issue(
    ca_cert: &str,
    ca_key: &str,
    names: &[String],
    usage: Usage,
    validity: Validity,
) -> Result<(String, String), CertError> {
    let ca_key = KeyPair::from_pem(ca_key)?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert, ca_key)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = match usage {
        Usage::Server => CertificateParams::new(names.to_vec())?,
        Usage::Client => CertificateParams::default(),
    };
    if let Some(cn) = names.first() {
        params.distinguished_name.push(DnType::CommonName, cn.as_str());
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![match usage {
        Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
        Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
    }];
    params.use_authority_key_identifier_extension = true;
    validity.apply(&mut params);
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A CA and a serving certificate for the Service `service` in `namespace`, with the
/// SANs of [`service_sans`] (`extra_sans` may hold IP addresses: see [`issue`]).
pub fn for_service(service: &str, namespace: &str, extra_sans: &[String], days: u32) -> Result<Pki, CertError> {
    let validity = Validity::days(days);
    let (ca_cert, ca_key) = new_ca(&format!("tether webhook CA ({namespace}/{service})"), validity)?;
    let (cert, key) = issue(
        &ca_cert,
        &ca_key,
        &service_sans(service, namespace, extra_sans),
        Usage::Server,
        validity,
    )?;
    Ok(Pki {
        ca_cert,
        ca_key,
        cert,
        key,
    })
}

impl Pki {
    /// Writes `ca.crt`, `ca.key`, `tls.crt`, `tls.key` into `dir` (created when
    /// absent), keys with mode 0600. Without `force`, refuses when any of them
    /// exists, before writing anything.
    pub fn write(&self, dir: &Path, force: bool) -> Result<Vec<PathBuf>, CertError> {
        let files = [
            ("ca.crt", &self.ca_cert, 0o644),
            ("ca.key", &self.ca_key, 0o600),
            ("tls.crt", &self.cert, 0o644),
            ("tls.key", &self.key, 0o600),
        ];
        let existing = files.iter().map(|(n, _, _)| dir.join(n)).find(|p| p.exists());
        if let Some(existing) = existing.filter(|_| !force) {
            return Err(CertError::Exists(existing));
        }
        std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut written = Vec::new();
        for (name, pem, mode) in files {
            let path = dir.join(name);
            let io = |source| CertError::Io {
                path: path.clone(),
                source,
            };
            // Remove first: `mode` applies only to files created by this open.
            if force && path.exists() {
                std::fs::remove_file(&path).map_err(io)?;
            }
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&path)
                .map_err(io)?;
            f.write_all(pem.as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
            written.push(path);
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use x509_parser::prelude::*;

    fn parse(pem: &str) -> Vec<u8> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        p.contents
    }

    #[test]
    fn service_certificate_has_every_service_name_and_chains_to_the_ca() {
        let pki = for_service("tether-webhook", "tether-system", &["tether.example.com".into()], 30).unwrap();
        let der = parse(&pki.cert);
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let sans: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        for want in [
            "tether-webhook",
            "tether-webhook.tether-system",
            "tether-webhook.tether-system.svc",
            "tether-webhook.tether-system.svc.cluster.local",
            "tether.example.com",
        ] {
            assert!(sans.contains(&format!("DNSName({want})")), "{want} not in {sans:?}");
        }
        let ca_der = parse(&pki.ca_cert);
        let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
        assert!(ca.is_ca());
        assert!(!cert.is_ca());
        assert_eq!(cert.issuer(), ca.subject());
        cert.verify_signature(Some(ca.public_key())).unwrap();
        let days = (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp()) / 86_400;
        assert_eq!(days, 30);
    }

    #[test]
    fn an_extra_san_that_is_an_ip_address_becomes_an_ip_san() {
        let pki = for_service(
            "tether-webhook",
            "tether-system",
            &["192.168.49.1".into(), "fd00::1".into(), "host.example".into()],
            1,
        )
        .unwrap();
        let der = parse(&pki.cert);
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let names = &cert.subject_alternative_name().unwrap().unwrap().value.general_names;
        let ips: Vec<&[u8]> = names
            .iter()
            .filter_map(|n| match n {
                GeneralName::IPAddress(ip) => Some(*ip),
                _ => None,
            })
            .collect();
        let v6: std::net::Ipv6Addr = "fd00::1".parse().unwrap();
        assert_eq!(ips, [&[192u8, 168, 49, 1][..], &v6.octets()[..]]);
        assert!(names.iter().any(|n| matches!(n, GeneralName::DNSName("host.example"))));
        assert!(
            !names.iter().any(|n| matches!(n, GeneralName::DNSName("192.168.49.1"))),
            "an IP must not be a DNS name: {names:?}"
        );
    }

    #[test]
    fn write_uses_secret_file_names_private_modes_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let pki = for_service("s", "n", &[], 1).unwrap();
        let written = pki.write(dir.path(), false).unwrap();
        assert_eq!(written.len(), 4);
        for (name, mode) in [
            ("ca.crt", 0o644),
            ("ca.key", 0o600),
            ("tls.crt", 0o644),
            ("tls.key", 0o600),
        ] {
            let meta = std::fs::metadata(dir.path().join(name)).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, mode, "{name}");
        }
        let before = std::fs::read(dir.path().join("tls.crt")).unwrap();
        let again = for_service("s", "n", &[], 1).unwrap();
        let err = again.write(dir.path(), false).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(std::fs::read(dir.path().join("tls.crt")).unwrap(), before);
        again.write(dir.path(), true).unwrap();
        assert_ne!(std::fs::read(dir.path().join("tls.crt")).unwrap(), before);
        let meta = std::fs::metadata(dir.path().join("tls.key")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }
}
