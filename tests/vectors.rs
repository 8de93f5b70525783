//! Every published vector of ../shared/vectors reproduced through SoftHSM2, with the master key
//! imported sensitive and non-extractable, and each one checked against the software oracle.

mod common;

use common::*;
use divkey::diversify::{self, AdminKeyType, AesKeySize, CardIdLayout, Derivation};
use divkey::domain::CardId;
use divkey::hsm::{Hsm, MasterKeyRef};
use zeroize::Zeroizing;

fn vectors() -> serde_json::Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/vectors/vectors.json"
    );
    let text = std::fs::read_to_string(path)
        .or_else(|_| {
            std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/data/vectors.json"
            ))
        })
        .expect("vectors.json");
    serde_json::from_str(&text).unwrap()
}

fn import(hsm: &Hsm, label: &str, key_hex: &str) -> MasterKeyRef {
    let key = Zeroizing::new(hex::decode(key_hex).unwrap());
    let prepared = hsm.prepare_import(&[key]).unwrap();
    hsm.import_master_key(label, prepared).unwrap()
}

/// A CmacPrf over the token key, to run the generic KDF and AN10922 functions on raw inputs.
struct HsmPrf<'a> {
    hsm: &'a Hsm,
    master: &'a MasterKeyRef,
}

#[test]
fn published_vectors_through_softhsm() {
    let token = TestToken::new();
    let hsm = open_hsm(&token);
    let v = vectors();
    let mut n = 0;

    for (i, t) in v["an10922"].as_array().unwrap().iter().enumerate() {
        let master_hex = t["master_key"].as_str().unwrap();
        let m = hex::decode(t["m"].as_str().unwrap()).unwrap();
        let want = t["derived_key"].as_str().unwrap().to_uppercase();
        assert_eq!(
            hex::encode_upper(soft_an10922(&hex::decode(master_hex).unwrap(), &m)),
            want,
            "oracle {}",
            t["name"]
        );
        let master = import(&hsm, &format!("an10922-{i}"), master_hex);
        let size = match t["variant"].as_str().unwrap() {
            "an10922-aes128" => AesKeySize::Aes128,
            "an10922-aes192" => AesKeySize::Aes192,
            "an10922-aes256" => AesKeySize::Aes256,
            other => panic!("{other}"),
        };
        assert_eq!(master.size, size);
        // M is CID || system_id: split the published M accordingly.
        let card = CardId::from_uuid(uuid::Uuid::from_slice(&m[..16]).unwrap());
        let derivation = Derivation::An10922 {
            size,
            system_id: m[16..].to_vec(),
            card_id_bytes: CardIdLayout::Rfc4122,
        };
        let got = hsm.derive_admin_key(&master, &derivation, &card).unwrap();
        assert_eq!(hex::encode_upper(got.expose()), want, "HSM {}", t["name"]);
        n += 1;
    }

    for (i, t) in v["sp800_108_counter_cmac"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let master_hex = t["master_key"].as_str().unwrap();
        let fixed = hex::decode(t["fixed_input"].as_str().unwrap()).unwrap();
        let l_bits = t["l_bits"].as_u64().unwrap() as usize;
        let want = t["derived_key"].as_str().unwrap().to_uppercase();
        assert_eq!(
            hex::encode_upper(soft_kdf_ctr(
                &hex::decode(master_hex).unwrap(),
                &fixed,
                l_bits
            )),
            want
        );
        let master = import(&hsm, &format!("kbkdf-{i}"), master_hex);
        let got = diversify::kdf_counter_cmac(
            &mut HsmPrf {
                hsm: &hsm,
                master: &master,
            },
            &fixed,
            l_bits,
        )
        .unwrap();
        assert_eq!(hex::encode_upper(&*got), want, "HSM {}", t["name"]);
        n += 1;
    }

    for (i, t) in v["divkey_profiles"].as_array().unwrap().iter().enumerate() {
        assert_eq!(t["algorithm"], "sp800-108-cmac");
        let master_hex = t["master_key"].as_str().unwrap();
        let master_bytes = hex::decode(master_hex).unwrap();
        let key_type = t["key_type"].as_str().unwrap();
        let layout = t["card_id_bytes"].as_str().unwrap();
        let label = t["label"].as_str().unwrap();
        let card = t["cardid"].as_str().unwrap();
        let want = t["derived_key"].as_str().unwrap().to_uppercase();
        let soft = soft_sp800_108(&master_bytes, label, key_type, &card_id_bytes(card, layout));
        assert_eq!(hex::encode_upper(&soft), want, "oracle {}", t["name"]);
        let master = import(&hsm, &format!("profile-{i}"), master_hex);
        assert_eq!(master.kcv.to_string(), t["master_kcv"].as_str().unwrap());
        assert_eq!(
            soft_kcv(&master_bytes, false),
            t["master_kcv"].as_str().unwrap()
        );
        let derivation = Derivation::Sp800108Cmac {
            key_type: serde_json::from_value::<AdminKeyType>(t["key_type"].clone()).unwrap(),
            label: label.to_owned(),
            card_id_bytes: serde_json::from_value::<CardIdLayout>(t["card_id_bytes"].clone())
                .unwrap(),
        };
        let got = hsm
            .derive_admin_key(&master, &derivation, &CardId::parse(card).unwrap())
            .unwrap();
        assert_eq!(hex::encode_upper(got.expose()), want, "HSM {}", t["name"]);
        use base64::Engine;
        assert_eq!(
            base64::engine::general_purpose::STANDARD.encode(got.expose()),
            t["derived_key_base64"].as_str().unwrap()
        );
        assert_eq!(
            soft_kcv(got.expose(), key_type == "des3"),
            t["kcv"].as_str().unwrap()
        );
        n += 1;
    }
    assert!(n >= 4, "only {n} vectors");
    hsm.close().unwrap();
}

impl diversify::CmacPrf for HsmPrf<'_> {
    type Error = divkey::hsm::HsmError;
    fn cmac(&mut self, message: &[u8]) -> Result<Zeroizing<diversify::Block>, Self::Error> {
        self.hsm.cmac(self.master, message)
    }
}
