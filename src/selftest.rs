//! Known-answer self-test at start (as FIPS modules do at power-up): every configured
//! algorithm runs in the HSM on a session-only test key and must reproduce the answer below,
//! computed from the specification by an independent implementation
//! (tests/golden/generate.py). On any mismatch divkey refuses to serve.

use crate::diversify::{AdminKeyType, AesKeySize, CardIdLayout, DEFAULT_LABEL, Derivation};
use crate::domain::CardId;
use crate::hsm::{Hsm, HsmError};

/// SP 800-38B's example keys.
const KEY_128: &str = "2b7e151628aed2a6abf7158809cf4f3c";
const KEY_192: &str = "8e73b0f7da0e6452c810f32b809079e562f8ead2522c6b7b";
const KEY_256: &str = "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4";
const CARD: &str = "bc88f13f-83ba-4037-8262-46eba1291c6e";

/// (algorithm, test key, expected admin key) for the default label, Windows card ID bytes and
/// no system ID.
const ANSWERS: [(&str, &str, &str); 7] = [
    (
        "sp800-108-cmac/des3",
        KEY_256,
        "6476047F38EC892C8A8C2C574F57A8D0BCB03E29E0803280",
    ),
    (
        "sp800-108-cmac/aes128",
        KEY_256,
        "735C335B19E345223782288EAF272757",
    ),
    (
        "sp800-108-cmac/aes192",
        KEY_256,
        "7891F629DD6F9027047B880F510EB7C84D75FC856EE5F3CD",
    ),
    (
        "sp800-108-cmac/aes256",
        KEY_256,
        "F4332A76E7FB498FBC86A6B042BD417AA0B4612ABE3CBA1F05B0C12F75A44807",
    ),
    (
        "an10922-aes128",
        KEY_128,
        "A6EEDE36BB1F1E55F87A62B7E79D60AA",
    ),
    (
        "an10922-aes192",
        KEY_192,
        "2580BEF6569D77529596C45027D906EB8E1A13DBB9EFC542",
    ),
    (
        "an10922-aes256",
        KEY_256,
        "B134090DC1898402D60B1A33621696C3025AFDD024A3110A64C5BC818EC02E80",
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum SelfTestError {
    #[error(
        "self-test failed for {0}: the HSM's result differs from the known answer; refusing to serve"
    )]
    Mismatch(String),
    #[error("self-test of {0} could not run: {1}")]
    Hsm(String, HsmError),
}

/// The self-test name of a derivation: `sp800-108-cmac/<key type>` or `an10922-aesN`.
pub fn algorithm_of(derivation: &Derivation) -> String {
    match derivation {
        Derivation::Sp800108Cmac { key_type, .. } => format!("sp800-108-cmac/{}", key_type.name()),
        Derivation::An10922 { size, .. } => format!("an10922-{}", size.name()),
    }
}

fn test_derivation(algorithm: &str) -> Option<Derivation> {
    let sp = |key_type| Derivation::Sp800108Cmac {
        key_type,
        label: DEFAULT_LABEL.to_owned(),
        card_id_bytes: CardIdLayout::Windows,
    };
    let an = |size| Derivation::An10922 {
        size,
        system_id: Vec::new(),
        card_id_bytes: CardIdLayout::Windows,
    };
    Some(match algorithm {
        "sp800-108-cmac/des3" => sp(AdminKeyType::Des3),
        "sp800-108-cmac/aes128" => sp(AdminKeyType::Aes128),
        "sp800-108-cmac/aes192" => sp(AdminKeyType::Aes192),
        "sp800-108-cmac/aes256" => sp(AdminKeyType::Aes256),
        "an10922-aes128" => an(AesKeySize::Aes128),
        "an10922-aes192" => an(AesKeySize::Aes192),
        "an10922-aes256" => an(AesKeySize::Aes256),
        _ => return None,
    })
}

/// Runs the known-answer test of each algorithm in `algorithms` (names as [`algorithm_of`]).
pub fn run<'a>(
    hsm: &Hsm,
    algorithms: impl IntoIterator<Item = &'a str>,
) -> Result<usize, SelfTestError> {
    let card =
        CardId::parse(CARD).map_err(|e| SelfTestError::Mismatch(format!("test card: {e}")))?;
    let mut ran = 0;
    for algorithm in algorithms {
        let (Some((_, key, expected)), Some(derivation)) = (
            ANSWERS.iter().find(|(a, _, _)| *a == algorithm),
            test_derivation(algorithm),
        ) else {
            return Err(SelfTestError::Mismatch(format!(
                "{algorithm} (no known answer)"
            )));
        };
        let test_key = zeroize::Zeroizing::new(hex::decode(key).unwrap_or_default());
        let got = hsm
            .known_answer(&test_key, &derivation, &card)
            .map_err(|e| SelfTestError::Hsm(algorithm.to_owned(), e))?;
        let mut expected = hex::decode(expected).unwrap_or_default();
        break_for_test(algorithm, &mut expected);
        if got.expose() != expected.as_slice() {
            return Err(SelfTestError::Mismatch(algorithm.to_owned()));
        }
        ran += 1;
    }
    Ok(ran)
}

/// Test-only hook (debug builds): DIVKEY_SELFTEST_BREAK=<algorithm> corrupts that answer, so
/// tests can show the service refuses to serve. Release builds ignore it.
#[cfg(debug_assertions)]
fn break_for_test(algorithm: &str, expected: &mut [u8]) {
    if std::env::var("DIVKEY_SELFTEST_BREAK").is_ok_and(|b| b == algorithm)
        && let Some(first) = expected.first_mut()
    {
        *first ^= 0x80;
    }
}

#[cfg(not(debug_assertions))]
fn break_for_test(_: &str, _: &mut [u8]) {}
