#!/usr/bin/env bash
# A/B of admission servers: the same closed-loop load on each in turn, rounds
# alternating, one server running at a time, medians per server. For measuring
# one change against another build (or another setting) in the same run, on a
# machine too noisy for figures taken at different times to compare.
#
#   bash bench/ab.sh LABEL=KIND:BINARY[:VAR=VALUE,...] ...
#
# KIND is `tether` (started as `BINARY serve` on a store of PROFILES workloads,
# enforce mode, JSON log to a file, as bench/admission.sh starts it) or `noop`
# (the no-op server's command line). VAR=VALUE pairs go into that server's
# environment. A relative BINARY is taken from the repository root. Example:
# the no-op server, tether as built, and a saved build:
#
#   bash bench/ab.sh noop=noop:target/release/noop-server \
#       new=tether:target/release/tether old=tether:/tmp/tether-before
#
# Per run it prints req/s, the server's CPU per request (its CPU time over the
# run's wall time, warm-up included, divided by the measured req/s, as
# admission.sh reports it), the client's, the server's minor page faults per
# request and the p99; then the medians, each server's throughput as a share
# of the first one's, and the median (and range) of that share taken round by
# round, which a machine whose speed drifts during the run disturbs less.
#
# Knobs (environment): ROUNDS (4), DURATION (6 s), WARMUP (1 s), CONNECTIONS (2),
# CONCURRENCY (8 streams per connection), PROFILES (10000), VARIANTS (1: how
# many different request bodies are sent in turn, each with its own value of
# the pod label bench.tether.dev/variant; more variants than tether's
# --decision-cache-entries, e.g. VARIANTS=2 against
# TETHER_DECISION_CACHE_ENTRIES=1, make every admission a cache miss), AB_DIR
# (/tmp/tether-ab: certificates, store and request body, made once and reused;
# the store is made again when PROFILES changes),
# LOADGEN (loadgen of CARGO_TARGET_DIR or target/, built if missing).

set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
. bench/common.sh

ROUNDS=${ROUNDS:-4}
DURATION=${DURATION:-6}
WARMUP=${WARMUP:-1}
CONNECTIONS=${CONNECTIONS:-2}
CONCURRENCY=${CONCURRENCY:-8}
PROFILES=${PROFILES:-10000}
VARIANTS=${VARIANTS:-1}
AB_DIR=${AB_DIR:-/tmp/tether-ab}
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
LOADGEN=${LOADGEN:-$TARGET/release/loadgen}
FIXTURE=$REPO/tests/data/admission/apiserver-1.35/pod-create-replicaset-initcontainers.json

