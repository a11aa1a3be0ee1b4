#!/usr/bin/env bash
# The soak test of `tether serve` (issue #8): a long run at a steady rate with
# valid and invalid AdmissionReviews mixed, watching errors and memory.
#
#   bash bench/soak.sh
#
# Builds tether and the load generator (release), creates a CA and serving
# certificate, builds a profile store of PROFILES workloads with gen-store.py,
# starts `tether serve` on it (enforce mode), checks every body once, then runs
# two open-loop loadgen instances side by side for SOAK_SECONDS over HTTP/2:
#
#   - valid reviews at VALID_RATE req/s: the AdmissionReview v1 fixtures of
#     tests/data/admission (re-encoded compact, as the API server sends them),
#     sent in turn; every answer must be 200;
#   - invalid bodies at INVALID_RATE req/s: not JSON, a wrong apiVersion, an
#     AdmissionReview with no request, a truncated review, and a bare
#     AdmissionRequest without its envelope; every answer must be 400.
#
# The server's RSS (VmRSS) is sampled every RSS_EVERY seconds. The verdict:
# zero errors on valid requests, every invalid one answered 400, and RSS at the
# end less than 10% above RSS at WARMUP seconds (after the warm-up).
#
# Knobs (environment): SOAK_SECONDS (600), VALID_RATE (450), INVALID_RATE (50),
# WARMUP (60), RSS_EVERY (10), PROFILES (1000), CONNECTIONS (2 per loadgen),
# SOAK_DIR (a fresh temporary directory), NO_BUILD=1 (use the binaries already
# in target/release, or in CARGO_TARGET_DIR). Results: SOAK_DIR/valid.json,
# SOAK_DIR/invalid.json (loadgen's JSON lines), SOAK_DIR/rss.tsv and
# SOAK_DIR/summary.txt. Exits 1 on FAIL.

set -euo pipefail

cd "$(dirname "$0")/.."
. bench/common.sh
REPO=$(pwd)

SOAK_SECONDS=${SOAK_SECONDS:-600}
VALID_RATE=${VALID_RATE:-450}
INVALID_RATE=${INVALID_RATE:-50}
WARMUP=${WARMUP:-60}
RSS_EVERY=${RSS_EVERY:-10}
PROFILES=${PROFILES:-1000}
CONNECTIONS=${CONNECTIONS:-2}
SOAK_DIR=${SOAK_DIR:-$(mktemp -d /tmp/tether-soak.XXXXXX)}
mkdir -p "$SOAK_DIR"

TARGET=${CARGO_TARGET_DIR:-$REPO/target}
TETHER=$TARGET/release/tether
LOADGEN=$TARGET/release/loadgen

