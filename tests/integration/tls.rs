//! A minimal HTTPS server over the certs crate's TLS configuration, and HTTPS
//! clients that trust only a given CA, for the certificate tests.

use std::net::SocketAddr;
use std::sync::Arc;

/// Serves "ok" on every path with HTTP/1.1 and HTTP/2 over `config` until dropped.
pub struct Server {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn serve(config: rustls::ServerConfig) -> Server {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from_static(b"ok"),
                    )))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Server { addr, task }
}

/// A rustls client configuration trusting only `ca_pem`, offering h2 and
/// http/1.1, optionally presenting a client certificate.
pub fn client_config(ca_pem: &str, identity: Option<(&str, &str)>) -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(certs::load::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                .map(Result::unwrap)
                .collect();
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config
}

/// An HTTPS client over `config`; `reuse` keeps connections alive between
/// requests, otherwise every request opens a new connection.
pub fn client(config: rustls::ClientConfig, reuse: bool) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .tls_info(true)
        .no_proxy();
    if !reuse {
        b = b.pool_max_idle_per_host(0);
    }
    b.build().unwrap()
}

/// The reloading resolver over `dir/tls.crt` and `dir/tls.key`, as the servers
/// under test load their serving pair.
pub fn resolver_in(dir: &std::path::Path) -> Arc<certs::ReloadingResolver> {
    certs::ReloadingResolver::new(
        &dir.join("tls.crt"),
        &dir.join("tls.key"),
        certs::CertMetrics::default(),
    )
    .unwrap()
}

/// `app` served by `webhook::server::serve_tls` (the webhook's own connection
/// handling) with the serving pair in `pki_dir`, on a free local port.
pub struct TlsApp {
    pub port: u16,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsApp {
    pub async fn start(pki_dir: &std::path::Path, app: axum::Router) -> TlsApp {
        let tls = certs::tls::server_config(resolver_in(pki_dir), None).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(webhook::server::serve_tls(
            listener,
            Arc::new(tls),
            app,
            async {
                let _ = stopped.await;
            },
            std::time::Duration::from_secs(2),
        ));
        TlsApp { port, stop, task }
    }

    /// Stops it and waits (10 s at most) for it to drain and end.
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(std::time::Duration::from_secs(10), self.task)
            .await
            .unwrap()
            .unwrap();
    }
}
