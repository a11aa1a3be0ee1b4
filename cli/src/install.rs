//! `tether install`: the node installer (run by the tether-installer DaemonSet).

use anyhow::{Context, Result};
use clap::Args;
use installer::{InstallOptions, PlanOptions};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Args)]
pub(crate) struct InstallArgs {
    /// This node's name (the DaemonSet passes spec.nodeName): the pods watched
    /// are this node's, and the ProfileInstallation is named after it.
    #[arg(long, env = "NODE_NAME", value_name = "NODE")]
    node_name: String,
    /// The kubelet's root directory; profiles go to DIR/seccomp/tether/.
    #[arg(
        long,
        env = "TETHER_KUBELET_ROOT",
        value_name = "DIR",
        default_value = "/var/lib/kubelet"
    )]
    kubelet_root: PathBuf,
    /// How long a version must be unneeded and unreferenced by the node's pods
    /// before its file is removed, in seconds.
    #[arg(long, env = "TETHER_GRACE_SECONDS", default_value_t = 600)]
    grace_seconds: u64,
    /// How many of each workload's newest versions are kept besides the active one.
    #[arg(long, env = "TETHER_KEEP_RECENT", default_value_t = 3)]
    keep_recent: usize,
    /// Metrics and probes address (plain HTTP: /metrics, /healthz, /readyz).
    #[arg(long, env = "TETHER_METRICS_LISTEN", default_value = "0.0.0.0:9091")]
    metrics_listen: SocketAddr,
    /// The namespace of the ProfileInstallation objects.
    #[arg(long, env = "TETHER_NAMESPACE", default_value = "tether-system")]
    namespace: String,
}

pub(crate) fn run(args: InstallArgs) -> Result<()> {
    let opts = InstallOptions {
        node_name: args.node_name,
        kubelet_root: args.kubelet_root,
        namespace: args.namespace,
        grace: Duration::from_secs(args.grace_seconds),
        plan: PlanOptions {
            keep_recent: args.keep_recent,
        },
        heartbeat: Duration::from_secs(30),
        metrics_listen: Some(args.metrics_listen),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let client = kube::Client::try_default()
            .await
            .context("connecting to the Kubernetes API (in-cluster service account or kubeconfig)")?;
        eprintln!(
            "tether installer: node {}, files under {}/seccomp/tether, metrics on http://{}/metrics",
            opts.node_name,
            opts.kubelet_root.display(),
            args.metrics_listen
        );
        installer::run(client, opts, shutdown_signal()).await?;
        Ok(())
    })
}

/// Completes on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("signal received: shutting down");
}
