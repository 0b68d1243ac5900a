#!/usr/bin/env bash
# Where each service's CPU goes, by thread, per checkout (BENCHMARKS.md, section 22): `stack up --no-demo` from
# BIN_DIR on a fresh `tracehop` database of the local PostgreSQL, then 20 s of closed-loop checkouts (32
# clients), and each thread's CPU (`/proc/<pid>/task/*/stat`, threads of one name summed) and context switches
# per checkout. Extra arguments are set in the stack's environment, e.g. OTEL_SDK_DISABLED=true for the
# untraced side. Usage: tools/profile/threads_run.sh LABEL BIN_DIR [NAME=VALUE...]. Like pg_cpu_run.sh, it
# stops any running `stack up` and DROPS the local server's `tracehop` database first: a development
# machine's only. A thread counts only if it is alive at both readings (taken 3 s into the load and at its
# end): under steady load the pools keep theirs, but CPU of a thread that started or exited in between is
# left out. The last line is the whole machine's CPU per checkout between the same readings (`/proc/stat`:
# every process, PostgreSQL, NATS, the collector and the load generator included) and its idle share.
set -u
label=$1; bin=$(cd "$2" && pwd); shift 2
scratch=$(mktemp -d)
pkill -INT -f "/stack up" ; sleep 4
psql -h 127.0.0.1 -U postgres -qAtc "drop database if exists tracehop with (force)" >/dev/null 2>&1
cd "$scratch" && (env "$@" nohup "$bin/stack" up --no-demo > "$scratch/up.log" 2>&1 &)
for i in $(seq 90); do grep -q "status:" "$scratch/up.log" && break; sleep 1; done
snapshot() {
  for p in $(pgrep -f "^$bin/(gateway|users|billing|notifications|stripe-sim)"); do
    n=$(basename "$(readlink /proc/$p/exe)")
    for t in /proc/$p/task/*; do
      echo "$n $(tr ' ' _ < $t/comm) $(awk '{print $14+$15}' $t/stat) $(grep -E '^(voluntary|nonvoluntary)' $t/status | awk '{s+=$2} END {print s}')"
    done
  done | awk '{k=$1"/"$2; c[k]+=$3; w[k]+=$4} END {for (k in c) print k, c[k], w[k]}' | sort
}
"$bin/stack" load --concurrency 32 --duration-s 20 --warmup-s 3 --lookup-share 0 > "$scratch/load.log" 2>&1 &
load=$!
# busy and idle clock ticks of the whole machine (idle: idle + iowait)
machine() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $5+$6}' /proc/stat; }
sleep 3
read -r busy0 idle0 < <(machine)
snapshot > "$scratch/before"; n0=$(psql -h 127.0.0.1 -U postgres -d tracehop -qAtc "select count(*) from transactions")
wait $load
read -r busy1 idle1 < <(machine)
snapshot > "$scratch/after"; n1=$(psql -h 127.0.0.1 -U postgres -d tracehop -qAtc "select count(*) from transactions")
n=$((n1-n0))
[ "$n" -gt 0 ] || { echo "== $label: no orders while measured (see $scratch/load.log)"; pkill -INT -f "$bin/stack up"; exit 1; }
echo "== $label: $(grep -o '[0-9.]* ok/s' "$scratch/load.log"), $n orders while measured"
# clock ticks of 10 ms: µs per checkout = ticks * 10 000 / orders
join "$scratch/before" "$scratch/after" | awk -v n=$n '{cpu=($4-$2)*10000/n; if (cpu > 0) printf "%-40s %8.1f µs/checkout %6.2f switches/checkout\n", $1, cpu, ($5-$3)/n; total+=cpu} END {printf "%-40s %8.1f µs/checkout\n", "all five services", total}'
awk -v b=$((busy1-busy0)) -v i=$((idle1-idle0)) -v n=$n 'BEGIN {printf "%-40s %8.1f µs/checkout, %.1f%% idle\n", "the whole machine", b*10000/n, 100*i/(b+i)}'
pkill -INT -f "$bin/stack up"; sleep 3
