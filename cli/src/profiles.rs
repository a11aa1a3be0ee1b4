//! `tether profiles ...`: list, show, diff, approve, activate.

use crate::table::Table;
use crate::{JsonArgs, StoreArgs};
use anyhow::{Result, bail};
use clap::Subcommand;
use profile_store::render::is_dangerous;
use profile_store::store::{StoreError, WorkloadRecord, rerender};
use profile_store::{Abi, ProfileStore, Version, WorkloadKey};
use serde_json::json;
use std::collections::BTreeSet;

#[derive(Debug, Subcommand)]
pub(crate) enum ProfilesCommand {
    /// List every workload with its active version.
    List {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        json: JsonArgs,
    },
    /// Print a workload's active profile (or `--version V`) as OCI seccomp JSON on
    /// stdout, ready to save as a file.
    Show {
        /// namespace/kind/name/container
        key: WorkloadKey,
        /// A version other than the active one.
        #[arg(long, env = "TETHER_PROFILE_VERSION")]
        version: Option<Version>,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        json: JsonArgs,
    },
    /// Print the syscalls added and removed between two versions.
    Diff {
        /// namespace/kind/name/container
        key: WorkloadKey,
        /// The older version.
        from: Version,
        /// The newer version.
        to: Version,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        json: JsonArgs,
    },
    /// Approve dangerous syscalls (ptrace, mount, bpf, ...) a workload was observed
    /// making, and render a version that allows them.
    Approve {
        /// namespace/kind/name/container
        key: WorkloadKey,
        /// The syscalls to approve.
        #[arg(required = true)]
        syscalls: Vec<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Put a workload into fallback (Unconfined, or the Log-mode variant of its
    /// profile where Pod Security forbids Unconfined) or take it out again.
    #[command(subcommand)]
    Fallback(FallbackCommand),
    /// Pin the active version of a workload (by default the newest is active).
    Activate {
        /// namespace/kind/name/container
        key: WorkloadKey,
        /// The version to activate.
        version: Version,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum FallbackCommand {
    /// New pods of the workload get the fallback instead of its profile.
    Set {
        /// namespace/kind/name/container
        key: WorkloadKey,
        /// Why (shown in pod annotations, audit annotations and logs).
        #[arg(long, env = "TETHER_FALLBACK_REASON")]
        reason: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// New pods of the workload get its profile again.
    Clear {
        /// namespace/kind/name/container
        key: WorkloadKey,
        #[command(flatten)]
        store: StoreArgs,
    },
}

pub(crate) fn run(cmd: ProfilesCommand) -> Result<()> {
    match cmd {
        ProfilesCommand::List { store, json } => list(&*store.open()?, json.json),
        ProfilesCommand::Show {
            key,
            version,
            store,
            json,
        } => show(&*store.open()?, &key, version, json.json),
        ProfilesCommand::Diff {
            key,
            from,
            to,
            store,
            json,
        } => diff(&*store.open()?, &key, &from, &to, json.json),
        ProfilesCommand::Approve { key, syscalls, store } => approve(&*store.open()?, &key, &syscalls),
        ProfilesCommand::Activate { key, version, store } => activate(&*store.open()?, &key, &version),
        ProfilesCommand::Fallback(FallbackCommand::Set { key, reason, store }) => {
            fallback(&*store.open()?, &key, Some(reason))
        }
        ProfilesCommand::Fallback(FallbackCommand::Clear { key, store }) => fallback(&*store.open()?, &key, None),
    }
}

fn existing(store: &dyn ProfileStore, key: &WorkloadKey) -> Result<WorkloadRecord> {
    Ok(store
        .record(key)?
        .ok_or_else(|| StoreError::UnknownWorkload { key: key.clone() })?)
}

fn list(store: &dyn ProfileStore, json: bool) -> Result<()> {
    let mut records = Vec::new();
    for key in store.keys()? {
        records.extend(store.record(&key)?);
    }
    if json {
        let out: Vec<_> = records
            .iter()
            .map(|r| {
                json!({
                    "key": r.key().to_string(),
                    "active": r.active(),
                    "pinned": r.state.pinned,
                    "versions": r.state.versions.len(),
                    "approvals": r.state.approvals,
                    "fallback": r.state.fallback,
                    "observed_syscalls": r.baseline.syscalls.len(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let mut t = Table::new(&[
        "WORKLOAD", "ACTIVE", "STATUS", "ALLOWED", "REVIEW", "VERSIONS", "FALLBACK",
    ]);
    for r in &records {
        let active = r.active();
        t.row(vec![
            r.key().to_string(),
            active.map_or("-".into(), |a| {
                format!(
                    "{}{}",
                    a.version,
                    if r.state.pinned.is_some() { " (pinned)" } else { "" }
                )
            }),
            active.map_or("-".into(), |a| format!("{:?}", a.status).to_lowercase()),
            active.map_or("-".into(), |a| a.allowed.to_string()),
            active.map_or("-".into(), |a| {
                if a.needs_review.is_empty() {
                    "-".into()
                } else {
                    a.needs_review.join(",")
                }
            }),
            r.state.versions.len().to_string(),
            r.state.fallback.as_ref().map_or("-".into(), |f| f.reason.clone()),
        ]);
    }
    if records.is_empty() {
        println!("the store has no workloads yet; `tether build --from PATH --store DIR` adds them");
    } else {
        print!("{}", t.render());
    }
    Ok(())
}

fn show(store: &dyn ProfileStore, key: &WorkloadKey, version: Option<Version>, json: bool) -> Result<()> {
    let record = existing(store, key)?;
    let meta = match &version {
        Some(v) => record.version(v).ok_or_else(|| StoreError::UnknownVersion {
            key: key.clone(),
            version: v.clone(),
        })?,
        None => match record.active() {
            Some(a) => a,
            None => bail!("{key} has a baseline but no version yet; run `tether build` to render one"),
        },
    };
    let profile = store.profile(key, &meta.version)?;
    if json {
        let out = json!({
            "key": key.to_string(),
            "version": meta,
            "active": record.active().map(|a| &a.version) == Some(&meta.version),
            "versions": record.state.versions,
            "profile": profile,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&profile)?);
    }
    Ok(())
}

fn diff(store: &dyn ProfileStore, key: &WorkloadKey, from: &Version, to: &Version, json: bool) -> Result<()> {
    existing(store, key)?;
    let a = store.profile(key, from)?;
    let b = store.profile(key, to)?;
    let (a, b) = (a.allowed(), b.allowed());
    let added: Vec<&str> = b.difference(&a).copied().collect();
    let removed: Vec<&str> = a.difference(&b).copied().collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "added": added, "removed": removed }))?
        );
    } else {
        for s in &added {
            println!("+ {s}");
        }
        for s in &removed {
            println!("- {s}");
        }
        if added.is_empty() && removed.is_empty() {
            println!("{from} and {to} allow the same syscalls");
        }
    }
    Ok(())
}

fn approve(store: &dyn ProfileStore, key: &WorkloadKey, syscalls: &[String]) -> Result<()> {
    for s in syscalls {
        if Abi::known_name(s).is_none() {
            bail!("`{s}` is not a syscall name any of x86_64, i386, aarch64, arm knows");
        }
        if !is_dangerous(s) {
            bail!(
                "`{s}` needs no approval: only dangerous syscalls (ptrace, mount, bpf, ...) are held for review; it is allowed whenever it is observed"
            );
        }
    }
    existing(store, key)?;
    let mut outcome = None;
    let record = store.update(key, &mut |record| {
        record.state.approvals.extend(syscalls.iter().cloned());
        if record.latest().is_none() {
            return Ok(());
        }
        outcome = Some(rerender(store, record, jiff::Timestamp::now())?);
        Ok(())
    })?;
    let observed: BTreeSet<&str> = record.baseline.syscall_names().collect();
    for s in syscalls {
        if !observed.contains(s.as_str()) {
            println!("note: {key} was never observed calling {s}; the approval applies once it is");
        }
    }
    match outcome {
        Some(o) if o.new_version => println!(
            "{key}: new version {} allows {}",
            o.rendered.version,
            o.added.join(", ")
        ),
        Some(o) => println!("{key}: version {} already allows what is approved", o.rendered.version),
        None => println!("{key}: approval recorded; the next build renders it"),
    }
    Ok(())
}

fn activate(store: &dyn ProfileStore, key: &WorkloadKey, version: &Version) -> Result<()> {
    existing(store, key)?;
    store.update(key, &mut |record| {
        if record.version(version).is_none() {
            return Err(StoreError::UnknownVersion {
                key: key.clone(),
                version: version.clone(),
            });
        }
        record.state.pinned = Some(version.clone());
        Ok(())
    })?;
    println!("{key}: version {version} is active");
    Ok(())
}

fn fallback(store: &dyn ProfileStore, key: &WorkloadKey, reason: Option<String>) -> Result<()> {
    if reason.as_deref().is_some_and(|r| r.trim().is_empty()) {
        bail!("--reason is empty: say why the workload needs its fallback (it is shown on every pod)");
    }
    existing(store, key)?;
    store.update(key, &mut |record| {
        record.state.fallback = reason.as_ref().map(|r| profile_store::store::Fallback {
            reason: r.clone(),
            since: jiff::Timestamp::now(),
        });
        Ok(())
    })?;
    match reason {
        Some(r) => println!(
            "{key}: in fallback ({r}); new pods get Unconfined, or the Log-mode variant where Pod Security forbids Unconfined"
        ),
        None => println!("{key}: fallback cleared; new pods get the active profile"),
    }
    Ok(())
}
