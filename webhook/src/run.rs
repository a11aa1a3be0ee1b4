//! Starting the whole webhook: index watch, certificate watch, the TLS admission
//! server and the metrics server (and, with the API server as store, the crash
//! watcher), with shutdown.

use crate::crash::{AbortOnDrop, CrashWatcherOptions, run_crash_watcher};
use crate::index::{SharedIndex, watch_store};
use crate::kube_index::{KubeIndexOptions, watch_kube};
use crate::lease::LeaseConfig;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::review::Admission;
use crate::server::{metrics_router, router, serve_plain, serve_tls};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Where the webhook's index comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSource {
    /// The embedded store, a directory (watched, and polled as a backstop).
    Dir(PathBuf),
    /// The API server (`--store kube://`): reflectors on WorkloadProfiles,
    /// ProfileInstallations and Namespaces, with the client from the usual
    /// kubeconfig or in-cluster environment.
    Kube {
        /// The webhook's own namespace: the node installers'
        /// `ProfileInstallation`s and the crash watcher's Lease are there.
        installer_namespace: String,
        /// This replica's identity in the crash watcher's Lease (the pod name).
        replica: String,
    },
}

impl From<PathBuf> for StoreSource {
    /// A store directory (use [`StoreSource::Kube`] for the API server).
    fn from(dir: PathBuf) -> Self {
        StoreSource::Dir(dir)
    }
}

impl From<String> for StoreSource {
    /// A store directory (use [`StoreSource::Kube`] for the API server).
    fn from(dir: String) -> Self {
        StoreSource::Dir(dir.into())
    }
}

/// How to run the webhook.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Where profiles come from.
    pub store: StoreSource,
    /// Serving certificate (PEM chain).
    pub tls_cert: PathBuf,
    /// Serving key (PEM).
    pub tls_key: PathBuf,
    /// Only clients with a certificate from this CA may connect.
    pub client_ca: Option<PathBuf>,
    /// Admission (HTTPS) address.
    pub listen: SocketAddr,
    /// Metrics and probes (plain HTTP) address.
    pub metrics_listen: SocketAddr,
    /// The policy.
    pub policy: Policy,
    /// Per-request timeout.
    pub request_timeout: Duration,
    /// How long to wait for requests in flight at shutdown.
    pub drain: Duration,
    /// Certificate poll backstop.
    pub cert_poll: Duration,
    /// Store poll backstop (with the API server: how often installer heartbeats
    /// are re-checked).
    pub store_poll: Duration,
    /// Pod templates whose `/mutate` result is kept ([`crate::cache`]); 0 turns
    /// the cache off.
    pub decision_cache_entries: usize,
}

/// Why the webhook could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store cannot be opened.
    #[error(transparent)]
    Store(#[from] profile_store::StoreError),
    /// No Kubernetes client could be configured (`--store kube://`). The cause is
    /// in the message only: kube's own error already repeats its chain.
    #[error("cannot configure a Kubernetes client for --store kube:// (kubeconfig or in-cluster service account): {0}")]
    Kube(kube::Error),
    /// The certificate cannot be loaded.
    #[error(transparent)]
    Cert(#[from] certs::CertError),
    /// An address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
}

/// A running webhook.
#[derive(Debug)]
pub struct Running {
    /// The admission address actually bound.
    pub addr: SocketAddr,
    /// The metrics address actually bound.
    pub metrics_addr: SocketAddr,
    /// The shared admission state.
    pub admission: Arc<Admission>,
    shutdown: tokio::sync::watch::Sender<bool>,
    done: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops accepting, drains requests in flight, and returns when done.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.done.await;
    }

    /// Waits until the server stops by itself (it does not, short of shutdown).
    pub async fn wait(self) {
        let _ = self.done.await;
    }

    /// A sender that triggers shutdown (e.g. from a signal handler).
    pub fn shutdown_handle(&self) -> tokio::sync::watch::Sender<bool> {
        self.shutdown.clone()
    }
}

async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, StartError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

/// An opened index source, before its watch starts.
enum Source {
    Dir(profile_store::FsStore),
    // Boxed: built once, and much larger than the directory store.
    Kube(Box<KubeSource>),
}

