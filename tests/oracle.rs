//! The HSM path against the independent software implementation on random inputs:
//! at least 1,000 cases (master key, card ID, label, key type, byte order) per algorithm.

mod common;

use common::*;
use divkey::diversify::{AdminKeyType, AesKeySize, CardIdLayout, Derivation};
use divkey::domain::CardId;
use divkey::hsm::MasterKeyRef;
use rand::{Rng, SeedableRng};
use zeroize::Zeroizing;

const CASES: usize = 1000;
const MASTERS_PER_SIZE: usize = 5;

fn random_label(rng: &mut impl Rng) -> String {
    match rng.gen_range(0..4) {
        0 => divkey::diversify::DEFAULT_LABEL.to_owned(),
        1 => String::new(),
        // Multi-byte UTF-8 and a long label that makes the fixed input span several blocks.
        2 => "Ausweis-Schlüssel ✓".to_owned(),
        _ => (0..rng.gen_range(1..80))
            .map(|_| rng.gen_range(b' '..=b'~') as char)
            .collect(),
    }
}

#[test]
fn hsm_equals_software_on_random_inputs() {
    let token = TestToken::new();
    // The only test of this binary: the one PKCS#11 context of this process.
    let hsm = open_hsm(&token);
    let seed: u64 = std::env::var("DIVKEY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().r#gen());
    eprintln!("seed {seed} (DIVKEY_TEST_SEED reproduces)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let mut masters: Vec<(AesKeySize, Vec<u8>, MasterKeyRef)> = Vec::new();
    for size in [AesKeySize::Aes128, AesKeySize::Aes192, AesKeySize::Aes256] {
        for i in 0..MASTERS_PER_SIZE {
            let mut key = vec![0u8; size.byte_len()];
            rng.fill(&mut key[..]);
            let prepared = hsm.prepare_import(&[Zeroizing::new(key.clone())]).unwrap();
            let r = hsm
                .import_master_key(&format!("m-{}-{i}", size.name()), prepared)
                .unwrap();
            assert_eq!(r.kcv.to_string(), soft_kcv(&key, false));
            masters.push((size, key, r));
        }
    }

    let algorithms = [
        "sp800-108-cmac",
        "an10922-aes128",
        "an10922-aes192",
        "an10922-aes256",
    ];
    for algorithm in algorithms {
        let mut counts = std::collections::BTreeMap::<String, usize>::new();
        for case in 0..CASES {
            let card = uuid::Uuid::from_bytes(rng.r#gen());
            let layout = if rng.gen_bool(0.5) {
                "windows"
            } else {
                "rfc4122"
            };
            let card_id_bytes = if layout == "windows" {
                CardIdLayout::Windows
            } else {
                CardIdLayout::Rfc4122
            };
            let cid = card_id_bytes_of(&card, layout);
            let (derivation, want, master_of) = match algorithm {
                "sp800-108-cmac" => {
                    let key_type = AdminKeyType::ALL[rng.gen_range(0..4)];
                    let label = random_label(&mut rng);
                    let m = &masters[rng.gen_range(0..masters.len())];
                    let want = soft_sp800_108(&m.1, &label, key_type.name(), &cid);
                    *counts.entry(key_type.name().to_owned()).or_default() += 1;
                    (
                        Derivation::Sp800108Cmac {
                            key_type,
                            label,
                            card_id_bytes,
                        },
                        want,
                        m,
                    )
                }
                an => {
                    let size = match an {
                        "an10922-aes128" => AesKeySize::Aes128,
                        "an10922-aes192" => AesKeySize::Aes192,
                        _ => AesKeySize::Aes256,
                    };
                    let candidates: Vec<_> = masters.iter().filter(|m| m.0 == size).collect();
                    let m = candidates[rng.gen_range(0..candidates.len())];
                    let system_id: Vec<u8> =
                        (0..rng.gen_range(0..=15)).map(|_| rng.r#gen()).collect();
                    let mut msg = cid.to_vec();
                    msg.extend_from_slice(&system_id);
                    let want = soft_an10922(&m.1, &msg);
                    *counts
                        .entry(format!("system_id {}", system_id.len().min(1)))
                        .or_default() += 1;
                    (
                        Derivation::An10922 {
                            size,
                            system_id,
                            card_id_bytes,
                        },
                        want,
                        m,
                    )
                }
            };
            let got = hsm
                .derive_admin_key(&master_of.2, &derivation, &CardId::from_uuid(card))
                .unwrap();
            assert_eq!(
                hex::encode(got.expose()),
                hex::encode(&want),
                "{algorithm} case {case}: card {card} layout {layout} derivation {derivation:?} master {}",
                master_of.2.label
            );
            if derivation.key_type() == AdminKeyType::Des3 {
                assert!(got.expose().iter().all(|b| b.count_ones() % 2 == 1));
            }
        }
        eprintln!("{algorithm}: {CASES} cases agree {counts:?}");
    }
    hsm.close().unwrap();
}

fn card_id_bytes_of(card: &uuid::Uuid, layout: &str) -> [u8; 16] {
    card_id_bytes(&card.hyphenated().to_string(), layout)
}
