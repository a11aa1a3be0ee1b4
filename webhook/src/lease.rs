//! Leader election through a `coordination.k8s.io/v1` Lease, so that one replica
//! of the webhook runs the crash watcher.
//!
//! The protocol is client-go's `LeaseLock`: read the Lease; take it when it is
//! free or its holder has not renewed it for its duration; renew it while
//! holding it; every write carries the resourceVersion read, so of two replicas
//! racing for it one gets 409 Conflict and stays a follower. Expiry is measured
//! on this replica's clock from when it first saw the holder's current record
//! (not from the `renewTime` the holder wrote), so clock skew between nodes does
//! not hand the lease over early.
//!
//! Why not a crate: `kube-leader-election` does not support kube 5, and
//! `kube-lease-manager` keeps reporting leadership while renewals fail with
//! anything but a conflict, where the crash watcher must stop acting at once.

// k8s-openapi's jiff (its MicroTime wraps that version's Timestamp).
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use std::time::Duration;

/// Which Lease, who we are, and how long a lease lasts.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// The Lease's namespace.
    pub namespace: String,
    /// The Lease's name (`tether-crash-watcher`).
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a holder's lease lasts without renewal.
    pub duration: Duration,
    /// How often to try to acquire, and to renew while leading (well under
    /// `duration`, so that one failed renewal does not lose the lease).
    pub retry: Duration,
}

impl LeaseConfig {
    /// The crash watcher's Lease in `namespace` for `identity`: 15 s leases, a
    /// try every 2 s (client-go's defaults for controllers).
    pub fn crash_watcher(namespace: &str, identity: &str) -> LeaseConfig {
        LeaseConfig {
            namespace: namespace.to_string(),
            name: "tether-crash-watcher".to_string(),
            identity: identity.to_string(),
            duration: Duration::from_secs(15),
            retry: Duration::from_secs(2),
        }
    }
}

/// The holder's record as last seen, and when this replica first saw it.
#[derive(Debug, Clone, PartialEq)]
struct Observed {
    holder: Option<String>,
    renew: Option<Timestamp>,
    at: Timestamp,
}

/// One replica's side of the election.
pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    observed: Option<Observed>,
    leading: bool,
}

impl Elector {
    /// An elector for `config`, not leading.
    pub fn new(client: kube::Client, config: LeaseConfig) -> Elector {
        Elector {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
            leading: false,
        }
    }

    /// Whether the last [`step`](Self::step) left this replica leading.
    pub fn is_leader(&self) -> bool {
        self.leading
    }

    /// One round at time `now`: acquire the lease if it is free or expired,
    /// renew it if held. Any failure (a conflict, an API error) means not
    /// leading: a replica that cannot renew must stop acting before another
    /// takes over.
    pub async fn step(&mut self, now: Timestamp) -> bool {
        self.leading = match self.try_step(now).await {
            Ok(leading) => leading,
            Err(e) => {
                let lease = format!("{}/{}", self.config.namespace, self.config.name);
                match &e {
                    kube::Error::Api(s) if s.code == 409 => {
                        tracing::info!(lease, "another replica wrote the lease first")
                    }
                    kube::Error::Api(s) if s.code == 403 => tracing::error!(
                        lease, error = %e,
                        "cannot write the lease: the webhook's Role must allow get/update on leases named {} and create on leases; apply deploy/base",
                        self.config.name
                    ),
                    _ => tracing::warn!(lease, error = %e, "lease call failed"),
                }
                false
            }
        };
        self.leading
    }