log() { printf '[soak %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT

log "results in $SOAK_DIR"
if [ "${NO_BUILD:-0}" != 1 ]; then
    log "building (release): tether, tether-loadgen"
    cargo build --release -q -p tether -p tether-loadgen
fi

log "bodies"
VALID=$SOAK_DIR/valid
INVALID=$SOAK_DIR/invalid
mkdir -p "$VALID" "$INVALID"
python3 - "$REPO/tests/data/admission" "$VALID" "$INVALID" <<'EOF'
import glob, json, os, sys
src, valid, invalid = sys.argv[1:4]
compact = lambda v: json.dumps(v, separators=(",", ":"))
n = 0
for path in sorted(glob.glob(os.path.join(src, "**", "*.json"), recursive=True)):
    review = json.load(open(path))
    name = os.path.basename(path)
    if review.get("kind") == "AdmissionReview" and "request" in review:
        # What the API server sends: compact JSON.
        open(os.path.join(valid, name), "w").write(compact(review))
        n += 1
        base = review
    else:
        # An AdmissionRequest without its envelope (as some test suites store
        # them): not what the API server sends.
        open(os.path.join(invalid, "bare-request-" + name), "w").write(compact(review))
if n == 0:
    sys.exit("no AdmissionReview fixture under " + src)
body = compact(base)
open(os.path.join(invalid, "not-json.txt"), "w").write("this is not JSON\n")
open(os.path.join(invalid, "wrong-apiversion.json"), "w").write(compact(dict(base, apiVersion="admission.k8s.io/v1beta1")))
open(os.path.join(invalid, "no-request.json"), "w").write(compact({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}))
open(os.path.join(invalid, "truncated.json"), "w").write(body[: len(body) // 2])
open(os.path.join(invalid, "empty.json"), "w").write("")
EOF
VALID_ARGS=()
for f in "$VALID"/*; do VALID_ARGS+=(--body "$f"); done
INVALID_ARGS=()
for f in "$INVALID"/*; do INVALID_ARGS+=(--body "$f"); done
log "valid bodies: $(ls "$VALID" | tr '\n' ' ')"
log "invalid bodies: $(ls "$INVALID" | tr '\n' ' ')"

log "certificates"
"$TETHER" certs init --out "$SOAK_DIR/pki" --san localhost --force >/dev/null

log "store: $PROFILES workload profiles"
python3 bench/gen-store.py --count "$PROFILES" --store "$SOAK_DIR/store" --tether "$TETHER"

PORT=$(free_port)
METRICS=$(free_port)
"$TETHER" serve --store "$SOAK_DIR/store" --tls-cert "$SOAK_DIR/pki/tls.crt" --tls-key "$SOAK_DIR/pki/tls.key" \
    --listen "127.0.0.1:$PORT" --metrics-listen "127.0.0.1:$METRICS" --default-mode enforce \
    --drain-seconds 1 >"$SOAK_DIR/tether.log" 2>&1 &
SERVER=$!
PIDS+=("$SERVER")
for _ in $(seq 1 300); do
    if python3 -c 'import sys,urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
        "http://127.0.0.1:$METRICS/readyz" 2>/dev/null; then
        break
    fi
    kill -0 "$SERVER" 2>/dev/null || { log "tether serve exited: $(cat "$SOAK_DIR/tether.log")"; exit 1; }
    sleep 0.1
done
URL=https://localhost:$PORT/mutate

# Every body once, before the load: a valid one the server refuses (or an
# invalid one it accepts) would make the soak's error counts meaningless.
log "checking each body once"
"$LOADGEN" --once --url "$URL" --ca "$SOAK_DIR/pki/ca.crt" "${VALID_ARGS[@]}" >"$SOAK_DIR/valid.answers"
python3 - "$SOAK_DIR/valid.answers" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    res = json.loads(line)["response"]
    assert res["allowed"] is True, res
EOF
"$LOADGEN" --once --url "$URL" --ca "$SOAK_DIR/pki/ca.crt" --expect-status 400 "${INVALID_ARGS[@]}" \
    >"$SOAK_DIR/invalid.answers"

rss_kb() { awk '/^VmRSS:/{print $2}' "/proc/$1/status"; }

log "soak: ${SOAK_SECONDS}s, valid at $VALID_RATE req/s, invalid at $INVALID_RATE req/s; RSS every ${RSS_EVERY}s"
START=$(date +%s)
printf 'seconds\trss_kb\n' >"$SOAK_DIR/rss.tsv"
printf '0\t%s\n' "$(rss_kb "$SERVER")" >>"$SOAK_DIR/rss.tsv"
"$LOADGEN" --url "$URL" --ca "$SOAK_DIR/pki/ca.crt" "${VALID_ARGS[@]}" --rate "$VALID_RATE" \
    --duration "$SOAK_SECONDS" --warmup 0 --connections "$CONNECTIONS" --threads 1 --label valid \
    >"$SOAK_DIR/valid.json" 2>"$SOAK_DIR/valid.err" &
VALID_PID=$!
PIDS+=("$VALID_PID")
"$LOADGEN" --url "$URL" --ca "$SOAK_DIR/pki/ca.crt" "${INVALID_ARGS[@]}" --expect-status 400 --rate "$INVALID_RATE" \
    --duration "$SOAK_SECONDS" --warmup 0 --connections "$CONNECTIONS" --threads 1 --label invalid \
    >"$SOAK_DIR/invalid.json" 2>"$SOAK_DIR/invalid.err" &
INVALID_PID=$!
PIDS+=("$INVALID_PID")
next=$RSS_EVERY
while kill -0 "$VALID_PID" 2>/dev/null || kill -0 "$INVALID_PID" 2>/dev/null; do
    now=$(($(date +%s) - START))
    if [ "$now" -ge "$next" ] && [ "$now" -le "$SOAK_SECONDS" ]; then
        printf '%s\t%s\n' "$now" "$(rss_kb "$SERVER")" >>"$SOAK_DIR/rss.tsv"
        next=$((next + RSS_EVERY))
    fi
    sleep 1
done
set +e
wait "$VALID_PID"
valid_rc=$?
wait "$INVALID_PID"
invalid_rc=$?
kill -0 "$SERVER" 2>/dev/null
server_alive=$?
set -e
log "loadgen exit codes: valid $valid_rc, invalid $invalid_rc; server alive: $([ "$server_alive" = 0 ] && echo yes || echo NO)"

set +e
python3 - "$SOAK_DIR" "$WARMUP" "$valid_rc" "$invalid_rc" "$server_alive" <<'EOF' | tee "$SOAK_DIR/summary.txt"
import json, sys
d, warmup = sys.argv[1], int(sys.argv[2])
valid_rc, invalid_rc, server_alive = (int(x) for x in sys.argv[3:6])
def load(name):
    try:
        return json.loads(open("%s/%s.json" % (d, name)).read().strip().splitlines()[-1])
    except Exception as e:
        return {"errors": -1, "first_error": "no result: %s" % e}
v, i = load("valid"), load("invalid")
rows = [l.split("\t") for l in open(d + "/rss.tsv").read().splitlines()[1:]]
rss = [(int(s), int(kb)) for s, kb in rows if kb]
after = [kb for s, kb in rss if s >= warmup]
base = after[0] if after else None
end = rss[-1][1] if rss else None
growth = (end - base) * 100.0 / base if base else float("inf")
ok = lambda b: "PASS" if b else "FAIL"
print()
print("tether soak: %s s, valid %s req/s + invalid %s req/s, HTTP/2 over TLS" % (
    v.get("duration_s"), v.get("rate"), i.get("rate")))
print("valid:   %s requests, %s errors, statuses %s, p50 %s us, p99 %s us, max %s us%s" % (
    v.get("requests"), v.get("errors"), v.get("statuses"), v.get("p50_us"), v.get("p99_us"), v.get("max_us"),
    (", first error: " + v["first_error"]) if "first_error" in v else ""))
print("invalid: %s requests, %s not answered 400, statuses %s, p99 %s us%s" % (
    i.get("requests"), i.get("errors"), i.get("statuses"), i.get("p99_us"),
    (", first error: " + i["first_error"]) if "first_error" in i else ""))
print("RSS (KiB), every sample: %s" % " ".join(str(kb) for _, kb in rss))
print("RSS at start %s KiB, at %s s (after warm-up) %s KiB, at the end %s KiB: growth %+.1f%%" % (
    rss[0][1] if rss else None, warmup, base, end, growth))
print()
checks = [
    ("zero errors on valid requests", v.get("errors") == 0 and v.get("requests", 0) > 0 and valid_rc == 0),
    ("every invalid request answered 400", i.get("errors") == 0 and i.get("requests", 0) > 0 and invalid_rc == 0),
    ("RSS growth after warm-up < 10%", growth < 10.0),
    ("the server is still running", server_alive == 0),
]
for name, good in checks:
    print("%-40s %s" % (name, ok(good)))
passed = all(g for _, g in checks)
print("\nsoak: %s" % ok(passed))
sys.exit(0 if passed else 1)
EOF
status=${PIPESTATUS[0]}
set -e
log "results: $SOAK_DIR (valid.json, invalid.json, rss.tsv, summary.txt)"
exit "$status"
