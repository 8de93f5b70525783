//! The golden derivation table (issue 4): tests/golden/derivations.json holds a fixed list of
//! (master key, version, template settings, card ID) -> admin key, computed once from SPEC
//! section 3 by tests/golden/generate.py (Python `cryptography`, independent of divkey's Rust
//! code and of the RustCrypto oracle in `common`). Every row is reproduced through SoftHSM2,
//! with the master keys imported by the key ceremony CLI at the row's version, and through the
//! software oracle. If any derivation ever changes, issued cards lose their keys: this fails.
//!
//! The table is read, never written. One #[test] in this file: the in-process PKCS#11 context
//! is per process and needs SOFTHSM2_CONF set before it starts.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use divkey::diversify::{AdminKeyType, AesKeySize, CardIdLayout, Derivation};
use divkey::domain::CardId;
use divkey::hsm::MasterKeyRef;
use serde_json::Value;

const TABLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/derivations.json");
const GENERATOR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/generate.py");

/// SHA-256 of derivations.json as committed. The table is append-never, change-never: a new
/// hash here means the expected keys of issued cards were edited, which must not happen.
const TABLE_SHA256: &str = "86a548a683be887e43a245b8f41a777da84addc07d8776c7bfe4c58ecc57d325";

/// One row of the table.
struct Row {
    index: usize,
    master_hex: String,
    version: u32,
    algorithm: String,
    key_type: String,
    label: Option<String>,
    system_id: String,
    layout: String,
    card: String,
    admin_key: String,
}

impl Row {
    fn parse(index: usize, v: &Value) -> Self {
        let s = |k: &str| {
            v[k].as_str()
                .unwrap_or_else(|| panic!("row {index}: {k} is not a string: {v}"))
                .to_owned()
        };
        let version = v["version"]
            .as_u64()
            .unwrap_or_else(|| panic!("row {index}: version: {v}"));
        Self {
            index,
            master_hex: s("master_key").to_uppercase(),
            version: u32::try_from(version).unwrap(),
            algorithm: s("algorithm"),
            key_type: s("key_type"),
            label: v["label"].as_str().map(str::to_owned),
            system_id: s("system_id"),
            layout: s("card_id_bytes"),
            card: s("card_id"),
            admin_key: s("admin_key").to_uppercase(),
        }
    }

    fn master(&self) -> Vec<u8> {
        hex::decode(&self.master_hex).unwrap()
    }

    fn derivation(&self) -> Derivation {
        let layout: CardIdLayout = serde_json::from_value(Value::from(self.layout.as_str()))
            .unwrap_or_else(|e| panic!("row {}: card_id_bytes: {e}", self.index));
        match self.algorithm.as_str() {
            "sp800-108-cmac" => Derivation::Sp800108Cmac {
                key_type: serde_json::from_value::<AdminKeyType>(Value::from(
                    self.key_type.as_str(),
                ))
                .unwrap(),
                label: self
                    .label
                    .clone()
                    .unwrap_or_else(|| panic!("row {}: sp800-108-cmac without label", self.index)),
                card_id_bytes: layout,
            },
            a => {
                let size = match a {
                    "an10922-aes128" => AesKeySize::Aes128,
                    "an10922-aes192" => AesKeySize::Aes192,
                    "an10922-aes256" => AesKeySize::Aes256,
                    other => panic!("row {}: unknown algorithm {other}", self.index),
                };
                assert_eq!(size.name(), self.key_type, "row {}", self.index);
                Derivation::An10922 {
                    size,
                    system_id: hex::decode(&self.system_id).unwrap(),
                    card_id_bytes: layout,
                }
            }
        }
    }

    /// The software oracle of `common`, from the row's settings.
    fn soft(&self) -> Vec<u8> {
        let cid = card_id_bytes(&self.card, &self.layout);
        if self.algorithm == "sp800-108-cmac" {
            soft_sp800_108(
                &self.master(),
                self.label.as_deref().unwrap(),
                &self.key_type,
                &cid,
            )
        } else {
            let mut m = cid.to_vec();
            m.extend(hex::decode(&self.system_id).unwrap());
            soft_an10922(&self.master(), &m)
        }
    }
}

fn rows() -> Vec<Row> {
    let text = std::fs::read_to_string(TABLE).expect("tests/golden/derivations.json");
    let v: Value = serde_json::from_str(&text).expect("derivations.json is JSON");
    v["derivations"]
        .as_array()
        .expect("a \"derivations\" array")
        .iter()
        .enumerate()
        .map(|(i, r)| Row::parse(i, r))
        .collect()
}

