//! `tether validate --pod`: the Kubernetes Job that replays a pod's containers in a
//! staging namespace under strace, with each container's profile injected. Each
//! trace goes to its container's stderr, so `kubectl logs job/NAME -c CONTAINER`
//! reads it back for `tether validate --read-trace` ([`crate::readback`]): a
//! finished pod's files cannot be copied out, its logs can.

use k8s_openapi::api::core::v1::{Capabilities, Container, Pod, SeccompProfile, SecurityContext};
use serde_json::{Value, json};

/// Where the strace binary is, in every container.
pub const PROBE_DIR: &str = "/probe";

/// What the Job needs beyond the pod.
#[derive(Debug, Clone)]
pub struct JobOptions {
    /// The staging namespace.
    pub namespace: String,
    /// An image holding a static strace at `/strace` (copied into the shared volume
    /// by an init container, since application images rarely have strace).
    pub strace_image: String,
    /// For each container: the `localhostProfile` to run it under (the Log-mode
    /// variant of its active version, so that strace itself can run while the
    /// kernel logs what the enforcing profile would deny).
    pub profiles: Vec<(String, String)>,
}

/// Why a Job cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The pod file does not parse.
    #[error("{0}")]
    Parse(String),
    /// A container has no command: its entrypoint lives in the image, which tether
    /// cannot read.
    #[error(
        "container {0} has no `command`: its entrypoint is in the image; write the entrypoint into the pod's command so the replay can wrap it in strace"
    )]
    NoCommand(String),
}

/// Reads a Pod manifest (YAML or JSON).
pub fn read_pod(text: &str) -> Result<Pod, JobError> {
    serde_saphyr::from_str(text).map_err(|e| JobError::Parse(format!("the pod manifest does not parse: {e}")))
}

fn wrap(c: &mut Container, opts: &JobOptions) -> Result<(), JobError> {
    let Some(command) = c.command.take().filter(|c| !c.is_empty()) else {
        return Err(JobError::NoCommand(c.name.clone()));
    };
    // No `-o`: strace writes to its stderr, which `kubectl logs` keeps after the
    // pod ends (the container's own output in between is skipped by the reader).
    // `-q`: its "Process N attached" notes would land inside unfinished call lines.
    let mut wrapped = vec![format!("{PROBE_DIR}/bin/strace"), "-f".into(), "-q".into()];
    wrapped.extend(command);
    c.command = Some(wrapped);
    let sc = c.security_context.get_or_insert_with(SecurityContext::default);
    let caps = sc.capabilities.get_or_insert_with(Capabilities::default);
    let add = caps.add.get_or_insert_with(Vec::new);
    if !add.iter().any(|a| a == "SYS_PTRACE") {
        add.push("SYS_PTRACE".into());
    }
    // A pod that runs as non-root keeps doing so; ptrace of its own children
    // needs only the capability above.
    if let Some((_, path)) = opts.profiles.iter().find(|(name, _)| name == &c.name) {
        sc.seccomp_profile = Some(SeccompProfile {
            type_: "Localhost".into(),
            localhost_profile: Some(path.clone()),
        });
    }
    c.volume_mounts.get_or_insert_with(Vec::new).push(
        serde_json::from_value(json!({"name": "tether-probe", "mountPath": PROBE_DIR}))
            .map_err(|e| JobError::Parse(e.to_string()))?,
    );
    Ok(())
}

