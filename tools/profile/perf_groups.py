#!/usr/bin/env python3
"""Where a service's CPU goes, from a `perf record --call-graph dwarf` profile (BENCHMARKS.md, section 16).

    perf record -F 999 -e cpu-clock --call-graph dwarf,16384 -p <pid> -o billing.data -- sleep 8
    perf script -i billing.data -F comm,tid,ip,sym | python3 tools/profile/perf_groups.py
    perf script -i billing.data -F comm,tid,ip,sym | python3 tools/profile/perf_groups.py --frame grow_one

Without `--frame`: the share of all samples in each group of the tracing path (a sample counts in a group
when any frame of its stack matches; the groups can overlap, "all of the above" counts each sample once).
With `--frame PATTERN`: the samples with a frame containing PATTERN, and their share.
"""

import argparse
import sys

GROUPS = [
    ("span close (on_close: the SDK's end, the spool's on_end)", lambda s: any("on_close" in f for f in s["frames"])),
    ("  of which the SDK's end and the processor's on_end", lambda s: any("ensure_ended_and_exported" in f for f in s["frames"])),
    ("the spool's export thread", lambda s: s["comm"] == "span-spool"),
    ("span creation (on_new_span, on_record)", lambda s: any("OpenTelemetryLayer" in f and ("on_new_span" in f or "on_record" in f) for f in s["frames"])),
    ("propagation (tracehop_telemetry::propagation)", lambda s: any("propagation::" in f for f in s["frames"])),
    ("first enter (on_enter)", lambda s: any("OpenTelemetryLayer" in f and "on_enter" in f for f in s["frames"])),
    ("  of which the spool's copy at start", lambda s: any("SpoolProcessor" in f and "on_start" in f for f in s["frames"])),
    ("exit (on_exit)", lambda s: any("OpenTelemetryLayer" in f and "on_exit" in f for f in s["frames"])),
    ("the JSON log layer (also untraced)", lambda s: any("json_log" in f or "fmt_layer" in f for f in s["frames"])),
]


def samples(lines):
    """Each sample of `perf script -F comm,tid,ip,sym` (or `comm,pid,tid,...`): the thread's name, the last
    field of the header line (`tid`, or `pid/tid`) and the stack's symbols, innermost first."""
    current = None
    for line in lines:
        if not line.strip():
            if current:
                yield current
            current = None
        elif current is None:
            comm, _, ids = line.strip().rpartition(" ")
            current = {"comm": comm.strip(), "ids": ids, "frames": []}
        else:
            parts = line.strip().split(" ", 1)
            current["frames"].append(parts[1] if len(parts) > 1 else "")
    if current:
        yield current


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frame", help="count the samples with a frame containing this text")
    args = parser.parse_args()
    every = list(samples(sys.stdin))
    total = len(every)
    if total == 0:
        sys.exit("no samples on standard input (perf script -F comm,tid,ip,sym)")
    print(f"{total} samples")
    if args.frame:
        hits = sum(1 for s in every if any(args.frame in f for f in s["frames"]))
        print(f"{hits:6d} {100 * hits / total:5.1f}%  a frame containing {args.frame!r}")
        return
    counted = set()
    for name, matches in GROUPS:
        hits = [i for i, s in enumerate(every) if matches(s)]
        if not name.startswith("  "):
            counted.update(hits)
        print(f"{len(hits):6d} {100 * len(hits) / total:5.1f}%  {name}")
    print(f"{len(counted):6d} {100 * len(counted) / total:5.1f}%  all of the above")


if __name__ == "__main__":
    main()
