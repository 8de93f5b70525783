#!/usr/bin/env python3
"""Writes derivations.json: the fixed table of (master key, template settings, card ID,
version) -> admin key that protects issued cards across upgrades.

Computed once from SPEC section 3 with an implementation of its own (Python `cryptography`
CMAC), apart from divkey's Rust code and from the RustCrypto oracle of the tests. Re-running it
must reproduce the file byte for byte; the file is never regenerated to make a test pass.
"""
import json
import uuid
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.cmac import CMAC


def cmac(key: bytes, msg: bytes) -> bytes:
    c = CMAC(algorithms.AES(key))
    c.update(msg)
    return c.finalize()


def cid(card: str, layout: str) -> bytes:
    u = uuid.UUID(card)
    return u.bytes_le if layout == "windows" else u.bytes


KT = {"des3": 1, "aes128": 2, "aes192": 3, "aes256": 4}
LEN = {"des3": 24, "aes128": 16, "aes192": 24, "aes256": 32}


def odd_parity(b: bytes) -> bytes:
    return bytes((x & 0xFE) | (1 - bin(x >> 1).count("1") % 2) for x in b)


def sp800_108(master: bytes, label: str, key_type: str, c: bytes) -> bytes:
    l_bits = LEN[key_type] * 8
    fixed = label.encode() + b"\x00" + bytes([KT[key_type]]) + c + l_bits.to_bytes(4, "big")
    out = b""
    i = 1
    while len(out) < LEN[key_type]:
        out += cmac(master, bytes([i]) + fixed)
        i += 1
    out = out[: LEN[key_type]]
    return odd_parity(out) if key_type == "des3" else out


def an10922(master: bytes, m: bytes) -> bytes:
    if len(master) == 16:
        return cmac(master, b"\x01" + m)
    if len(master) == 24:
        a, b = cmac(master, b"\x11" + m), cmac(master, b"\x12" + m)
        return a[:8] + bytes(x ^ y for x, y in zip(a[8:], b[:8])) + b[8:]
    return cmac(master, b"\x41" + m) + cmac(master, b"\x42" + m)


MASTERS = {
    # name: (hex, version)
    "m128v1": ("2b7e151628aed2a6abf7158809cf4f3c", 1),
    "m128v2": ("000102030405060708090a0b0c0d0e0f", 2),
    "m192v1": ("8e73b0f7da0e6452c810f32b809079e562f8ead2522c6b7b", 1),
    "m256v1": ("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4", 1),
    "m256v3": ("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f", 3),
}
CARDS = [
    "bc88f13f-83ba-4037-8262-46eba1291c6e",
    "00000000-0000-0000-0000-000000000000",
    "ffffffff-ffff-ffff-ffff-ffffffffffff",
    "6d1a3c5e-0b7f-4a8e-9c2d-3f4e5a6b7c8d",
]
LABELS = ["divkey admin key", "", "Ausweis-Schlüssel ✓", "x" * 70]


def main() -> None:
    rows = []
    for name, (mhex, version) in MASTERS.items():
        master = bytes.fromhex(mhex)
        for i, card in enumerate(CARDS):
            layout = "windows" if i % 2 == 0 else "rfc4122"
            for key_type in ["des3", "aes128", "aes192", "aes256"]:
                label = LABELS[(i + len(rows)) % len(LABELS)]
                rows.append({
                    "master_key": mhex.upper(), "version": version,
                    "algorithm": "sp800-108-cmac", "key_type": key_type, "label": label,
                    "system_id": "", "card_id_bytes": layout, "card_id": card,
                    "admin_key": sp800_108(master, label, key_type, cid(card, layout)).hex().upper(),
                })
            size = {16: "aes128", 24: "aes192", 32: "aes256"}[len(master)]
            for system_id in ["", "f1", "0102030405060708090a0b0c0d0e0f"]:
                m = cid(card, layout) + bytes.fromhex(system_id)
                rows.append({
                    "master_key": mhex.upper(), "version": version,
                    "algorithm": f"an10922-{size}", "key_type": size, "label": None,
                    "system_id": system_id.upper(), "card_id_bytes": layout, "card_id": card,
                    "admin_key": an10922(master, m).hex().upper(),
                })
    out = Path(__file__).with_name("derivations.json")
    out.write_text(json.dumps({"source": "SPEC.md section 3, tests/golden/generate.py", "derivations": rows},
                              indent=1, ensure_ascii=False) + "\n")
    print(f"{len(rows)} derivations -> {out}")


if __name__ == "__main__":
    main()