/// The Job (as JSON, which `kubectl apply -f -` takes) replaying `pod`.
pub fn replay_job(pod: &Pod, opts: &JobOptions) -> Result<Value, JobError> {
    let mut spec = pod.spec.clone().unwrap_or_default();
    for c in spec.init_containers.iter_mut().flatten() {
        wrap(c, opts)?;
    }
    for c in spec.containers.iter_mut() {
        wrap(c, opts)?;
    }
    let copy: Container = serde_json::from_value(json!({
        "name": "tether-strace",
        "image": opts.strace_image,
        "command": ["/bin/sh", "-c", format!("mkdir -p {PROBE_DIR}/bin && cp /strace {PROBE_DIR}/bin/strace")],
        "volumeMounts": [{"name": "tether-probe", "mountPath": PROBE_DIR}],
    }))
    .map_err(|e| JobError::Parse(e.to_string()))?;
    spec.init_containers.get_or_insert_with(Vec::new).insert(0, copy);
    spec.volumes.get_or_insert_with(Vec::new).push(
        serde_json::from_value(json!({"name": "tether-probe", "emptyDir": {}}))
            .map_err(|e| JobError::Parse(e.to_string()))?,
    );
    spec.restart_policy = Some("Never".into());
    let name = pod
        .metadata
        .name
        .clone()
        .or_else(|| {
            pod.metadata
                .generate_name
                .as_deref()
                .map(|g| g.trim_end_matches('-').to_string())
        })
        .unwrap_or_else(|| "pod".into());
    let job_name: String = format!("tether-replay-{name}").chars().take(63).collect();
    let mut labels = pod.metadata.labels.clone().unwrap_or_default();
    labels.insert("tether.dev/replay".into(), name.clone());
    Ok(json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name.trim_end_matches('-'),
            "namespace": opts.namespace,
            "labels": {"tether.dev/replay": name},
            "annotations": {"tether.dev/replay-of": format!("{}/{}", pod.metadata.namespace.as_deref().unwrap_or("default"), name)},
        },
        "spec": {
            "backoffLimit": 0,
            "ttlSecondsAfterFinished": 86400,
            "template": {
                "metadata": {"labels": labels},
                "spec": spec,
            },
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: checkout-6c9d7b8f4d-q7x2z
  namespace: shop
  labels: {app: checkout}
spec:
  initContainers:
  - name: migrate
    image: registry.example/shop/migrate:1.4
    command: ["/migrate", "--up"]
  containers:
  - name: app
    image: registry.example/shop/app:1.4
    command: ["/app"]
    args: ["--port", "8080"]
    securityContext:
      runAsNonRoot: true
"#;

    #[test]
    fn wraps_every_command_in_strace_with_ptrace_and_the_profile() {
        let pod = read_pod(POD).unwrap();
        let job = replay_job(
            &pod,
            &JobOptions {
                namespace: "staging".into(),
                strace_image: "registry.example/tools/strace-static:6.1".into(),
                profiles: vec![(
                    "app".into(),
                    "tether/shop/deployment/checkout/app-0123456789ab.json".into(),
                )],
            },
        )
        .unwrap();
        assert_eq!(job["metadata"]["namespace"], "staging");
        let spec = &job["spec"]["template"]["spec"];
        assert_eq!(spec["restartPolicy"], "Never");
        assert_eq!(spec["initContainers"][0]["name"], "tether-strace");
        let app = &spec["containers"][0];
        assert_eq!(app["command"], json!(["/probe/bin/strace", "-f", "-q", "/app"]));
        assert_eq!(app["args"], json!(["--port", "8080"]));
        assert_eq!(app["securityContext"]["capabilities"]["add"], json!(["SYS_PTRACE"]));
        assert_eq!(app["securityContext"]["runAsNonRoot"], true);
        assert_eq!(
            app["securityContext"]["seccompProfile"]["localhostProfile"],
            "tether/shop/deployment/checkout/app-0123456789ab.json"
        );
        let migrate = &spec["initContainers"][1];
        assert_eq!(
            migrate["command"],
            json!(["/probe/bin/strace", "-f", "-q", "/migrate", "--up"])
        );
        assert!(
            spec["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v["name"] == "tether-probe")
        );
    }

    #[test]
    fn a_container_without_a_command_is_an_error_saying_what_to_do() {
        let pod = read_pod(&POD.replace("    command: [\"/app\"]\n", "")).unwrap();
        let err = replay_job(
            &pod,
            &JobOptions {
                namespace: "staging".into(),
                strace_image: "x".into(),
                profiles: vec![],
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("container app has no `command`"), "{err}");
    }
}
