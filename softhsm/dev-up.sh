#!/usr/bin/env bash
# Starts divkey on its embedded defaults: SoftHSM2 (installed if missing), a local dev
# token "divkey-dev" with a generated AES-256 master key "admin-master", a dev config and
# bearer token under .dev/, then the server on 127.0.0.1:8080. Prints a working curl flow.
# Development only: the dev PIN and token live in .dev/ in clear.
# With --setup-only it prepares everything and exits without serving.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dev="$root/.dev"
"$root/softhsm/ensure-softhsm.sh"
mkdir -p "$dev/tokens"
chmod 700 "$dev"
export SOFTHSM2_CONF="$dev/softhsm2.conf"
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n' "$dev" > "$SOFTHSM2_CONF"

umask 077
[ -s "$dev/dev.pin" ] || od -An -N8 -tx1 /dev/urandom | tr -d ' \n' > "$dev/dev.pin"
[ -s "$dev/so.pin" ] || od -An -N8 -tx1 /dev/urandom | tr -d ' \n' > "$dev/so.pin"
[ -s "$dev/bearer.token" ] || od -An -N24 -tx1 /dev/urandom | tr -d ' \n' > "$dev/bearer.token"
chmod 600 "$dev/dev.pin" "$dev/so.pin" "$dev/bearer.token"

if ! softhsm2-util --show-slots 2>/dev/null | grep -q 'Label:.*divkey-dev'; then
  softhsm2-util --init-token --free --label divkey-dev \
    --pin "$(cat "$dev/dev.pin")" --so-pin "$(cat "$dev/so.pin")" >/dev/null
fi

cd "$root"
cargo build --release --quiet
bin="$root/target/release/divkey"
port="${DIVKEY_PORT:-8080}"
template=6d1a3c5e-0b7f-4a8e-9c2d-3f4e5a6b7c8d
token_hash=$(printf '%s\n' "$(cat "$dev/bearer.token")" | "$bin" token-hash)
cat > "$dev/divkey.toml" <<TOML
listen = "127.0.0.1:$port"

[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "divkey-dev"
pin_file = "dev.pin"

[store]
sqlite = "divkey.db"

[[profile_template]]
uuid = "$template"
name = "Base CSP smart card"
description = "divkey development template"
diversify_admin_key = true
algorithm = "sp800-108-cmac"
key_type = "des3"
card_id_bytes = "windows"
master_key = "admin-master"
approvals_required = 0
default_admin_key_hex = "010203040506070801020304050607080102030405060708"

[[caller]]
name = "dev-enrollment-agent"
token_sha256 = "$token_hash"
permissions = { "$template" = ["request", "approve", "bind", "read_key"] }
TOML

if ! "$bin" keys list --config "$dev/divkey.toml" | grep -q '^admin-master '; then
  "$bin" keys generate --config "$dev/divkey.toml" --label admin-master --type aes256
fi
"$bin" check --config "$dev/divkey.toml"
# softhsm/bench.sh and others reuse the setup without serving.
[ "${1:-}" = "--setup-only" ] && exit 0

base="http://127.0.0.1:$port/CertificateManagement/api/v1.0"
cat <<FLOW

divkey is starting on http://127.0.0.1:$port (Ctrl-C stops it). In another shell:

  export SOFTHSM2_CONF=$SOFTHSM2_CONF   # only for divkey keys/check commands
  TOKEN=\$(cat $dev/bearer.token); B=$base; H="Authorization: Bearer \$TOKEN"
  curl -s -H "\$H" \$B/profiletemplates; echo
  REQ=\$(curl -s -H "\$H" -H 'Content-Type: application/json' -X POST \$B/requests \\
        -d '{"type":"Enroll","profiletemplateuuid":"$template"}' | tr -d '"' | sed 's|.*/||'); echo \$REQ
  CARD=bc88f13f-83ba-4037-8262-46eba1291c6e
  SC=\$(curl -s -H "\$H" -H 'Content-Type: application/json' -X POST \$B/smartcards \\
        -d "{\"requestid\":\"\$REQ\",\"cardid\":\"\$CARD\",\"atr\":\"3B8F8001804F0CA000000306030001000000006A\"}" | tr -d '"' | sed 's|.*/||'); echo \$SC
  curl -s -H "\$H" "\$B/requests/\$REQ/smartcards/\$SC/diversifiedkey?cardid=\$CARD"; echo
  curl -s -H "\$H" -H 'Content-Type: application/json' -X PUT \$B/requests/\$REQ -d '{"status":"Completed"}'; echo
  curl -s -w ' HTTP %{http_code}\n' -H "\$H" "\$B/requests/\$REQ/smartcards/\$SC/diversifiedkey?cardid=\$CARD"   # now 403: request Completed

FLOW
exec "$bin" serve --config "$dev/divkey.toml"