/// What `--store kube://` runs besides the server.
struct KubeSource {
    client: kube::Client,
    live: crate::policy::LiveNamespaces,
    index: KubeIndexOptions,
    crash: CrashWatcherOptions,
}

/// Starts the webhook on the current tokio runtime.
pub async fn start(opts: ServeOptions) -> Result<Running, StartError> {
    let metrics = Metrics::default();
    let index = Arc::new(SharedIndex::default());
    let mut policy = opts.policy.clone();
    let source = match &opts.store {
        StoreSource::Dir(dir) => {
            let store = profile_store::FsStore::open(dir)?;
            // A first load before serving, so the webhook is ready at once when it can be.
            if let Err(e) = index.refresh(&store) {
                metrics.index_load_failures.inc();
                tracing::warn!(error = %e, "profile index not loaded yet; not ready until it is");
            }
            Source::Dir(store)
        }
        StoreSource::Kube {
            installer_namespace,
            replica,
        } => {
            let client = kube::Client::try_default().await.map_err(StartError::Kube)?;
            let live = crate::policy::LiveNamespaces::default();
            policy.live_namespaces = Some(live.clone());
            Source::Kube(Box::new(KubeSource {
                client,
                live,
                index: KubeIndexOptions::new(&policy, installer_namespace.clone(), opts.store_poll),
                crash: CrashWatcherOptions {
                    lease: LeaseConfig::crash_watcher(installer_namespace, replica),
                    metrics: metrics.clone(),
                },
            }))
        }
    };
    let resolver = certs::ReloadingResolver::new(&opts.tls_cert, &opts.tls_key, metrics.certs.clone())?;
    let tls = Arc::new(certs::tls::server_config(resolver.clone(), opts.client_ca.as_deref())?);
    let admission = Arc::new(Admission {
        policy,
        index: index.clone(),
        metrics: metrics.clone(),
        cache: crate::cache::DecisionCache::new(opts.decision_cache_entries),
    });
    let listener = bind(opts.listen).await?;
    let metrics_listener = bind(opts.metrics_listen).await?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: opts.listen,
        source,
    })?;
    let metrics_addr = metrics_listener.local_addr().map_err(|source| StartError::Bind {
        addr: opts.metrics_listen,
        source,
    })?;
    let (shutdown, mut rx) = tokio::sync::watch::channel(false);
    let app = router(admission.clone(), opts.request_timeout);
    let metrics_app = metrics_router(admission.clone());
    let mut metrics_rx = rx.clone();
    let (store_poll, cert_poll, drain) = (opts.store_poll, opts.cert_poll, opts.drain);
    let done = tokio::spawn(async move {
        // Held for their Drop: the watches stop with the server.
        let (_store_watch, _crash_watcher): (Box<dyn Send>, Option<AbortOnDrop>) = match source {
            Source::Dir(store) => (Box::new(watch_store(index, store, store_poll, metrics)), None),
            Source::Kube(kube) => {
                let KubeSource {
                    client,
                    live,
                    index: index_opts,
                    crash,
                } = *kube;
                // The crash watcher acts on the replica holding its Lease; the
                // others only keep their caches warm to take over.
                let crash_client = client.clone();
                let crash_watcher = tokio::spawn(async move {
                    if let Err(e) = run_crash_watcher(crash_client, crash).await {
                        tracing::error!(error = %e, "crash watcher stopped: seccomp crashes no longer put workloads into fallback");
                    }
                });
                let watch = watch_kube(client, index, live, index_opts, metrics);
                (Box::new(watch), Some(AbortOnDrop(crash_watcher)))
            }
        };
        let _cert_watch = resolver.watch(cert_poll);
        let metrics_server = tokio::spawn(serve_plain(metrics_listener, metrics_app, async move {
            let _ = metrics_rx.wait_for(|stop| *stop).await;
        }));
        serve_tls(
            listener,
            tls,
            app,
            async move {
                let _ = rx.wait_for(|stop| *stop).await;
            },
            drain,
        )
        .await;
        let _ = metrics_server.await;
    });
    tracing::info!(%addr, %metrics_addr, "tether webhook listening");
    Ok(Running {
        addr,
        metrics_addr,
        admission,
        shutdown,
        done,
    })
}
