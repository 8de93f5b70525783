#!/usr/bin/env bash
# Runs the whole test suite: unit tests, the published vectors and the random cross-check
# through SoftHSM2, and the API tests against real server processes. Installs SoftHSM2 if
# missing; every test makes its own throw-away token, so nothing here touches .dev/.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# opensc-pkcs11 brings pkcs11-spy, with which a test counts C_Login calls.
"$root/softhsm/ensure-softhsm.sh" opensc-pkcs11
cd "$root"
cargo test --locked "$@"
