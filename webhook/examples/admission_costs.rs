//! What one `/mutate` costs tether's handler, without the server around it,
//! against a floor measured in the same run: serde_json skipping the same body
//! (`IgnoredAny`), which reading any AdmissionReview costs at least.
//!
//! ```sh
//! cargo run --release -p webhook --example admission_costs [-- REVIEW.json]
//! ```
//!
//! Each line's ratio is to the floor measured just before it. REVIEW.json
//! defaults to the body of bench/admission.sh. Every container of
//! its Pod gets a stored profile, so the answer is a patch. Two columns:
//! "hot", the best of 5 batches of back-to-back calls (code and data in the
//! CPU's caches), and "cold", the median of single calls each made after
//! writing 16 MiB elsewhere (caches emptied, the review too). Under load the
//! server sits between the two: the TLS, HTTP/2 and runtime code between two
//! admissions evicts part of tether's. The last lines run the cache hit on two
//! threads at once, sharing one `Admission` (its cache lock, counters and
//! `Arc`s) or each with its own: what sharing between the server's two
//! connection threads costs. The allocator is mimalloc, as in `tether`; the
//! "allocs" column counts the allocations of one call.

use profile_store::WorkloadKey;
use serde::de::IgnoredAny;
use std::alloc::{GlobalAlloc, Layout};
use std::error::Error;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use webhook::cache::DecisionCache;
use webhook::index::{Entry, Index, SharedIndex};
use webhook::metrics::Metrics;
use webhook::policy::Policy;
use webhook::review::Admission;
use webhook::slim::PodView;

type Res<T> = Result<T, Box<dyn Error>>;

/// mimalloc, counting allocations.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// A global allocator can only be written as an `unsafe impl`.
// SAFETY: every call is passed on to mimalloc unchanged; the count is a side effect.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations (and reallocations) made by one call of `f`.
fn allocations(mut f: impl FnMut() -> Res<()>) -> Res<u64> {
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    f()?;
    Ok(ALLOCATIONS.load(Ordering::Relaxed) - before)
}

const HOT_CALLS: u32 = 50_000;
const COLD_CALLS: usize = 2_000;
const THREAD_CALLS: u32 = 100_000;

/// Best of 5 batches, µs per call.
fn hot(mut f: impl FnMut() -> Res<()>) -> Res<f64> {
    for _ in 0..HOT_CALLS / 10 {
        f()?;
    }
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..HOT_CALLS {
            f()?;
        }
        best = best.min(t.elapsed().as_secs_f64() * 1e6 / f64::from(HOT_CALLS));
    }
    Ok(best)
}

