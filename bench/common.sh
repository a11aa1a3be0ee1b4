# Shared by the benchmark scripts (sourced, not run): what they must do alike so
# their figures compare — above all, `tether serve` started with the same flags
# by admission.sh and ab.sh.

# A free TCP port on 127.0.0.1 (free when asked; the server binds it just after).
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# Writes the JSON file $1 compactly to $2: the fixtures are stored indented for
# reading, and the API server sends compact JSON (Go's encoding/json), 4.3 KB
# instead of 6.6 KB for the review the benchmarks send: send what it sends.
compact_json() { # in out
    python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1])), separators=(",", ":")))' "$1" >"$2"
}

# Sets SERVE_ARGS to the arguments of `tether serve` as the admission benchmarks
# measure it: enforce mode, a JSON log line per admission at info (written to
# wherever the caller sends stderr), a 1 s drain.
tether_serve_args() { # store pki-dir port metrics-port
    SERVE_ARGS=(serve --store "$1" --tls-cert "$2/tls.crt" --tls-key "$2/tls.key"
        --listen "127.0.0.1:$3" --metrics-listen "127.0.0.1:$4" --default-mode enforce
        --drain-seconds 1 --log-level info --log-format json)
}
