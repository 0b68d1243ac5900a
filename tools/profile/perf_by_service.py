#!/usr/bin/env python3
"""Where each service's CPU goes per checkout, from one `perf record` of all five services at load
(BENCHMARKS.md, section 22).

    pids=$(pgrep -f 'release/(gateway|users|billing|notifications|stripe-sim)' | paste -sd,)
    perf record -F 999 -e cpu-clock --call-graph dwarf,16384 -p "$pids" -o all.data -- sleep 8
    perf script -i all.data -F comm,pid,tid,ip,sym | python3 tools/profile/perf_by_service.py --seconds 8 --rate 385

`--rate` is the checkouts per second the load generator reported over the run. A sample counts in a group
when a frame of its stack matches (groups overlap); each figure is microseconds of CPU per checkout
(samples / seconds / rate / sampling frequency).
"""

import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from perf_groups import samples  # noqa: E402  (the same reading of `perf script`)

SERVICES = ["gateway", "users", "billing", "notifications", "stripe_sim"]


def has(frames, text):
    return any(text in frame for frame in frames)


GROUPS = [
    ("the OpenTelemetry layer's callbacks and span start",
     lambda f: has(f, "OpenTelemetryLayer<S,T> as tracing_subscriber::layer::Layer<S>>::") or has(f, "start_cx")),
    ("  of which the spool (on_start, on_end, expose)", lambda f: has(f, "SpoolProcessor") or has(f, "spool::Shared::")),
    ("propagation (tracehop_telemetry::propagation)", lambda f: has(f, "tracehop_telemetry::propagation")),
    ("the spool's export thread", None),
    ("JSON log lines: formatting", lambda f: has(f, "format_event<")),
    ("JSON log lines: all of the fmt layer's on_event", lambda f: has(f, "fmt_layer::{impl#13}::on_event")),
    ("EnvFilter's per-span bookkeeping", lambda f: has(f, "EnvFilter::on_") or has(f, "EnvFilter::cares_about_span")),
    ("the registry (span slab, current span)", lambda f: has(f, "sharded::Registry as tracing_core::subscriber::Subscriber>::")),
    ("system calls", lambda f: has(f, "entry_SYSCALL")),
    ("malloc and free (leaf frame)",
     lambda f: bool(f) and any(k in f[0] for k in ["malloc", "free", "_int_", "tcache", "consolidate", "unlink_chunk"])),
]


def service_of(stacks):
    for stack in stacks[:500]:
        for frame in stack["frames"]:
            for name in SERVICES:
                if frame.startswith(name + "::") or ("<" + name + "::") in frame:
                    return name
    return "?"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, required=True, help="how long perf recorded")
    parser.add_argument("--rate", type=float, required=True, help="checkouts per second during the recording")
    parser.add_argument("--frequency", type=float, default=999, help="perf's -F")
    args = parser.parse_args()
    per_process = collections.defaultdict(list)
    for sample in samples(sys.stdin):
        per_process[sample["ids"].split("/")[0]].append(sample)
    if not per_process:
        sys.exit("no samples on standard input (perf script -F comm,pid,tid,ip,sym)")

    def us(count):
        return count / args.seconds / args.rate * 1e6 / args.frequency

    total = 0
    for pid, stacks in sorted(per_process.items(), key=lambda item: -len(item[1])):
        total += len(stacks)
        print(f"{service_of(stacks)} (pid {pid}): {us(len(stacks)):.1f} µs per checkout")
        for name, matches in GROUPS:
            if matches is None:
                count = sum(1 for s in stacks if s["comm"].startswith("span-spool"))
            else:
                count = sum(1 for s in stacks if matches(s["frames"]))
            print(f"  {name:55s} {us(count):7.1f}")
    print(f"all: {us(total):.1f} µs per checkout")


if __name__ == "__main__":
    main()
