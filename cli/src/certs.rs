//! `tether certs ...`: create the webhook's certificates and wire its CA into the
//! webhook configurations.

use anyhow::{Context, Result};
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub(crate) enum CertsCommand {
    /// Create an ECDSA P-256 CA and a serving certificate for the webhook Service,
    /// as the files of a Kubernetes TLS Secret: ca.crt, ca.key, tls.crt, tls.key.
    Init {
        /// The webhook's Service name.
        #[arg(long, env = "TETHER_SERVICE", default_value = "tether-webhook")]
        service: String,
        /// The Service's namespace.
        #[arg(long, env = "TETHER_NAMESPACE", default_value = "tether-system")]
        namespace: String,
        /// Directory to write the files into (created when absent).
        #[arg(long, env = "TETHER_CERTS_OUT", value_name = "DIR")]
        out: PathBuf,
        /// Validity of the CA and the certificate, in days.
        #[arg(long, env = "TETHER_CERT_DAYS", default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: u32,
        /// Extra names for the certificate (repeatable), beyond S, S.N, S.N.svc
        /// and S.N.svc.cluster.local: DNS names, or IP addresses (an IP SAN, for a
        /// webhook the API server reaches by `url: https://IP:PORT/...`).
        #[arg(long = "san", env = "TETHER_SANS", value_delimiter = ',', value_name = "NAME")]
        sans: Vec<String>,
        /// Overwrite existing files.
        #[arg(long, env = "TETHER_FORCE")]
        force: bool,
    },
    /// Set `caBundle` on every webhook of the Mutating and Validating webhook
    /// configurations named NAME, through the Kubernetes API (KUBECONFIG or the
    /// in-cluster service account).
    InjectCa {
        /// The webhook configurations' name.
        #[arg(long, env = "TETHER_WEBHOOK", value_name = "NAME")]
        webhook: String,
        /// The CA certificate (PEM), e.g. the ca.crt of `tether certs init`.
        #[arg(long, env = "TETHER_CA", value_name = "FILE")]
        ca: PathBuf,
    },
}

pub(crate) fn run(cmd: CertsCommand) -> Result<()> {
    match cmd {
        CertsCommand::Init {
            service,
            namespace,
            out,
            days,
            sans,
            force,
        } => {
            let pki = certs::generate::for_service(&service, &namespace, &sans, days)?;
            for path in pki.write(&out, force)? {
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        CertsCommand::InjectCa { webhook, ca } => {
            let bundle = certs::inject::read_ca_bundle(&ca)?;
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let done = runtime.block_on(async {
                let client = kube::Client::try_default()
                    .await
                    .context("connecting to the Kubernetes API (set KUBECONFIG, or run in a pod)")?;
                Ok::<_, anyhow::Error>(certs::inject::inject_ca_bundle(client, &webhook, &bundle).await?)
            })?;
            for d in done {
                for w in &d.updated {
                    println!("{} {webhook}: set caBundle of {w}", d.kind);
                }
                for w in &d.unchanged {
                    println!("{} {webhook}: {w} already has this caBundle", d.kind);
                }
            }
            Ok(())
        }
    }
}
