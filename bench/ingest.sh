#!/usr/bin/env bash
# Ingest benchmark: on the same generated Tetragon export, in one run, times
#   wc -l                      the I/O floor
#   jq | sort | uniq -c        the usual pipeline: syscall ids counted per workload
#   tether build               baselines for every workload, profiles rendered
# alternating the three (the machine is shared and noisy) and reporting medians,
# ratios and peak RSS; then tether alone on a 4x larger file (memory must stay flat).
#
# Usage: bash bench/ingest.sh [BYTES]     (default 1 GiB; WORK=/path to keep files elsewhere)
set -euo pipefail
cd "$(dirname "$0")/.."
BYTES=${1:-1073741824}
ROUNDS=${ROUNDS:-3}
WORK=${WORK:-/tmp/tether-ingest-bench}
mkdir -p "$WORK"
command -v jq >/dev/null || { echo "jq is needed: apt-get install -y jq" >&2; exit 2; }
cargo build --release -q -p tether
# Built where cargo builds: target/, or CARGO_TARGET_DIR (as admission.sh and soak.sh).
TETHER=${CARGO_TARGET_DIR:-$PWD/target}/release/tether

gen() { # FILE BYTES
    if [ ! -f "$1" ] || [ "$(stat -c %s "$1")" -lt "$2" ]; then
        "$TETHER" bench gen-tetragon --bytes "$2" --out "$1"
    fi
}
FILE=$WORK/tetragon-$BYTES.jsonl
BIG=$WORK/tetragon-$((BYTES * 4)).jsonl
gen "$FILE" "$BYTES"
gen "$BIG" $((BYTES * 4))
cat "$FILE" > /dev/null  # page cache: every contender reads from memory

JQ='select(.process_tracepoint != null) | .process_tracepoint as $t
    | [$t.process.pod.namespace // "-", $t.process.pod.workload // "-", $t.process.pod.container.name // "-",
       ($t.args[0] | (.syscall_id.id // .size_arg // .long_arg))] | @tsv'

# run NAME CMD...: appends "seconds maxrss_kib" to $WORK/NAME.times
run() {
    local name=$1; shift
    /usr/bin/time -f "%e %M" -o "$WORK/.t" "$@" > /dev/null 2>&1
    cat "$WORK/.t" >> "$WORK/$name.times"
}
rm -f "$WORK"/*.times
for i in $(seq "$ROUNDS"); do
    run wc wc -l "$FILE"
    run jq bash -c "jq -r '$JQ' '$FILE' | sort | uniq -c"
    rm -rf "$WORK/store"
    run tether "$TETHER" build --from "$FILE" --store "$WORK/store" --json
done
rm -rf "$WORK/store-big"
cat "$BIG" > /dev/null || true
run tether4x "$TETHER" build --from "$BIG" --store "$WORK/store-big" --json
run wc4x wc -l "$BIG"

median() { sort -n "$WORK/$1.times" | awk '{print $1}' | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
maxrss() { sort -n -k2 "$WORK/$1.times" | tail -1 | awk '{printf "%.1f", $2/1024}'; }
python3 - "$BYTES" "$(median wc)" "$(median jq)" "$(median tether)" "$(maxrss tether)" \
    "$(median tether4x)" "$(maxrss tether4x)" "$(median wc4x)" "$(nproc)" <<'PY'
import sys
b, wc, jq, t, rss, t4, rss4, wc4, cores = sys.argv[1:]
b = int(b); wc, jq, t, t4, wc4 = map(float, (wc, jq, t, t4, wc4))
mib = b / 2**20
# /usr/bin/time reports hundredths of a second: on a small input a fast run
# reads 0.00 s, which has no rate and no ratio.
def rate(mib, s):
    return f"{mib/s:8.0f} MiB/s" if s > 0 else "   (under 0.01 s: too small to time; use a larger input)"
def ratio(a, b, fmt, what):
    return format(a / b, fmt) + what if a > 0 and b > 0 else "n/a (a run took under 0.01 s)"
print(f"input {mib:.0f} MiB, {cores} cores, medians of the rounds")
print(f"  wc -l          {wc:7.2f} s  {rate(mib, wc)}")
print(f"  jq pipeline    {jq:7.2f} s  {rate(mib, jq)}")
print(f"  tether build   {t:7.2f} s  {rate(mib, t)}  peak RSS {rss} MiB")
print(f"  tether vs jq: {ratio(jq, t, '.1f', 'x faster')} (target >= 10x, aim 25x)")
print(f"  tether vs wc -l: {ratio(wc, t, '.2f', ' of its throughput')} (aim 0.25)")
print(f"  4x input: tether {t4:.2f} s ({rate(4 * mib, t4).strip()}), peak RSS {rss4} MiB (target < 100 MiB, flat); wc -l {wc4:.2f} s")
PY
