//! The server's TLS configuration: TLS 1.2 and 1.3 only, ALPN `h2` and `http/1.1`,
//! optional client-certificate authentication.

use crate::CertError;
use crate::load::{parse_certs, provider};
use rustls::server::{ResolvesServerCert, WebPkiClientVerifier};
use rustls::{RootCertStore, ServerConfig};
use std::path::Path;
use std::sync::Arc;

/// ALPN protocols the server offers, preferred first.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// A server configuration that takes its certificate from `resolver`. With
/// `client_ca`, only clients presenting a certificate issued by that CA can
/// complete the handshake.
pub fn server_config(
    resolver: Arc<dyn ResolvesServerCert>,
    client_ca: Option<&Path>,
) -> Result<ServerConfig, CertError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| CertError::Tls(e.to_string()))?;
    let builder = match client_ca {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|source| CertError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            let mut roots = RootCertStore::empty();
            for cert in parse_certs(path, &pem)? {
                roots.add(cert).map_err(|e| CertError::Pem {
                    path: path.to_path_buf(),
                    reason: format!("not a usable CA certificate: {e}"),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| CertError::Tls(format!("client CA {}: {e}", path.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}
