//! `tether serve`: the admission webhook.

use anyhow::{Context, Result};
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use webhook::policy::{Mode, OnMissing, Policy};
use webhook::run::{ServeOptions, StoreSource, start};

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// The profile store: a directory (the embedded store), or `kube://` for the
    /// WorkloadProfiles in the API server (kubeconfig or in-cluster service account).
    #[arg(long, env = "TETHER_STORE", value_name = "DIR|kube://")]
    store: String,
    /// With `--store kube://`: the namespace of the node installers'
    /// ProfileInstallations (the webhook's own namespace in the deployment).
    #[arg(long, env = "POD_NAMESPACE", default_value = "tether-system")]
    installer_namespace: String,
    /// With `--store kube://`: this replica's identity in the crash watcher's
    /// leader election (Lease `tether-crash-watcher` in the installer namespace);
    /// the deployment passes the pod name. Defaults to the host name, which is
    /// the pod name in a pod.
    #[arg(long, env = "POD_NAME", value_name = "NAME")]
    replica_name: Option<String>,
    /// Serving certificate (PEM; reloaded when it changes).
    #[arg(long, env = "TETHER_TLS_CERT", value_name = "FILE")]
    tls_cert: PathBuf,
    /// Serving key (PEM).
    #[arg(long, env = "TETHER_TLS_KEY", value_name = "FILE")]
    tls_key: PathBuf,
    /// Accept only clients presenting a certificate from this CA (mTLS with the API server).
    #[arg(long, env = "TETHER_CLIENT_CA", value_name = "FILE")]
    client_ca: Option<PathBuf>,
    /// Admission address (HTTPS).
    #[arg(long, env = "TETHER_LISTEN", default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// Metrics and probes address (plain HTTP).
    #[arg(long, env = "TETHER_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    metrics_listen: SocketAddr,
    /// Policy file (YAML): defaultMode, onMissing, exemptionNamespaces, namespaces.
    #[arg(long, env = "TETHER_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Mode of namespaces without a tether.dev/mode label (overrides the config):
    /// enforce, dry-run or off.
    #[arg(long, env = "TETHER_DEFAULT_MODE")]
    default_mode: Option<Mode>,
    /// What to do for containers without a profile (overrides the config): skip or
    /// runtime-default.
    #[arg(long, env = "TETHER_ON_MISSING")]
    on_missing: Option<OnMissing>,
    /// Per-request timeout, in milliseconds.
    #[arg(long, env = "TETHER_REQUEST_TIMEOUT_MS", default_value_t = 4000)]
    request_timeout_ms: u64,
    /// Time to drain requests in flight on SIGTERM, in seconds.
    #[arg(long, env = "TETHER_DRAIN_SECONDS", default_value_t = 20)]
    drain_seconds: u64,
    /// Poll backstop for certificate and store changes, in seconds (with
    /// `--store kube://`: how often installer heartbeats are re-checked).
    #[arg(long, env = "TETHER_POLL_SECONDS", default_value_t = 10)]
    poll_seconds: u64,
    /// Pod templates whose /mutate result is kept for the next pod with the same
    /// fields (a Deployment's replicas); 0 turns the cache off. The same answer
    /// either way; metrics tether_decision_cache_{hits,misses}.
    #[arg(long, env = "TETHER_DECISION_CACHE_ENTRIES", default_value_t = webhook::cache::DEFAULT_ENTRIES)]
    decision_cache_entries: usize,
}

/// The policy from `--config`, with the flags' overrides.
pub(crate) fn policy(config: Option<&PathBuf>, mode: Option<Mode>, on_missing: Option<OnMissing>) -> Result<Policy> {
    let mut policy = match config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            Policy::from_yaml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        None => Policy::default(),
    };
    if let Some(m) = mode {
        policy.default_mode = m;
    }
    if let Some(o) = on_missing {
        policy.on_missing = o;
    }
    Ok(policy)
}

/// `kube://` is the API server; anything else is a store directory. `replica`
/// is asked for only with `kube://` (the directory store has no crash watcher).
fn store_source(
    store: &str,
    installer_namespace: &str,
    replica: impl FnOnce() -> Result<String>,
) -> Result<StoreSource> {
    match store.strip_prefix("kube://") {
        Some("") => Ok(StoreSource::Kube {
            installer_namespace: installer_namespace.to_string(),
            replica: replica()?,
        }),
        Some(rest) => anyhow::bail!(
            "--store {store}: `tether serve` takes plain `kube://` (namespaces come from the WorkloadProfiles), not `{rest}`"
        ),
        None => Ok(StoreSource::Dir(PathBuf::from(store))),
    }
}

/// The host name (a pod's is its name), for a replica started without `POD_NAME`.
fn hostname() -> Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("reading the host name from /proc/sys/kernel/hostname for the crash watcher's Lease identity; pass --replica-name (or POD_NAME)")?;
    let name = name.trim();
    anyhow::ensure!(
        !name.is_empty(),
        "the host name is empty: pass --replica-name (or POD_NAME) as the crash watcher's Lease identity"
    );
    Ok(name.to_string())
}

pub(crate) fn run(args: ServeArgs) -> Result<()> {
    let policy = policy(args.config.as_ref(), args.default_mode, args.on_missing)?;
    let replica = || match args.replica_name.clone().filter(|n| !n.is_empty()) {
        Some(name) => Ok(name),
        None => hostname(),
    };
    let store = store_source(&args.store, &args.installer_namespace, replica)?;
    let poll = Duration::from_secs(args.poll_seconds.max(1));
    let opts = ServeOptions {
        store,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        client_ca: args.client_ca,
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        policy,
        request_timeout: Duration::from_millis(args.request_timeout_ms.max(1)),
        drain: Duration::from_secs(args.drain_seconds),
        cert_poll: poll,
        store_poll: poll,
        decision_cache_entries: args.decision_cache_entries,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let running = start(opts).await?;
        eprintln!(
            "tether webhook: admission on https://{}, metrics on http://{}/metrics",
            running.addr, running.metrics_addr
        );
        let stop = running.shutdown_handle();
        tokio::spawn(async move {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("signal received: shutting down");
            let _ = stop.send(true);
        });
        running.wait().await;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_flag_selects_the_api_server_or_a_directory() {
        let replica = || Ok("tether-webhook-7d9f8b6c5d-x2x9z".to_string());
        assert_eq!(
            store_source("kube://", "ops", replica).unwrap(),
            StoreSource::Kube {
                installer_namespace: "ops".into(),
                replica: "tether-webhook-7d9f8b6c5d-x2x9z".into(),
            }
        );
        // The directory store has no crash watcher: no identity is needed, so a
        // host without one still serves.
        let no_identity = || anyhow::bail!("no identity");
        assert_eq!(
            store_source("./profiles", "ops", no_identity).unwrap(),
            StoreSource::Dir("./profiles".into())
        );
        let err = store_source("kube://", "ops", no_identity).unwrap_err().to_string();
        assert!(err.contains("no identity"), "{err}");
        let err = store_source("kube://shop", "ops", replica).unwrap_err().to_string();
        assert!(err.contains("plain `kube://`"), "{err}");
    }
}
