#!/usr/bin/env bash
# RSS and HSM objects over a long run at half the saturation rate.
#   softhsm/soak.sh [SECONDS]     (default 600)
# Measures the saturation rate (wrk, 64 connections, 5 s), then holds half of it open loop
# (benches/http_rate.rs, 8 keep-alive connections) for SECONDS. Prints the server's RSS every
# 30 s, its first and last value, the peak, the number of objects on the token before and
# after, and the HSM sessions divkey holds open (from /metrics) at the start and the end.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
secs="${1:-600}"
port="${DIVKEY_PORT:-18081}"
"$root/softhsm/ensure-softhsm.sh" wrk
DIVKEY_PORT=$port "$root/softhsm/dev-up.sh" --setup-only >/dev/null
dev="$root/.dev"
export SOFTHSM2_CONF="$dev/softhsm2.conf"
bin="$root/target/release/divkey"
objects() { "$bin" keys list --config "$dev/divkey.toml" | tail -n +2 | wc -l; }
before=$(objects)
cd "$root"
cargo bench --quiet --bench http_rate --no-run 2>/dev/null
. "$root/softhsm/load-target.sh" soak
saturation=$(wrk -t2 -c64 -d5s -H "$H" "$URL" | awk '/Requests\/sec/ {print $2}')
half=$(awk -v s="$saturation" 'BEGIN {printf "%.0f", s/2}')
sessions() { curl -s "http://127.0.0.1:$port/metrics" | awk '$1=="divkey_hsm_sessions" {print $2}'; }
sessions_before=$(sessions)
echo "saturation $saturation requests/s; soaking at $half requests/s for $secs s"
cargo bench --quiet --bench http_rate -- "$URL" "$H" "$half" 8 "$secs" > "$dev/soak-load.txt" &
wrkpid=$!
: > "$dev/soak-rss.txt"
while kill -0 $wrkpid 2>/dev/null; do
  awk '/VmRSS/ {print $2}' /proc/$pid/status >> "$dev/soak-rss.txt"
  sleep 30
done
wait $wrkpid
cat "$dev/soak-load.txt"
echo "RSS kB every 30 s: $(tr '\n' ' ' < "$dev/soak-rss.txt")"
echo "RSS first $(head -1 "$dev/soak-rss.txt") kB, last $(tail -1 "$dev/soak-rss.txt") kB, peak $(awk '/VmHWM/ {print $2}' /proc/$pid/status) kB"
echo "token objects before $before, after $(objects)"
echo "HSM sessions open at the start $sessions_before, at the end $(sessions)"
