#!/usr/bin/env bash
# The admission benchmark, in one run on this machine:
#
#   bash bench/admission.sh
#
# Builds tether and the load generator (release), creates a CA and serving
# certificate, builds profile stores of 10 and 10,000 workloads, starts
# `tether serve` on each store (enforce mode) and the no-op server on the same
# TLS/HTTP stack, checks that tether really injects, then measures over HTTP/2
# with kept-alive connections:
#
#   (a) maximum throughput, closed loop, tether (10k store) vs the no-op server,
#       alternating, ROUNDS rounds each: medians and their ratio;
#   (b) p99 latency at a fixed RATE req/s (open loop, measured from the scheduled
#       send time) on tether with the 10k store: median of ROUNDS runs;
#   (c) p99 at RATE req/s with the 10-profile store vs the 10k store,
#       alternating, ROUNDS runs each: medians and their ratio;
#
# and prints a summary with PASS/FAIL per target. Only the server under
# measurement runs during a measurement: the others are paused (SIGSTOP) so their
# background work does not land on the 2 cores of the one being measured; each
# server's own background work (index refresh, certificate watch) does count
# while it is measured. Nothing is pinned; the machine is shared, so runs
# alternate and medians are reported.
#
# Knobs (environment): CONNECTIONS (2), CONCURRENCY (8 streams per connection,
# closed loop), ROUNDS (15), SCALE_ROUNDS (7, runs of each store in (c)),
# DURATION (8 s, closed loop), RATE (1000),
# RATE_DURATION (10 s), WARMUP (2 s), PROFILES (10000), SMALL_PROFILES (10),
# QUIET_CORES (0.3) and QUIET_WAIT (10 s): before each run, wait that long at
# most for other processes to use less than that many cores,
# BENCH_DIR (a fresh temporary directory), BENCH_STRICT=1 (exit 1 when a target
# fails). Results: BENCH_DIR/results.jsonl (one JSON line per run) and
# BENCH_DIR/summary.txt.

set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
. bench/common.sh

CONNECTIONS=${CONNECTIONS:-2}
CONCURRENCY=${CONCURRENCY:-8}
# tether's share of the no-op server's throughput sits near the 70 % target on
# the 2-core VMs this runs on, and single rounds of it spread over 20-30
# points: with 5 or 7 rounds the verdict on (a) went either way for the same
# code within half an hour (6 December: 68.6, 73.7, 69.3 %), with 15 it did
# not (71.3, 71.1, 73.5, 74.7 %). A run takes ~19 minutes.
ROUNDS=${ROUNDS:-15}
# (c) compares two p99s of ~0.6 ms whose run-to-run spread on this shared
# machine (0.56-0.83 ms in one run of 3 each) is larger than the 10% the target
# allows: more runs, so the medians compare the stores and not the noise.
SCALE_ROUNDS=${SCALE_ROUNDS:-7}
DURATION=${DURATION:-8}
RATE=${RATE:-1000}
RATE_DURATION=${RATE_DURATION:-10}
WARMUP=${WARMUP:-2}
QUIET_CORES=${QUIET_CORES:-0.3}
QUIET_WAIT=${QUIET_WAIT:-10}
PROFILES=${PROFILES:-10000}
SMALL_PROFILES=${SMALL_PROFILES:-10}
BENCH_DIR=${BENCH_DIR:-$(mktemp -d /tmp/tether-bench.XXXXXX)}
# A BENCH_DIR given by name need not exist yet.
mkdir -p "$BENCH_DIR"
FIXTURE=$REPO/tests/data/admission/apiserver-1.35/pod-create-replicaset-initcontainers.json
# Sent compact, as the API server sends it (compact_json, bench/common.sh).
BODY=$BENCH_DIR/review.json

# Built where cargo builds: target/, or CARGO_TARGET_DIR as soak.sh does.
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
TETHER=$TARGET/release/tether
LOADGEN=$TARGET/release/loadgen
NOOP=$TARGET/release/noop-server
RESULTS=$BENCH_DIR/results.jsonl

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill -CONT "$pid" 2>/dev/null || true
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT

