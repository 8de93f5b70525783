#!/usr/bin/env bash
# One run, same token: the HSM ceiling (cryptoki directly) next to divkey over HTTP.
#   softhsm/bench.sh [SECONDS]
# Prints derivations/s with cryptoki, key requests/s through HTTP (keep-alive, loopback, wrk)
# for 1, 2, 8 and 64 connections with latency percentiles, and the server's peak RSS.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
secs="${1:-10}"
port="${DIVKEY_PORT:-18080}"
"$root/softhsm/ensure-softhsm.sh" wrk
DIVKEY_PORT=$port "$root/softhsm/dev-up.sh" --setup-only >/dev/null
dev="$root/.dev"
export SOFTHSM2_CONF="$dev/softhsm2.conf"
cd "$root"
cargo bench --quiet --bench hsm_ceiling --no-run 2>/dev/null
echo "== ceiling: cryptoki directly on the token"
for t in 1 2; do cargo bench --quiet --bench hsm_ceiling -- "$dev/divkey.toml" "$secs" "$t"; done

DIVKEY_LOG_LEVEL=warn "$root/target/release/divkey" serve --config "$dev/divkey.toml" 2>"$dev/bench-server.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
TOKEN=$(cat "$dev/bearer.token"); B="http://127.0.0.1:$port/CertificateManagement/api/v1.0"
H="Authorization: Bearer $TOKEN"
tpl=$(curl -s -H "$H" "$B/profiletemplates" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["Uuid"])')
REQ=$(curl -s -H "$H" -H 'Content-Type: application/json' -X POST "$B/requests" -d "{\"type\":\"Enroll\",\"profiletemplateuuid\":\"$tpl\"}" | tr -d '"' | sed 's|.*/||')
CARD=$(python3 -c 'import uuid; print(uuid.uuid4())')
SC=$(curl -s -H "$H" -H 'Content-Type: application/json' -X POST "$B/smartcards" -d "{\"requestid\":\"$REQ\",\"cardid\":\"$CARD\"}" | tr -d '"' | sed 's|.*/||')
URL="$B/requests/$REQ/smartcards/$SC/diversifiedkey?cardid=$CARD"
curl -sf -H "$H" "$URL" >/dev/null
echo "== one key request (curl, new connection each, 20 runs)"
for _ in $(seq 20); do curl -s -o /dev/null -w '%{time_total}\n' -H "$H" "$URL"; done |
  python3 -c 'import sys; v=sorted(float(x)*1000 for x in sys.stdin); print(f"median {v[len(v)//2]:.2f} ms, min {v[0]:.2f} ms")'
echo "== HTTP key requests (wrk, keep-alive, loopback)"
for c in 1 2 8 64; do
  t=$(( c < 2 ? 1 : 2 ))
  out=$(wrk -t"$t" -c"$c" -d"${secs}s" --latency -H "$H" "$URL")
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p50=$(echo "$out" | awk '$1=="50%" {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  errs=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
  echo "connections=$c requests/s=$rps p50=$p50 p99=$p99 non2xx=${errs:-0}"
done
echo "== server peak RSS: $(awk '/VmHWM/ {print $2, $3}' /proc/$pid/status)"