/// Median of single calls after emptying the caches, µs.
fn cold(junk: &mut [u8], mut f: impl FnMut() -> Res<()>) -> Res<f64> {
    let mut times = Vec::with_capacity(COLD_CALLS);
    for round in 0..COLD_CALLS {
        for byte in junk.iter_mut().step_by(64) {
            *byte = byte.wrapping_add(round as u8);
        }
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// An `Admission` on `index` with `cache` and the default policy (enforce).
fn admission(index: &Arc<SharedIndex>, cache: DecisionCache) -> Res<Admission> {
    Ok(Admission {
        policy: Policy::from_yaml("{}")?,
        index: index.clone(),
        metrics: Metrics::default(),
        cache,
    })
}

/// An index with a profile for every container and init container of the
/// Pod `object` in `namespace`, so that `/mutate` answers with a patch.
fn index_for(object: &str, namespace: &str) -> Res<Index> {
    let pod: PodView<'_> = serde_json::from_str(object)?;
    let spec = pod.spec.as_ref().ok_or("the Pod has no spec")?;
    let mut entries: Vec<(WorkloadKey, Entry)> = Vec::new();
    for (i, c) in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .enumerate()
    {
        let key = webhook::decide::container_key(&pod, namespace, &c.name)?;
        let active: profile_store::Version = format!("{i:012x}").parse()?;
        let log: profile_store::Version = format!("{:012x}", i + 0xf00).parse()?;
        entries.push((
            key,
            Entry {
                active: Some(active.clone()),
                log_variant: Some(log.clone()),
                fallback: None,
                known: [active, log].into_iter().collect(),
            },
        ));
    }
    Ok(Index::from_entries(entries))
}

fn main() -> Res<()> {
    let path = std::env::args().nth(1).unwrap_or_else(|| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/data/admission/apiserver-1.35/pod-create-replicaset-initcontainers.json"
        )
        .into()
    });
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let review: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{path}: {e}"))?;
    // Compact, as the API server sends it.
    let body = Arc::new(serde_json::to_vec(&review)?);
    let request = &review["request"];
    let namespace = request["namespace"].as_str().ok_or("request.namespace is missing")?;
    let object = serde_json::to_string(&request["object"])?;
    let shared = Arc::new(SharedIndex::default());
    shared.set(index_for(&object, namespace)?);
    let hit = Arc::new(admission(&shared, DecisionCache::default())?);
    let miss = admission(&shared, DecisionCache::new(0))?;
    let answer = hit.mutate(&body)?;
    if webhook::wire::patch_of(&answer)?.is_none() {
        return Err("the answer has no patch: not the path the benchmark measures".into());
    }
    let text_body = std::str::from_utf8(&body)?;

    type Case<'a> = (&'a str, Box<dyn FnMut() -> Res<()> + 'a>);
    let cases: Vec<Case<'_>> = vec![
        (
            "read the Pod (PodView of the object)",
            Box::new(|| {
                black_box(serde_json::from_str::<PodView<'_>>(&object)?);
                Ok(())
            }),
        ),
        (
            "mutate, decision cache hit",
            Box::new(|| {
                black_box(hit.mutate(&body)?);
                Ok(())
            }),
        ),
        (
            "mutate, decision cache off",
            Box::new(|| {
                black_box(miss.mutate(&body)?);
                Ok(())
            }),
        ),
    ];
    println!("{} ({} bytes compact)", path, body.len());
    println!(
        "{:40} {:>9} {:>7} {:>9} {:>7} {:>15} {:>6}",
        "", "hot µs", "x floor", "cold µs", "x floor", "floor hot/cold", "allocs"
    );
    let mut junk = vec![0u8; 16 << 20];
    let floor = |junk: &mut [u8]| -> Res<(f64, f64)> {
        let mut skip = || {
            black_box(serde_json::from_str::<IgnoredAny>(text_body)?);
            Ok(())
        };
        Ok((hot(&mut skip)?, cold(junk, &mut skip)?))
    };
    for (name, mut f) in cases {
        // The floor again just before each case: this machine's speed drifts
        // within a run, and a ratio to a floor taken minutes earlier drifts
        // with it.
        let (fh, fc) = floor(&mut junk)?;
        let (h, c) = (hot(&mut f)?, cold(&mut junk, &mut f)?);
        let n = allocations(&mut f)?;
        println!(
            "{name:40} {h:9.2} {:7.2} {c:9.2} {:7.2} {fh:7.2}/{fc:<7.2} {n:>6}",
            h / fh,
            c / fc
        );
    }

    for sharing in [true, false] {
        let own = (0..2)
            .map(|_| {
                if sharing {
                    Ok(hit.clone())
                } else {
                    admission(&shared, DecisionCache::default()).map(Arc::new)
                }
            })
            .collect::<Res<Vec<_>>>()?;
        let t = Instant::now();
        let threads: Vec<_> = own
            .into_iter()
            .map(|a| {
                let body = body.clone();
                std::thread::spawn(move || -> Result<(), String> {
                    for _ in 0..THREAD_CALLS {
                        black_box(a.mutate(&body).map_err(|e| e.0)?);
                    }
                    Ok(())
                })
            })
            .collect();
        for t in threads {
            t.join().map_err(|_| "a thread panicked")??;
        }
        let each = t.elapsed().as_secs_f64() * 1e6 / f64::from(THREAD_CALLS);
        let how = if sharing {
            "one Admission shared"
        } else {
            "one Admission each"
        };
        println!("2 threads, cache hits, {how:22} {each:9.2} µs per call per thread");
    }
    Ok(())
}
