//! Certificates for the tether webhook.
//!
//! Empty until the certificates issue: CA and serving certificate generation (rcgen),
//! PEM loading, and a hot-reloading rustls certificate resolver.