    async fn try_step(&mut self, now: Timestamp) -> Result<bool, kube::Error> {
        let me = &self.config.identity;
        let duration_secs = i32::try_from(self.config.duration.as_secs()).unwrap_or(i32::MAX);
        let Some(lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.clone()),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_duration_seconds: Some(duration_secs),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            self.api.create(&PostParams::default(), &lease).await?;
            self.observed = Some(Observed {
                holder: Some(me.clone()),
                renew: Some(now),
                at: now,
            });
            return Ok(true);
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let renew = spec.renew_time.as_ref().map(|t| t.0);
        let seen = match &self.observed {
            Some(o) if o.holder == holder && o.renew == renew => o.at,
            _ => now,
        };
        self.observed = Some(Observed {
            holder: holder.clone(),
            renew,
            at: seen,
        });
        let mine = holder.as_deref() == Some(me.as_str());
        let lasts = SignedDuration::from_secs(
            spec.lease_duration_seconds
                .map_or(self.config.duration.as_secs() as i64, i64::from),
        );
        let expired = seen.checked_add(lasts).map_or(true, |end| end <= now);
        if !mine && holder.is_some() && !expired {
            return Ok(false);
        }
        if !mine {
            tracing::info!(
                previous = holder.as_deref().unwrap_or("none"),
                "taking over the crash watcher lease"
            );
        }
        let mut next = lease;
        next.spec = Some(LeaseSpec {
            holder_identity: Some(me.clone()),
            acquire_time: if mine { spec.acquire_time } else { Some(MicroTime(now)) },
            renew_time: Some(MicroTime(now)),
            lease_duration_seconds: Some(duration_secs),
            lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + i32::from(!mine)),
            ..spec
        });
        // `replace` sends the resourceVersion read above: a concurrent writer
        // makes this fail with 409 instead of being overwritten.
        self.api
            .replace(&self.config.name, &PostParams::default(), &next)
            .await?;
        self.observed = Some(Observed {
            holder: Some(me.clone()),
            renew: Some(now),
            at: now,
        });
        Ok(true)
    }
}

