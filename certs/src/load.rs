//! Loading a certificate chain and private key from PEM files, and checking that
//! they can serve: they parse, belong together, and are within their validity.

use crate::CertError;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A checked certificate/key pair, ready for rustls.
#[derive(Debug, Clone)]
pub struct LoadedPair {
    /// The chain and signing key.
    pub certified: Arc<CertifiedKey>,
    /// End of the leaf certificate's validity.
    pub not_after: SystemTime,
    /// The raw file contents, to tell whether the files changed.
    pub cert_pem: Vec<u8>,
    /// The raw key file contents.
    pub key_pem: Vec<u8>,
}

/// The crypto provider tether uses everywhere (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|source| CertError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn pem_err(path: &Path, reason: impl Into<String>) -> CertError {
    CertError::Pem {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Parses the certificates of a PEM file (a chain, leaf first).
pub fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, format!("unreadable PEM: {e}")))?;
    if certs.is_empty() {
        return Err(pem_err(path, "no CERTIFICATE block: expected a PEM certificate"));
    }
    Ok(certs)
}

fn rfc3339(t: i64) -> String {
    x509_parser::time::ASN1Time::from_timestamp(t)
        .map(|a| a.to_string())
        .unwrap_or_else(|_| t.to_string())
}

/// The validity window of a DER certificate, checked against `now`.
fn check_validity(path: &Path, der: &[u8], now: SystemTime) -> Result<SystemTime, CertError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| pem_err(path, format!("the certificate does not parse: {e}")))?;
    let v = cert.validity();
    let (nb, na) = (v.not_before.timestamp(), v.not_after.timestamp());
    let now_s = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let what = if now_s > na {
        Some("expired")
    } else if now_s < nb {
        Some("not yet valid")
    } else {
        None
    };
    if let Some(what) = what {
        return Err(CertError::Validity {
            path: path.to_path_buf(),
            what,
            not_before: rfc3339(nb),
            not_after: rfc3339(na),
        });
    }
    Ok(UNIX_EPOCH + Duration::from_secs(na.max(0) as u64))
}

/// Loads and checks the pair at `cert_path` / `key_path`.
///
/// Fails, naming the file, when either does not parse, when the key is not the
/// certificate's, or when the leaf certificate is expired or not yet valid.
pub fn load_pair(cert_path: &Path, key_path: &Path) -> Result<LoadedPair, CertError> {
    let cert_pem = read(cert_path)?;
    let key_pem = read(key_path)?;
    pair_from_pem(cert_path, &cert_pem, key_path, &key_pem)
}

/// [`load_pair`] over bytes already read; the paths only name them in errors.
pub fn pair_from_pem(
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
) -> Result<LoadedPair, CertError> {
    let chain = parse_certs(cert_path, cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| pem_err(key_path, format!("no usable PRIVATE KEY block: {e}")))?;
    let not_after = check_validity(cert_path, &chain[0], SystemTime::now())?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| pem_err(key_path, format!("unsupported private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|_| CertError::Mismatch {
        cert: cert_path.to_path_buf(),
        key: key_path.to_path_buf(),
    })?;
    Ok(LoadedPair {
        certified: Arc::new(certified),
        not_after,
        cert_pem: cert_pem.to_vec(),
        key_pem: key_pem.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::{Usage, Validity, for_service, issue, new_ca};

    fn write(dir: &Path, cert: &str, key: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let (c, k) = (dir.join("tls.crt"), dir.join("tls.key"));
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key).unwrap();
        (c, k)
    }

    #[test]
    fn a_generated_pair_loads() {
        let dir = tempfile::tempdir().unwrap();
        let pki = for_service("s", "n", &[], 10).unwrap();
        let (c, k) = write(dir.path(), &pki.cert, &pki.key);
        let pair = load_pair(&c, &k).unwrap();
        let left = pair.not_after.duration_since(SystemTime::now()).unwrap().as_secs();
        assert!((9 * 86_400..=10 * 86_400).contains(&left), "{left}");
    }

    #[test]
    fn bad_pairs_are_refused_with_a_reason_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = for_service("s", "n", &[], 10).unwrap();
        let b = for_service("s", "n", &[], 10).unwrap();
        let (c, k) = write(dir.path(), &a.cert, &b.key);
        assert!(matches!(load_pair(&c, &k), Err(CertError::Mismatch { .. })));

        let past = Validity {
            not_before: SystemTime::now() - Duration::from_secs(10 * 86_400),
            not_after: SystemTime::now() - Duration::from_secs(86_400),
        };
        let (ca, ca_key) = new_ca("old", past).unwrap();
        let (cert, key) = issue(&ca, &ca_key, &["s".into()], Usage::Server, past).unwrap();
        let (c, k) = write(dir.path(), &cert, &key);
        let err = load_pair(&c, &k).unwrap_err().to_string();
        assert!(err.contains("expired") && err.contains("tls.crt"), "{err}");

        let truncated = &a.cert[..a.cert.len() / 2];
        let (c, k) = write(dir.path(), truncated, &a.key);
        let err = load_pair(&c, &k).unwrap_err().to_string();
        assert!(err.contains("tls.crt"), "{err}");

        let (c, k) = write(dir.path(), "garbage\n", &a.key);
        let err = load_pair(&c, &k).unwrap_err().to_string();
        assert!(err.contains("no CERTIFICATE block"), "{err}");

        let (c, k) = write(
            dir.path(),
            &a.cert,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        );
        let err = load_pair(&c, &k).unwrap_err().to_string();
        assert!(err.contains("tls.key"), "{err}");

        let missing = load_pair(&dir.path().join("nope.crt"), &k).unwrap_err().to_string();
        assert!(missing.contains("nope.crt"), "{missing}");
    }
}
