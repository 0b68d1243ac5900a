#!/usr/bin/env bash
# One A/B run of section 19 (BENCHMARKS.md): `stack up --no-demo` from BIN_DIR on a fresh `tracehop` database
# of the local PostgreSQL, then 30 s of closed-loop checkouts (32 clients), and the CPU per checkout of
# PostgreSQL (every `postgres` process) and of the five services, from /proc; and the rows read by
# sequential scans. Usage: tools/profile/pg_cpu_run.sh LABEL BIN_DIR. It stops any running `stack up` and
# DROPS the local server's `tracehop` database first (stack up makes it again): a development machine's only.
# "Every postgres process" counts only what those processes spent: run it with nothing else using the server.
set -u
label=$1; bin=$(cd "$2" && pwd)
scratch=$(mktemp -d)
pkill -INT -f "/stack up" ; sleep 5
psql -h 127.0.0.1 -U postgres -qAtc "drop database if exists tracehop with (force)" >/dev/null
cd "$scratch" && (nohup $bin/stack up --no-demo > "$scratch/up.log" 2>&1 &)
for i in $(seq 90); do grep -q "status:" "$scratch/up.log" && break; sleep 1; done
ticks() { for p in "$@"; do awk '{print $14+$15}' /proc/$p/stat 2>/dev/null; done | awk '{s+=$1} END {print s+0}'; }
pgpids() { pgrep -x postgres; }
svcpids() { pgrep -f "^$bin/(gateway|users|billing|notifications|stripe-sim)"; }
$bin/stack load --concurrency 32 --duration-s 30 --warmup-s 3 --lookup-share 0 > "$scratch/load.log" 2>&1 &
LP=$!
sleep 3
pa=$(ticks $(pgpids)); sa=$(ticks $(svcpids)); n0=$(psql -h 127.0.0.1 -U postgres -d tracehop -qAtc "select count(*) from transactions")
wait $LP
pb=$(ticks $(pgpids)); sb=$(ticks $(svcpids)); n1=$(psql -h 127.0.0.1 -U postgres -d tracehop -qAtc "select count(*) from transactions")
seq=$(psql -h 127.0.0.1 -U postgres -d tracehop -qAtc "select string_agg(relname||' '||seq_tup_read, ', ' order by relname) from pg_stat_user_tables where relname in ('notifications','outbox','transactions')")
n=$((n1-n0))
per() { awk -v t="$1" -v n="$n" 'BEGIN { printf "%.3f", t * 1000 / 100 / n }'; }  # clock ticks of 10 ms
echo "$label | $(grep -o '[0-9.]* ok/s' "$scratch/load.log") | orders $n | PostgreSQL ms/checkout $(per $((pb-pa))) | services ms/checkout $(per $((sb-sa))) | rows read by sequential scans: $seq"
pkill -INT -f "$bin/stack up"