/// Runs the election until `leading` has no receivers, publishing whether this
/// replica leads after every round.
pub async fn run_election(mut elector: Elector, leading: tokio::sync::watch::Sender<bool>) {
    let retry = elector.config.retry;
    loop {
        let now = elector.step(Timestamp::now()).await;
        leading.send_if_modified(|was| {
            let changed = *was != now;
            if changed {
                tracing::info!(leading = now, "crash watcher leadership changed");
            }
            *was = now;
            changed
        });
        tokio::select! {
            () = leading.closed() => return,
            () = tokio::time::sleep(retry) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use api_script::Call;
    use http::Method;
    use serde_json::{Value, json};

    const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/tether-system/leases/tether-crash-watcher";
    const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/tether-system/leases";

    fn lease(holder: &str, renew: &str, rv: &str) -> Value {
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
               "metadata": {"name": "tether-crash-watcher", "namespace": "tether-system", "resourceVersion": rv},
               "spec": {"holderIdentity": holder, "renewTime": renew, "acquireTime": renew,
                        "leaseDurationSeconds": 15, "leaseTransitions": 3}})
    }

    fn status(code: u16, reason: &str) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": reason, "reason": reason, "code": code})
    }

    /// Plays the API server for `calls` to an elector `f` drives; fails on any
    /// other call.
    async fn scripted<F, Fut>(calls: Vec<Call>, f: F)
    where
        F: FnOnce(Elector) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let (client, script) = api_script::serve(calls, "tether-system");
        let elector = Elector::new(client, LeaseConfig::crash_watcher("tether-system", "me"));
        tokio::time::timeout(std::time::Duration::from_secs(5), f(elector))
            .await
            .expect("the elector made a call the scenario does not answer");
        script.finish().await;
    }

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn acquires_a_lease_that_does_not_exist_yet() {
        let calls = vec![
            Call::new(Method::GET, LEASE, 404, status(404, "NotFound")),
            Call::new(Method::POST, LEASES, 201, lease("me", "2026-11-30T23:00:00Z", "1")).check(|b| {
                assert_eq!(b["spec"]["holderIdentity"], "me");
                assert_eq!(b["spec"]["leaseDurationSeconds"], 15);
                assert_eq!(b["metadata"]["name"], "tether-crash-watcher");
            }),
        ];
        scripted(calls, |mut e| async move {
            assert!(e.step(at("2026-11-30T23:00:00Z")).await);
            assert!(e.is_leader());
        })
        .await;
    }

    #[tokio::test]
    async fn acquires_a_released_lease_with_its_resource_version() {
        let calls = vec![
            Call::new(Method::GET, LEASE, 200, lease("", "2026-11-30T22:00:00Z", "41")),
            Call::new(Method::PUT, LEASE, 200, lease("me", "2026-11-30T23:00:00Z", "42")).check(|b| {
                assert_eq!(b["metadata"]["resourceVersion"], "41");
                assert_eq!(b["spec"]["holderIdentity"], "me");
                assert_eq!(b["spec"]["leaseTransitions"], 4);
            }),
        ];
        scripted(calls, |mut e| async move {
            assert!(e.step(at("2026-11-30T23:00:00Z")).await);
        })
        .await;
    }

    #[tokio::test]
    async fn does_not_act_while_another_holder_renews_and_takes_over_once_it_stops() {
        let calls = vec![
            // Held by `other`, renewed at 23:00:00.
            Call::new(Method::GET, LEASE, 200, lease("other", "2026-11-30T23:00:00Z", "7")),
            // 10 s later `other` renewed: still fresh.
            Call::new(Method::GET, LEASE, 200, lease("other", "2026-11-30T23:00:10Z", "8")),
            // 14 s after that it has not renewed again: not yet expired here.
            Call::new(Method::GET, LEASE, 200, lease("other", "2026-11-30T23:00:10Z", "8")),
            // 15 s after this replica saw that record: expired, taken over.
            Call::new(Method::GET, LEASE, 200, lease("other", "2026-11-30T23:00:10Z", "8")),
            Call::new(Method::PUT, LEASE, 200, lease("me", "2026-11-30T23:00:25Z", "9")).check(|b| {
                assert_eq!(b["metadata"]["resourceVersion"], "8");
                assert_eq!(b["spec"]["holderIdentity"], "me");
                assert_eq!(b["spec"]["leaseTransitions"], 4);
            }),
        ];
        scripted(calls, |mut e| async move {
            assert!(!e.step(at("2026-11-30T23:00:00Z")).await);
            assert!(!e.step(at("2026-11-30T23:00:10Z")).await);
            assert!(!e.step(at("2026-11-30T23:00:24Z")).await);
            assert!(e.step(at("2026-11-30T23:00:25Z")).await);
        })
        .await;
    }

    #[tokio::test]
    async fn a_stale_renew_time_alone_does_not_hand_the_lease_over() {
        // The holder's clock may be behind: its renewTime looks old, but this
        // replica has not yet watched it go unrenewed for a whole duration.
        let calls = vec![Call::new(
            Method::GET,
            LEASE,
            200,
            lease("other", "2026-11-30T20:00:00Z", "7"),
        )];
        scripted(calls, |mut e| async move {
            assert!(!e.step(at("2026-11-30T23:00:00Z")).await);
        })
        .await;
    }

    #[tokio::test]
    async fn renews_while_leading_and_steps_down_on_a_renew_conflict_or_error() {
        let calls = vec![
            Call::new(Method::GET, LEASE, 200, lease("me", "2026-11-30T23:00:00Z", "5")),
            Call::new(Method::PUT, LEASE, 200, lease("me", "2026-11-30T23:00:02Z", "6")).check(|b| {
                assert_eq!(b["spec"]["renewTime"], "2026-11-30T23:00:02.000000Z");
                assert_eq!(b["spec"]["leaseTransitions"], 3, "a renewal is no transition");
            }),
            Call::new(Method::GET, LEASE, 200, lease("me", "2026-11-30T23:00:02Z", "6")),
            Call::new(Method::PUT, LEASE, 409, status(409, "Conflict")),
            Call::new(Method::GET, LEASE, 500, status(500, "InternalError")),
        ];
        scripted(calls, |mut e| async move {
            assert!(e.step(at("2026-11-30T23:00:02Z")).await);
            assert!(
                !e.step(at("2026-11-30T23:00:04Z")).await,
                "a conflict on renew steps down"
            );
            assert!(!e.is_leader());
            assert!(!e.step(at("2026-11-30T23:00:06Z")).await, "an API error steps down");
        })
        .await;
    }
}
