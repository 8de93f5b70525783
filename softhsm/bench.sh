#!/usr/bin/env bash
# One run, same token: the HSM ceiling (cryptoki directly) next to divkey over HTTP.
#   softhsm/bench.sh [SECONDS]
# Prints derivations/s with cryptoki, key requests/s through HTTP (keep-alive, loopback, wrk)
# for 1, 2, 8 and 64 connections with latency percentiles, latency at half the saturation
# rate (open loop, benches/http_rate.rs), and the server's peak RSS.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
secs="${1:-10}"
port="${DIVKEY_PORT:-18080}"
"$root/softhsm/ensure-softhsm.sh" wrk
DIVKEY_PORT=$port "$root/softhsm/dev-up.sh" --setup-only >/dev/null
dev="$root/.dev"
export SOFTHSM2_CONF="$dev/softhsm2.conf"
cd "$root"
cargo bench --quiet --bench hsm_ceiling --bench http_rate --no-run 2>/dev/null
echo "== ceiling: cryptoki directly on the token"
ceiling=0
for t in 1 2; do
  out=$(cargo bench --quiet --bench hsm_ceiling -- "$dev/divkey.toml" "$secs" "$t")
  echo "$out"
  ceiling=$(echo "$out" | awk -v best="$ceiling" '{for (i=1;i<NF;i++) if ($(i+1)=="derivations/s") v=$i} END {print (v>best ? v : best)}')
done

. "$root/softhsm/load-target.sh" bench
echo "== one key request (curl, new connection each, 20 runs)"
for _ in $(seq 20); do curl -s -o /dev/null -w '%{time_total}\n' -H "$H" "$URL"; done |
  python3 -c 'import sys; v=sorted(float(x)*1000 for x in sys.stdin); print(f"median {v[len(v)//2]:.2f} ms, min {v[0]:.2f} ms")'
echo "== HTTP key requests (wrk, keep-alive, loopback)"
saturation=0
for c in 1 2 8 64; do
  t=$(( c < 2 ? 1 : 2 ))
  out=$(wrk -t"$t" -c"$c" -d"${secs}s" --latency -H "$H" "$URL")
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p50=$(echo "$out" | awk '$1=="50%" {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  errs=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
  echo "connections=$c requests/s=$rps p50=$p50 p99=$p99 non2xx=${errs:-0}"
  saturation=$(awk -v a="$saturation" -v b="$rps" 'BEGIN {print (b>a ? b : a)}')
done
awk -v s="$saturation" -v c="$ceiling" 'BEGIN {printf "saturation %.0f requests/s = %.2f of the ceiling (%.0f derivations/s)\n", s, s/c, c}'
half=$(awk -v s="$saturation" 'BEGIN {printf "%.0f", s/2}')
echo "== latency at half the saturation rate (open loop, 8 keep-alive connections)"
cargo bench --quiet --bench http_rate -- "$URL" "$H" "$half" 8 "$secs"
echo "== server peak RSS: $(awk '/VmHWM/ {print $2, $3}' /proc/$pid/status)"
