# Sourced by bench.sh and soak.sh: serves the dev config on $port (release build, log level
# warn, log to $dev/$1-server.log), enrolls one fresh card and sets $pid, $H (the
# Authorization header) and $URL (that card's diversifiedkey URL). The server is killed on exit.
DIVKEY_LOG_LEVEL=warn "$root/target/release/divkey" serve --config "$dev/divkey.toml" 2>"$dev/$1-server.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
H="Authorization: Bearer $(cat "$dev/bearer.token")"
B="http://127.0.0.1:$port/CertificateManagement/api/v1.0"
tpl=$(curl -s -H "$H" "$B/profiletemplates" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["Uuid"])')
REQ=$(curl -s -H "$H" -H 'Content-Type: application/json' -X POST "$B/requests" -d "{\"type\":\"Enroll\",\"profiletemplateuuid\":\"$tpl\"}" | tr -d '"' | sed 's|.*/||')
CARD=$(python3 -c 'import uuid; print(uuid.uuid4())')
SC=$(curl -s -H "$H" -H 'Content-Type: application/json' -X POST "$B/smartcards" -d "{\"requestid\":\"$REQ\",\"cardid\":\"$CARD\"}" | tr -d '"' | sed 's|.*/||')
URL="$B/requests/$REQ/smartcards/$SC/diversifiedkey?cardid=$CARD"
curl -sf -H "$H" "$URL" >/dev/null