/// A master key lineage: one HSM label holding versions 1..=max of one key size.
struct Lineage {
    label: String,
    size: usize,
    /// version -> key hex (versions the table needs; the others get filler keys).
    keys: BTreeMap<u32, String>,
}

/// Groups the table's (master key, version) pairs into as few labels as possible: a label
/// per key size, and another one whenever two different keys claim the same version.
fn lineages(rows: &[Row]) -> Vec<Lineage> {
    let pairs: BTreeSet<(usize, u32, String)> = rows
        .iter()
        .map(|r| (r.master_hex.len() / 2, r.version, r.master_hex.clone()))
        .collect();
    let mut out: Vec<Lineage> = Vec::new();
    for (size, version, hex) in pairs {
        let slot = out
            .iter()
            .position(|l| l.size == size && l.keys.get(&version).is_none_or(|h| *h == hex));
        let slot = slot.unwrap_or_else(|| {
            let n = out.iter().filter(|l| l.size == size).count();
            out.push(Lineage {
                label: format!("golden-aes{}-{n}", size * 8),
                size,
                keys: BTreeMap::new(),
            });
            out.len() - 1
        });
        out[slot].keys.insert(version, hex);
    }
    out
}

/// A key for a version the table does not use: strong, and different for every slot.
fn filler(label: &str, version: u32, size: usize) -> String {
    use sha2::Digest;
    let d = sha2::Sha512::digest(format!("divkey golden filler {label} v{version}"));
    hex::encode_upper(&d[..size])
}

fn key_type_arg(size: usize) -> &'static str {
    match size {
        16 => "aes128",
        24 => "aes192",
        32 => "aes256",
        n => panic!("{n}-byte master key"),
    }
}

/// `divkey keys import` of `key_hex` as two ceremony components: version 1 of a new label, or
/// the next version of an existing one. Checks the reported version and KCV, and that no
/// component or key hex appears in the output.
fn ceremony_import(token: &TestToken, config: &str, label: &str, version: u32, key_hex: &str) {
    let (a, b) = split_key(key_hex);
    let kind = key_type_arg(key_hex.len() / 2);
    let mut args = vec![
        "keys",
        "import",
        "--config",
        config,
        "--label",
        label,
        "--type",
        kind,
        "--component",
        &a,
        "--component",
        &b,
    ];
    if version > 1 {
        args.push("--new-version");
    }
    let (code, out, err) = run_divkey(token, &args);
    assert_eq!(code, 0, "import {label} v{version}:\n{out}{err}");
    let kcv = soft_kcv(&hex::decode(key_hex).unwrap(), false);
    assert!(
        out.contains(&format!("version={version} kcv={kcv}")),
        "import {label} v{version}: expected version={version} kcv={kcv}:\n{out}"
    );
    let all = format!("{out}{err}").to_lowercase();
    for secret in [&a, &b, &key_hex.to_owned()] {
        assert!(
            !all.contains(&secret.to_lowercase()),
            "key material in the output of keys import"
        );
    }
}