if [ $# -eq 0 ]; then
    sed -n '2,34p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi

log() { printf '[ab %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# Parse every spec before starting anything: a typo fails here, not mid-run.
LABELS=() KINDS=() BINS=() ENVS=()
for spec in "$@"; do
    if [[ ! "$spec" =~ ^([A-Za-z0-9_.-]+)=(tether|noop):([^:]+)(:(.*))?$ ]]; then
        echo "bench/ab.sh: cannot read '$spec': expected LABEL=tether|noop:BINARY[:VAR=VALUE,...]" >&2
        exit 2
    fi
    for seen in "${LABELS[@]}"; do
        [ "$seen" != "${BASH_REMATCH[1]}" ] || { echo "bench/ab.sh: the label ${BASH_REMATCH[1]} is given twice; labels name the results" >&2; exit 2; }
    done
    [ -x "${BASH_REMATCH[3]}" ] || { echo "bench/ab.sh: $spec: ${BASH_REMATCH[3]} is not an executable file" >&2; exit 2; }
    LABELS+=("${BASH_REMATCH[1]}") KINDS+=("${BASH_REMATCH[2]}") BINS+=("${BASH_REMATCH[3]}") ENVS+=("${BASH_REMATCH[5]}")
done
TETHER=""
for i in "${!KINDS[@]}"; do
    if [ "${KINDS[$i]}" = tether ]; then TETHER=${BINS[$i]}; break; fi
done
TETHER=${TETHER:-$TARGET/release/tether}
[ -x "$LOADGEN" ] || cargo build --release -q -p tether-loadgen

mkdir -p "$AB_DIR"
if [ ! -s "$AB_DIR/review.json" ] || [ ! -s "$AB_DIR/pki/tls.crt" ] \
    || [ "$(cat "$AB_DIR/store.count" 2>/dev/null)" != "$PROFILES" ]; then
    [ -x "$TETHER" ] || cargo build --release -q -p tether
    log "setting up $AB_DIR: certificates, a store of $PROFILES profiles, the compact request body"
    compact_json "$FIXTURE" "$AB_DIR/review.json"
    "$TETHER" certs init --out "$AB_DIR/pki" --san localhost --force >/dev/null
    rm -rf "$AB_DIR/store"
    python3 bench/gen-store.py --count "$PROFILES" --store "$AB_DIR/store" --tether "$TETHER"
    echo "$PROFILES" >"$AB_DIR/store.count"
fi

# The bodies: the review itself, or VARIANTS copies differing in one label.
BODIES=(--body "$AB_DIR/review.json")
if [ "$VARIANTS" -gt 1 ]; then
    BODIES=()
    mkdir -p "$AB_DIR/variants"
    for v in $(seq 1 "$VARIANTS"); do
        python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); r["request"]["object"]["metadata"].setdefault("labels", {})["bench.tether.dev/variant"]=sys.argv[2]; print(json.dumps(r, separators=(",", ":")))' \
            "$AB_DIR/review.json" "$v" >"$AB_DIR/variants/$v.json"
        BODIES+=(--body "$AB_DIR/variants/$v.json")
    done
fi

PIDS=() PORTS=()
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill -CONT "$pid" 2>/dev/null || true
        kill -TERM "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap cleanup EXIT
wait_https() { # port label
    for _ in $(seq 1 300); do
        "$LOADGEN" --once --url "https://localhost:$1/mutate" --ca "$AB_DIR/pki/ca.crt" --body "$AB_DIR/review.json" \
            >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "bench/ab.sh: $2 did not answer on port $1 within 30 s; its output: $AB_DIR/$2.log" >&2
    exit 1
}

for i in "${!LABELS[@]}"; do
    label=${LABELS[$i]} port=$(free_port)
    envs=()
    [ -n "${ENVS[$i]}" ] && IFS=',' read -ra envs <<<"${ENVS[$i]}"
    if [ "${KINDS[$i]}" = tether ]; then
        tether_serve_args "$AB_DIR/store" "$AB_DIR/pki" "$port" "$(free_port)"
        env "${envs[@]}" "${BINS[$i]}" "${SERVE_ARGS[@]}" >"$AB_DIR/$label.log" 2>&1 &
    else
        env "${envs[@]}" "${BINS[$i]}" --listen "127.0.0.1:$port" --tls-cert "$AB_DIR/pki/tls.crt" \
            --tls-key "$AB_DIR/pki/tls.key" >"$AB_DIR/$label.log" 2>&1 &
    fi
    PIDS+=($!) PORTS+=("$port")
    wait_https "$port" "$label"
done
log "${#LABELS[@]} servers up; $ROUNDS rounds of ${DURATION}s (+${WARMUP}s warm-up), $CONNECTIONS x $CONCURRENCY streams, $VARIANTS request bodies"

# utime+stime ticks and minor faults of a process, and the time.
snapshot() { echo "$(awk '{print $14 + $15, $10}' "/proc/$1/stat") $(date +%s.%N)"; }
RESULTS=$AB_DIR/ab-results.jsonl
: >"$RESULTS"
for _ in $(seq 1 "$ROUNDS"); do
    for i in "${!LABELS[@]}"; do
        for j in "${!PIDS[@]}"; do
            if [ "$i" = "$j" ]; then kill -CONT "${PIDS[$j]}"; else kill -STOP "${PIDS[$j]}"; fi
        done
        before=$(snapshot "${PIDS[$i]}")
        line=$("$LOADGEN" --url "https://localhost:${PORTS[$i]}/mutate" --ca "$AB_DIR/pki/ca.crt" \
            "${BODIES[@]}" --connections "$CONNECTIONS" --concurrency "$CONCURRENCY" \
            --duration "$DURATION" --warmup "$WARMUP" --label "${LABELS[$i]}")
        after=$(snapshot "${PIDS[$i]}")
        python3 - "$line" "$before" "$after" "$RESULTS" <<'EOF'
import json, os, sys
d = json.loads(sys.argv[1])
b = [float(x) for x in sys.argv[2].split()]
a = [float(x) for x in sys.argv[3].split()]
wall, rps = a[2] - b[2], d["throughput_rps"]
d["server_us_per_req"] = round((a[0] - b[0]) / os.sysconf("SC_CLK_TCK") / wall * 1e6 / rps, 1)
d["client_us_per_req"] = round(d.get("client_cpu_cores", 0) * 1e6 / rps, 1)
d["faults_per_req"] = round((a[1] - b[1]) / wall / rps, 3)
with open(sys.argv[4], "a") as out:
    out.write(json.dumps(d) + "\n")
print("%-16s %8.0f req/s  server %5.1f us/req  client %5.1f us/req  faults %.3f/req  p99 %s us  errors %d" % (
    d["label"], rps, d["server_us_per_req"], d["client_us_per_req"], d["faults_per_req"], d["p99_us"], d["errors"]))
EOF
    done
done
for pid in "${PIDS[@]}"; do kill -CONT "$pid"; done

python3 - "$RESULTS" "${LABELS[@]}" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
labels = sys.argv[2:]
med = lambda label, key: statistics.median(r[key] for r in rows if r["label"] == label)
first = med(labels[0], "throughput_rps")
# Rounds run the servers one after the other, so each round's share against
# the first server compares runs seconds apart; its median holds up better
# than the ratio of medians when the machine's speed drifts during the run.
rounds = [rows[i:i + len(labels)] for i in range(0, len(rows), len(labels))]
def round_share(label):
    shares = [100 * r[labels.index(label)]["throughput_rps"] / r[0]["throughput_rps"] for r in rounds]
    return statistics.median(shares), min(shares), max(shares)
print()
print("%-16s %10s %10s %20s %14s %14s %8s" % ("medians", "req/s", "share", "share per round", "server us/req", "client us/req", "errors"))
for l in labels:
    errors = sum(r["errors"] for r in rows if r["label"] == l)
    m, lo, hi = round_share(l)
    print("%-16s %10.0f %9.1f%% %6.1f%% (%4.1f-%4.1f) %14.1f %14.1f %8d" % (l, med(l, "throughput_rps"),
          100 * med(l, "throughput_rps") / first, m, lo, hi,
          med(l, "server_us_per_req"), med(l, "client_us_per_req"), errors))
print("every run: %s" % sys.argv[1])
EOF
