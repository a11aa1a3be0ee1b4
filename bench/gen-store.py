#!/usr/bin/env python3
"""Builds a tether profile store holding COUNT workload profiles, for the benchmark.

The store is built the real way: Tetragon export lines are generated (the shapes of
tests/data/demo/shop-events.jsonl: a process_exec, then raw_syscalls/sys_enter
tracepoints and syscall kprobes per container) and fed to `tether build`.

It always contains the five workloads of tests/data/demo/shop-events.jsonl (among
them shop/deployment/checkout with containers app, envoy and init container migrate,
the workload of the benchmark's AdmissionReview), plus COUNT - 5 synthetic
Deployment containers spread over namespaces `bench-NNN` (two containers per
Deployment, 50 Deployments per namespace), each with a few syscalls of its own.

usage: gen-store.py --count N --store DIR [--tether target/release/tether] [--repo DIR]
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

# The workload keys in tests/data/demo/shop-events.jsonl.
SHOP_WORKLOADS = 5

# x86_64 syscall numbers a typical service makes; each synthetic container gets a
# different handful, so the profiles (and their versions) differ.
SYSCALLS = [0, 1, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13, 14, 16, 17, 18, 19, 20, 21, 23, 28, 32, 33, 39, 41, 42,
            43, 44, 45, 46, 47, 49, 50, 51, 52, 54, 55, 56, 57, 59, 60, 61, 62, 63, 72, 78, 79, 80, 83, 87, 89,
            95, 96, 97, 99, 102, 104, 107, 108, 110, 186, 202, 204, 213, 217, 218, 228, 230, 232, 233, 257, 262,
            273, 281, 290, 291, 293, 302, 318, 332, 334]

CONTAINERS_PER_DEPLOYMENT = 2
DEPLOYMENTS_PER_NAMESPACE = 50


def process(ns, name, container, cid, pid):
    """The `process` object of an event, as Tetragon exports it for a pod."""
    pod_hash = "7d4b9c%04x" % (cid % 0x10000)
    cid_hex = "%064x" % cid
    return {
        "exec_id": "YmVuY2g6%d" % pid,
        "pid": pid,
        "uid": 1000,
        "cwd": "/app",
        "binary": "/usr/bin/%s" % container,
        "arguments": "--serve",
        "flags": "execve clone",
        "start_time": "2026-11-28T09:00:00Z",
        "auid": 4294967295,
        "pod": {
            "namespace": ns,
            "name": "%s-%s-x%05d" % (name, pod_hash, cid % 100000),
            "container": {
                "id": "containerd://" + cid_hex,
                "name": container,
                "image": {
                    "id": "registry.example/%s/%s@sha256:%s" % (ns, container, cid_hex),
                    "name": "registry.example/%s/%s:1.0" % (ns, container),
                },
                "start_time": "2026-11-28T09:00:00Z",
                "pid": 1,
            },
            "pod_labels": {"app": name, "pod-template-hash": pod_hash},
            "workload": name,
            "workload_kind": "Deployment",
        },
        "docker": cid_hex[-31:],
        "parent_exec_id": "YmVuY2g6cGFyZW50",
        "refcnt": 1,
        "in_init_tree": True,
    }


def events(count, rng):
    """Yields the synthetic events, one JSON line each."""
    for i in range(count):
        deployment, container_no = divmod(i, CONTAINERS_PER_DEPLOYMENT)
        ns_no, dep_no = divmod(deployment, DEPLOYMENTS_PER_NAMESPACE)
        ns = "bench-%03d" % ns_no
        name = "svc-%03d" % dep_no
        container = "c%d" % container_no
        pid = 10000 + i
        proc = process(ns, name, container, 0x200000 + i, pid)
        node = "bench-node-%d" % (i % 8)
        yield {"process_exec": {"process": proc}, "node_name": node, "time": "2026-11-28T09:00:00.000000000Z"}
        calls = rng.sample(SYSCALLS, 6)
        for k, nr in enumerate(calls):
            t = "2026-11-28T09:%02d:%02d.000000000Z" % (1 + k, (i * 7 + k) % 60)
            if k % 2 == 0:
                ev = {"process_tracepoint": {"process": proc, "subsys": "raw_syscalls", "event": "sys_enter",
                                             "args": [{"syscall_id": {"id": nr, "abi": "x64"}}],
                                             "policy_name": "raw-syscalls"}}
            else:
                ev = {"process_tracepoint": {"process": proc, "subsys": "raw_syscalls", "event": "sys_enter",
                                             "args": [{"long_arg": nr}], "policy_name": "raw-syscalls"}}
            ev["node_name"] = node
            ev["time"] = t
            yield ev
        yield {"process_exit": {"process": proc, "status": 0, "time": "2026-11-28T09:30:00Z"},
               "node_name": node, "time": "2026-11-28T09:30:00.000000000Z"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, required=True, help="workload profiles in the store (at least 5)")
    ap.add_argument("--store", required=True, help="store directory (replaced if it exists)")
    ap.add_argument("--repo", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    ap.add_argument("--tether", default=None, help="tether binary (default REPO/target/release/tether)")
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args()
    if a.count < SHOP_WORKLOADS:
        sys.exit("--count must be at least %d (the shop workloads)" % SHOP_WORKLOADS)
    tether = a.tether or os.path.join(a.repo, "target", "release", "tether")
    shop = os.path.join(a.repo, "tests", "data", "demo", "shop-events.jsonl")
    rng = random.Random(a.seed)
    if os.path.exists(a.store):
        shutil.rmtree(a.store)
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        path = f.name
        with open(shop) as s:
            shutil.copyfileobj(s, f)
        for ev in events(a.count - SHOP_WORKLOADS, rng):
            f.write(json.dumps(ev, separators=(",", ":")))
            f.write("\n")
    try:
        subprocess.run([tether, "build", "--from", path, "--store", a.store, "--json"], check=True,
                       stdout=subprocess.DEVNULL)
        out = subprocess.run([tether, "profiles", "list", "--store", a.store, "--json"], check=True,
                             capture_output=True, text=True).stdout
    finally:
        os.unlink(path)
    listed = json.loads(out)
    with_profile = sum(1 for w in listed if w.get("active"))
    if with_profile != a.count:
        sys.exit("expected %d workload profiles in %s, found %d" % (a.count, a.store, with_profile))
    print("%s: %d workload profiles" % (a.store, with_profile))


if __name__ == "__main__":
    main()