/// The table as committed: pinned, and (where Python `cryptography` is present) reproduced
/// byte for byte by its generator run in a scratch directory.
fn check_table_is_pinned() {
    use sha2::Digest;
    let bytes = std::fs::read(TABLE).unwrap();
    assert_eq!(
        hex::encode(sha2::Sha256::digest(&bytes)),
        TABLE_SHA256,
        "tests/golden/derivations.json changed: the expected keys of issued cards must never be \
         edited or regenerated"
    );
    let have_python = std::process::Command::new("python3")
        .args(["-c", "import cryptography"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_python {
        eprintln!("note: python3 with `cryptography` not found; generator not re-run");
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let script = scratch.path().join("generate.py");
    std::fs::copy(GENERATOR, &script).unwrap();
    let out = std::process::Command::new("python3")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "generate.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = std::fs::read(scratch.path().join("derivations.json")).unwrap();
    assert!(
        again == bytes,
        "tests/golden/generate.py no longer reproduces derivations.json"
    );
}

#[test]
fn golden_derivations_through_softhsm_and_oracle() {
    check_table_is_pinned();
    let rows = rows();

    // Coverage: enough rows, every algorithm, key type, card ID layout and versions 1 to 3.
    assert!(rows.len() >= 100, "only {} rows", rows.len());
    let seen = |f: fn(&Row) -> String| rows.iter().map(f).collect::<BTreeSet<String>>();
    let algorithms = seen(|r| r.algorithm.clone());
    for a in [
        "sp800-108-cmac",
        "an10922-aes128",
        "an10922-aes192",
        "an10922-aes256",
    ] {
        assert!(algorithms.contains(a), "no row for {a}");
    }
    let sp_types = rows
        .iter()
        .filter(|r| r.algorithm == "sp800-108-cmac")
        .map(|r| r.key_type.clone())
        .collect::<BTreeSet<_>>();
    for t in ["des3", "aes128", "aes192", "aes256"] {
        assert!(
            sp_types.contains(t),
            "no sp800-108-cmac row for key type {t}"
        );
    }
    let layouts = seen(|r| r.layout.clone());
    assert!(layouts.contains("windows") && layouts.contains("rfc4122"));
    for algorithm in &algorithms {
        let per = rows
            .iter()
            .filter(|r| &r.algorithm == algorithm)
            .map(|r| r.layout.as_str())
            .collect::<BTreeSet<_>>();
        assert_eq!(per.len(), 2, "{algorithm}: both card_id_bytes layouts");
    }
    let versions = rows.iter().map(|r| r.version).collect::<BTreeSet<_>>();
    for v in [1, 2, 3] {
        assert!(versions.contains(&v), "no row for version {v}");
    }
    assert!(
        rows.iter()
            .any(|r| r.algorithm.starts_with("an10922") && r.system_id.len() == 30),
        "AN10922 with a 15-byte system id (M of 31 bytes)"
    );

    // The software oracle agrees with every row (and every row is well-formed).
    for r in &rows {
        let want_len = key_type_len(&r.key_type);
        assert_eq!(r.admin_key.len(), want_len * 2, "row {} length", r.index);
        assert_eq!(
            hex::encode_upper(r.soft()),
            r.admin_key,
            "oracle, row {} ({} {} {} v{})",
            r.index,
            r.algorithm,
            r.key_type,
            r.layout,
            r.version
        );
        if r.key_type == "des3" {
            let key = hex::decode(&r.admin_key).unwrap();
            assert!(
                key.iter().all(|b| b.count_ones() % 2 == 1),
                "row {}: des3 key without odd parity",
                r.index
            );
        }
    }

    // Import every master key at its version through the key ceremony CLI.
    let token = TestToken::new();
    let config = token.path().join("divkey.toml");
    std::fs::write(&config, config_text(&token, "127.0.0.1:0", "")).unwrap();
    let config_s = config.to_str().unwrap();
    let lineages = lineages(&rows);
    for l in &lineages {
        let max = *l.keys.keys().max().unwrap();
        for v in 1..=max {
            let key = l
                .keys
                .get(&v)
                .cloned()
                .unwrap_or_else(|| filler(&l.label, v, l.size));
            ceremony_import(&token, config_s, &l.label, v, &key);
        }
    }
    let (code, list, err) = run_divkey(&token, &["keys", "list", "--config", config_s]);
    assert_eq!(code, 0, "{list}{err}");
    for l in &lineages {
        let lines = list
            .lines()
            .filter(|x| x.split_whitespace().next() == Some(l.label.as_str()))
            .count();
        assert_eq!(
            lines,
            *l.keys.keys().max().unwrap() as usize,
            "{}:\n{list}",
            l.label
        );
    }

    // Derive every row through the HSM, with the version the row names.
    let hsm = open_hsm(&token);
    let mut masters: BTreeMap<(String, u32), MasterKeyRef> = BTreeMap::new();
    for l in &lineages {
        let versions = hsm.master_key_versions(&l.label).unwrap();
        assert_eq!(
            versions.iter().map(|v| v.version).collect::<Vec<_>>(),
            (1..=*l.keys.keys().max().unwrap()).collect::<Vec<_>>(),
            "{}",
            l.label
        );
        for m in versions {
            if let Some(hex) = l.keys.get(&m.version) {
                assert_eq!(
                    m.kcv.to_string(),
                    soft_kcv(&hex::decode(hex).unwrap(), false),
                    "{} v{}",
                    l.label,
                    m.version
                );
                masters.insert((hex.clone(), m.version), m);
            }
        }
    }
    let mut checked = 0;
    for r in &rows {
        let master = &masters[&(r.master_hex.clone(), r.version)];
        assert_eq!(master.size.byte_len() * 2, r.master_hex.len());
        let card = CardId::parse(&r.card).unwrap();
        let got = hsm
            .derive_admin_key(master, &r.derivation(), &card)
            .unwrap_or_else(|e| panic!("row {}: {e}", r.index));
        assert_eq!(
            hex::encode_upper(got.expose()),
            r.admin_key,
            "HSM, row {} ({} {} label {:?} system_id {:?} {} card {} master {} v{})",
            r.index,
            r.algorithm,
            r.key_type,
            r.label,
            r.system_id,
            r.layout,
            r.card,
            master.label,
            r.version
        );
        checked += 1;
    }
    assert_eq!(checked, rows.len());
    hsm.close().unwrap();
}
