#!/usr/bin/env bash
# RSS and HSM objects over a long run at a moderate rate (2 keep-alive connections).
#   softhsm/soak.sh [SECONDS]     (default 600)
# Prints the server's RSS every 30 s, its first and last value, the peak, and the number
# of objects on the token before and after.
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
. "$root/softhsm/load-target.sh" soak
wrk -t1 -c2 -d"${secs}s" --latency -H "$H" "$URL" > "$dev/soak-wrk.txt" &
wrkpid=$!
: > "$dev/soak-rss.txt"
while kill -0 $wrkpid 2>/dev/null; do
  awk '/VmRSS/ {print $2}' /proc/$pid/status >> "$dev/soak-rss.txt"
  sleep 30
done
grep -E "Requests/sec|50%|99%|Non-2xx" "$dev/soak-wrk.txt" || true
echo "RSS kB every 30 s: $(tr '\n' ' ' < "$dev/soak-rss.txt")"
echo "RSS first $(head -1 "$dev/soak-rss.txt") kB, last $(tail -1 "$dev/soak-rss.txt") kB, peak $(awk '/VmHWM/ {print $2}' /proc/$pid/status) kB"
echo "token objects before $before, after $(objects)"
