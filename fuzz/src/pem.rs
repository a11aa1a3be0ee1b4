//! PEM bytes -> `certs::load::pair_from_pem` and `parse_certs`, as the webhook
//! loads (and hot-reloads) its serving pair.
//!
//! The input is the certificate file, a NUL byte, and the key file; without a NUL
//! both files are the whole input (a combined PEM).

use std::path::Path;

/// Loads the pair in `data`; a loaded pair must hold the bytes it was loaded from.
pub fn fuzz_one(data: &[u8]) {
    let (cert, key) = match data.iter().position(|b| *b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, data),
    };
    let (cert_path, key_path) = (Path::new("tls.crt"), Path::new("tls.key"));
    let _ = certs::load::parse_certs(cert_path, cert);
    if let Ok(pair) = certs::load::pair_from_pem(cert_path, cert, key_path, key) {
        assert_eq!(pair.cert_pem, cert);
        assert_eq!(pair.key_pem, key);
        assert!(!pair.certified.cert.is_empty(), "a loaded pair without a certificate");
    }
}
