//! Certificates for the tether webhook.
//!
//! The API server only talks HTTPS to admission webhooks and checks the serving
//! certificate against the webhook configuration's `caBundle`. This crate generates
//! a CA and serving certificate ([`generate`]), loads and checks PEM pairs
//! ([`load`]), serves them through a rustls resolver that reloads when the files
//! change — including kubelet's `..data` symlink swap — without dropping
//! connections ([`reload`]), builds the server TLS configuration with optional
//! client-certificate authentication ([`tls`]), and patches `caBundle` into webhook
//! configurations ([`inject`]).

pub mod generate;
pub mod inject;
pub mod load;
pub mod reload;
pub mod tls;

pub use generate::{Pki, Validity};
pub use load::{LoadedPair, load_pair};
pub use reload::{CertMetrics, ReloadingResolver};

/// Why a certificate operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file holds no usable PEM block of the expected kind.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong, e.g. "no CERTIFICATE block".
        reason: String,
    },
    /// The certificate does not belong to the private key.
    #[error("{cert} and {key} do not belong together: the certificate's public key is not the key's")]
    Mismatch {
        /// The certificate file.
        cert: std::path::PathBuf,
        /// The key file.
        key: std::path::PathBuf,
    },
    /// The certificate is outside its validity period.
    #[error("{path}: the certificate is {what} (valid {not_before} to {not_after}); issue a new one")]
    Validity {
        /// The certificate file.
        path: std::path::PathBuf,
        /// `expired` or `not yet valid`.
        what: &'static str,
        /// Start of validity (RFC 3339).
        not_before: String,
        /// End of validity (RFC 3339).
        not_after: String,
    },
    /// Files exist where `certs init` would write, and `--force` was not given.
    #[error("{0} already exists; pass --force to overwrite it")]
    Exists(std::path::PathBuf),
    /// Generating a certificate failed.
    #[error("generating the certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// Building the TLS configuration failed.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// Talking to the Kubernetes API failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Neither webhook configuration exists.
    #[error(
        "no MutatingWebhookConfiguration or ValidatingWebhookConfiguration named {0}; apply the webhook manifests first (kubectl get mutatingwebhookconfigurations,validatingwebhookconfigurations)"
    )]
    NoWebhook(String),
}