wait_ready() { # URL of a plain-HTTP readiness endpoint, name
    local url=$1 name=$2
    for _ in $(seq 1 300); do
        if python3 -c 'import sys,urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' "$url" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    log "$name did not become ready at $url"
    return 1
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

log "results in $BENCH_DIR"
compact_json "$FIXTURE" "$BODY"
: >"$RESULTS"

log "building (release): tether, tether-loadgen"
cargo build --release -q -p tether -p tether-loadgen

log "certificates"
"$TETHER" certs init --out "$BENCH_DIR/pki" --san localhost --force >/dev/null

log "stores: $SMALL_PROFILES and $PROFILES workload profiles"
python3 bench/gen-store.py --count "$SMALL_PROFILES" --store "$BENCH_DIR/store-small" --tether "$TETHER"
start_build=$(date +%s)
python3 bench/gen-store.py --count "$PROFILES" --store "$BENCH_DIR/store-large" --tether "$TETHER"
log "the $PROFILES-profile store took $(($(date +%s) - start_build)) s to build"

start_tether() { # store name -> sets PORT, PID
    local store=$1 name=$2 metrics
    PORT=$(free_port)
    metrics=$(free_port)
    tether_serve_args "$store" "$BENCH_DIR/pki" "$PORT" "$metrics"
    "$TETHER" "${SERVE_ARGS[@]}" >"$BENCH_DIR/$name.log" 2>&1 &
    PID=$!
    PIDS+=("$PID")
    wait_ready "http://127.0.0.1:$metrics/readyz" "$name"
    METRICS_PORT=$metrics
}

log "starting tether serve on the $PROFILES-profile store"
start_tether "$BENCH_DIR/store-large" tether-large
LARGE_PORT=$PORT LARGE_PID=$PID LARGE_METRICS=$METRICS_PORT
log "starting tether serve on the $SMALL_PROFILES-profile store"
start_tether "$BENCH_DIR/store-small" tether-small
SMALL_PORT=$PORT SMALL_PID=$PID
log "starting noop-server"
NOOP_PORT=$(free_port)
"$NOOP" --listen "127.0.0.1:$NOOP_PORT" --tls-cert "$BENCH_DIR/pki/tls.crt" --tls-key "$BENCH_DIR/pki/tls.key" \
    >"$BENCH_DIR/noop.log" 2>&1 &
NOOP_PID=$!
PIDS+=("$NOOP_PID")
for _ in $(seq 1 300); do
    [ -s "$BENCH_DIR/noop.log" ] && break
    sleep 0.1
done

url() { echo "https://localhost:$1/mutate"; }

# Every server answers, and tether injects: its answer carries a JSON patch that
# sets the stored Localhost profiles of checkout's init container migrate and
# container app.
check_patch() { # port name
    "$LOADGEN" --once --url "$(url "$1")" --ca "$BENCH_DIR/pki/ca.crt" --body "$BODY" >"$BENCH_DIR/$2.answer.json"
    python3 - "$BENCH_DIR/$2.answer.json" "$2" <<'EOF'
import base64, json, sys
answer = json.load(open(sys.argv[1]))
res = answer["response"]
patch = res.get("patch")
if isinstance(patch, list):
    patch = bytes(patch)
elif isinstance(patch, str):
    patch = base64.b64decode(patch)
else:
    sys.exit("%s: no JSON patch in the answer: %s" % (sys.argv[2], json.dumps(res)[:300]))
ops = json.loads(patch)
profiles = sorted(op["value"]["seccompProfile"]["localhostProfile"] for op in ops
                  if isinstance(op.get("value"), dict) and "seccompProfile" in op["value"])
# envoy asks for RuntimeDefault itself, which tether leaves alone.
want = ["tether/shop/deployment/checkout/%s-" % c for c in ("app", "migrate")]
for w in want:
    if not any(p.startswith(w) for p in profiles):
        sys.exit("%s: the patch does not set %s*: %s" % (sys.argv[2], w, profiles))
assert res["allowed"] is True, res
print("%s: allowed, %d patch operations, profiles %s" % (sys.argv[2], len(ops), ", ".join(profiles)))
EOF
}
check_patch "$LARGE_PORT" tether-large >&2
check_patch "$SMALL_PORT" tether-small >&2
"$LOADGEN" --once --url "$(url "$NOOP_PORT")" --ca "$BENCH_DIR/pki/ca.crt" --body "$BODY" >/dev/null

# What each server costs while nobody calls it (its background work).
ALL=("$LARGE_PID" "$SMALL_PID" "$NOOP_PID")
idle_cpu() { # pid name
    local a b
    a=$(cpu_ticks "$1")
    sleep 5
    b=$(cpu_ticks "$1")
    python3 -c 'import sys,json,os; t=os.sysconf("SC_CLK_TCK"); print(json.dumps({"label": sys.argv[3], "kind": "idle", "idle_cpu_pct": round((int(sys.argv[2])-int(sys.argv[1]))*100/t/5, 1)}))' \
        "$a" "$b" "$2" | tee -a "$RESULTS"
}
log "idle CPU of each server over 5 s"
idle_cpu "$LARGE_PID" tether-large
idle_cpu "$SMALL_PID" tether-small
idle_cpu "$NOOP_PID" noop

only() { # run with only this server running
    local keep=$1 pid
    for pid in "${ALL[@]}"; do
        if [ "$pid" = "$keep" ]; then kill -CONT "$pid"; else kill -STOP "$pid"; fi
    done
}

# Machine-wide CPU (user+nice+system, irq+softirq, and steal ticks, from
# /proc/stat), the server's CPU ticks, and the time: bracketing a run tells how
# much of the machine the server, the client and everything else (other users of
# this shared machine) took during it.
cpu_snapshot() { # server-pid
    echo "$(awk '/^cpu /{print $2+$3+$4, $7+$8, $9}' /proc/stat) $(cpu_ticks "$1") $(date +%s.%N)"
}

busy_cores() { # CPU in use on the whole machine over one second, in cores
    local a b
    a=$(awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat)
    sleep 1
    b=$(awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat)
    python3 -c 'import os,sys; print(round((int(sys.argv[2])-int(sys.argv[1]))/os.sysconf("SC_CLK_TCK"), 2))' "$a" "$b"
}

# This machine is shared: before each run, with every server paused, wait (up to
# QUIET_WAIT seconds) until other processes use less than QUIET_CORES. A run that
# could not wait for quiet is still made; its other_cpu_cores tells.
wait_quiet() {
    local pid busy waited=0
    for pid in "${ALL[@]}"; do kill -STOP "$pid"; done
    while :; do
        busy=$(busy_cores)
        if python3 -c 'import sys; sys.exit(0 if float(sys.argv[1]) < float(sys.argv[2]) else 1)' "$busy" "$QUIET_CORES"; then
            return 0
        fi
        waited=$((waited + 1))
        if [ "$waited" -ge "$QUIET_WAIT" ]; then
            log "other processes still use $busy cores after ${QUIET_WAIT}s; measuring anyway"
            return 0
        fi
    done
}

run() { # kind label port pid extra-args...
    local kind=$1 label=$2 port=$3 pid=$4 before after line
    shift 4
    wait_quiet
    only "$pid"
    before=$(cpu_snapshot "$pid")
    line=$("$LOADGEN" --url "$(url "$port")" --ca "$BENCH_DIR/pki/ca.crt" --body "$BODY" \
        --connections "$CONNECTIONS" --warmup "$WARMUP" --label "$label" "$@")
    after=$(cpu_snapshot "$pid")
    python3 - "$kind" "$line" "$before" "$after" <<'EOF' | tee -a "$RESULTS"
import json, os, sys
d = json.loads(sys.argv[2])
d["kind"] = sys.argv[1]
b = [float(x) for x in sys.argv[3].split()]
a = [float(x) for x in sys.argv[4].split()]
hz, wall = os.sysconf("SC_CLK_TCK"), a[4] - b[4]
busy, irq, steal, server = ((a[i] - b[i]) / hz / wall for i in range(4))
d["server_cpu_cores"] = round(server, 2)
d["machine_busy_cores"] = round(busy, 2)
d["irq_cores"] = round(irq, 2)
d["steal_cores"] = round(steal, 2)
d["other_cpu_cores"] = round(max(0.0, busy - server - d.get("client_cpu_cores", 0.0)), 2)
print(json.dumps(d))
EOF
}

log "(a) max throughput, closed loop, $CONNECTIONS connections x $CONCURRENCY streams, ${DURATION}s, $ROUNDS rounds"
for r in $(seq 1 "$ROUNDS"); do
    run throughput noop "$NOOP_PORT" "$NOOP_PID" --concurrency "$CONCURRENCY" --duration "$DURATION"
    run throughput tether-large "$LARGE_PORT" "$LARGE_PID" --concurrency "$CONCURRENCY" --duration "$DURATION"
done

log "(b) p99 at $RATE req/s, open loop, tether with $PROFILES profiles (and the no-op server for reference), ${RATE_DURATION}s, $ROUNDS runs"
for r in $(seq 1 "$ROUNDS"); do
    run rate noop "$NOOP_PORT" "$NOOP_PID" --rate "$RATE" --duration "$RATE_DURATION" --threads 1
    run rate tether-large "$LARGE_PORT" "$LARGE_PID" --rate "$RATE" --duration "$RATE_DURATION" --threads 1
done

log "(c) p99 at $RATE req/s, $SMALL_PROFILES vs $PROFILES profiles, alternating, $SCALE_ROUNDS runs each"
for r in $(seq 1 "$SCALE_ROUNDS"); do
    run scale tether-small "$SMALL_PORT" "$SMALL_PID" --rate "$RATE" --duration "$RATE_DURATION" --threads 1
    run scale tether-large "$LARGE_PORT" "$LARGE_PID" --rate "$RATE" --duration "$RATE_DURATION" --threads 1
done
for pid in "${ALL[@]}"; do kill -CONT "$pid"; done

log "index refreshes of the $PROFILES-profile server (tether_index_age_seconds, 3 samples 1 s apart):"
for _ in 1 2 3; do
    python3 -c 'import sys,urllib.request; print([l for l in urllib.request.urlopen(sys.argv[1]).read().decode().splitlines() if l.startswith("tether_index_age_seconds")][0])' \
        "http://127.0.0.1:$LARGE_METRICS/metrics" >&2 || true
    sleep 1
done

set +e
python3 - "$RESULTS" "$PROFILES" "$SMALL_PROFILES" "$RATE" "$CONNECTIONS" "$CONCURRENCY" <<'EOF' | tee "$BENCH_DIR/summary.txt"
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
large, small, rate, conns, conc = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
def pick(kind, label):
    return [r for r in rows if r.get("kind") == kind and r.get("label") == label]
def med(rs, key):
    return statistics.median(r[key] for r in rs)
def runs(rs, key):
    return ", ".join(str(r[key]) for r in rs)
errors = sum(r.get("errors", 0) for r in rows)
idle = {r["label"]: r["idle_cpu_pct"] for r in rows if r.get("kind") == "idle"}
noop, tl = pick("throughput", "noop"), pick("throughput", "tether-large")
rl = pick("rate", "tether-large")
rn = pick("rate", "noop")
ss, sl = pick("scale", "tether-small"), pick("scale", "tether-large")
thr_ratio = med(tl, "throughput_rps") / med(noop, "throughput_rps")
p99_rate = med(rl, "p99_us")
scale_ratio = med(sl, "p99_us") / med(ss, "p99_us")
ok = lambda b: "PASS" if b else "FAIL"
print()
print("tether admission benchmark: HTTP/2 over TLS, %s kept-alive connections, body %s" % (conns, "pod-create-replicaset-initcontainers.json (enforce: patch injected)"))
print()
print("%-58s %-40s %s" % ("measure", "runs", "median"))
print("%-58s %-40s %.0f" % ("(a) no-op server, max throughput, req/s (%s x %s streams)" % (conns, conc), runs(noop, "throughput_rps"), med(noop, "throughput_rps")))
print("%-58s %-40s %.0f" % ("(a) tether, %s profiles, max throughput, req/s" % large, runs(tl, "throughput_rps"), med(tl, "throughput_rps")))
print("%-58s %-40s %.0f" % ("(a) tether, %s profiles, p99 at max throughput, us" % large, runs(tl, "p99_us"), med(tl, "p99_us")))
# Rounds alternate, so a round's share compares the two servers under the same
# phase of the machine: how far they spread says how firm the verdict is.
shares = [100 * t["throughput_rps"] / n["throughput_rps"] for n, t in zip(noop, tl)]
print("%-58s %-40s %.1f" % ("(a) tether's share round by round, %% (%d of %d at >= 70)" % (sum(s >= 70 for s in shares), len(shares)),
      ", ".join("%.1f" % s for s in shares), statistics.median(shares)))
print("%-58s %-40s %.0f" % ("(b) tether, %s profiles, p99 at %s req/s, us" % (large, rate), runs(rl, "p99_us"), p99_rate))
print("%-58s %-40s %.0f" % ("(b) tether, %s profiles, p50 at %s req/s, us" % (large, rate), runs(rl, "p50_us"), med(rl, "p50_us")))
if rn:
    print("%-58s %-40s %.0f" % ("(b) no-op server (reference), p99 at %s req/s, us" % rate, runs(rn, "p99_us"), med(rn, "p99_us")))
    print("%-58s %-40s %.0f" % ("(b) no-op server (reference), p50 at %s req/s, us" % rate, runs(rn, "p50_us"), med(rn, "p50_us")))
print("%-58s %-40s %.0f" % ("(c) tether, %s profiles, p99 at %s req/s, us" % (small, rate), runs(ss, "p99_us"), med(ss, "p99_us")))
print("%-58s %-40s %.0f" % ("(c) tether, %s profiles, p99 at %s req/s, us" % (large, rate), runs(sl, "p99_us"), med(sl, "p99_us")))
for name in ("tether-large", "tether-small", "noop"):
    if name in idle:
        print("%-58s %-40s %.1f" % ("idle CPU of %s, %% of one core" % name, "", idle[name]))
print("%-58s %-40s %d" % ("errors (all runs; non-200 and transport)", "", errors))
timed = [r for r in rows if "other_cpu_cores" in r]
noisy = [r for r in timed if r["other_cpu_cores"] >= 0.3]
print("%-58s %-40s %.2f" % ("CPU of other processes during a run, cores (max of runs)", "", max(r["other_cpu_cores"] for r in timed)))
print("%-58s %-40s %d of %d" % ("runs disturbed by other processes (>= 0.3 cores)", "", len(noisy), len(timed)))
print("%-58s %-40s %.2f" % ("CPU of the server during (a), cores (tether / no-op)", "",
      med(tl, "server_cpu_cores")), "/ %.2f" % med(noop, "server_cpu_cores"))
print()
print("target                                                     measured   result")
print("%-58s %-10s %s" % ("tether throughput >= 70% of no-op", "%.1f%%" % (100 * thr_ratio), ok(thr_ratio >= 0.70)))
print("%-58s %-10s %s" % ("p99 at %s req/s (%s profiles) < 2 ms" % (rate, large), "%.2f ms" % (p99_rate / 1000), ok(p99_rate < 2000)))
print("%-58s %-10s %s" % ("p99 %s profiles within 10%% of p99 %s profiles" % (large, small), "%+.1f%%" % (100 * (scale_ratio - 1)), ok(scale_ratio <= 1.10)))
print("%-58s %-10s %s" % ("no errors", str(errors), ok(errors == 0)))
if len(noisy) * 3 > len(timed):
    print()
    print("WARNING: %d of %d runs were disturbed by other processes on this machine: these figures and verdicts" % (len(noisy), len(timed)))
    print("are unreliable; run again when the machine is quiet.")
failed = thr_ratio < 0.70 or p99_rate >= 2000 or scale_ratio > 1.10 or errors > 0
sys.exit(3 if failed else 0)
EOF
status=${PIPESTATUS[0]}
set -e
log "results: $RESULTS, summary: $BENCH_DIR/summary.txt"
if [ "$status" -ne 0 ] && [ "${BENCH_STRICT:-0}" = 1 ]; then
    exit 1
fi
exit 0
