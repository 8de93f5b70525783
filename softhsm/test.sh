#!/usr/bin/env bash
# Runs the whole test suite: unit tests, the published vectors and the random cross-check
# through SoftHSM2, the API tests against real server processes, and the network-HSM outage
# tests (SoftHSM2 behind p11-kit 0.25.5's server). Installs SoftHSM2 if missing and builds
# p11-kit 0.25.5 into target/ once; every test makes its own throw-away token, so nothing here
# touches .dev/.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# opensc-pkcs11 brings pkcs11-spy, with which tests count C_Login calls and HSM sessions.
"$root/softhsm/ensure-softhsm.sh" opensc-pkcs11
# tests/outage.rs runs p11-kit from this prefix and fails without it.
DIVKEY_P11KIT_PREFIX=$("$root/softhsm/p11-kit.sh")
export DIVKEY_P11KIT_PREFIX
cd "$root"
cargo test --locked "$@"
