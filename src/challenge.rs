//! Answers to a card's admin challenge: the challenge encrypted with the card's admin key
//! (3DES-ECB for 3DES keys and 8-byte challenges, AES-ECB for AES keys and 16-byte ones).

use aes::{Aes128, Aes192, Aes256};
use des::TdesEde3;
use des::cipher::{BlockEncrypt, KeyInit};
use zeroize::Zeroizing;

use crate::diversify::{AdminKey, AdminKeyType};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChallengeError {
    #[error("challenge must be {expected} bytes for a {key_type} key, not {got}")]
    Length {
        expected: usize,
        got: usize,
        key_type: &'static str,
    },
    #[error("key of unexpected length")]
    Key,
}

fn encrypt_block<C: KeyInit + BlockEncrypt>(
    key: &[u8],
    block: &mut [u8],
) -> Result<(), ChallengeError> {
    let cipher = C::new_from_slice(key).map_err(|_| ChallengeError::Key)?;
    cipher.encrypt_block(block.into());
    Ok(())
}

/// The challenge encrypted under `key`.
pub fn respond(key: &AdminKey, challenge: &[u8]) -> Result<Vec<u8>, ChallengeError> {
    let key_type = key.key_type();
    let expected = match key_type {
        AdminKeyType::Des3 => 8,
        _ => 16,
    };
    if challenge.len() != expected {
        return Err(ChallengeError::Length {
            expected,
            got: challenge.len(),
            key_type: key_type.name(),
        });
    }
    let mut block = Zeroizing::new(challenge.to_vec());
    let k = key.expose();
    match key_type {
        AdminKeyType::Des3 => encrypt_block::<TdesEde3>(k, &mut block)?,
        AdminKeyType::Aes128 => encrypt_block::<Aes128>(k, &mut block)?,
        AdminKeyType::Aes192 => encrypt_block::<Aes192>(k, &mut block)?,
        AdminKeyType::Aes256 => encrypt_block::<Aes256>(k, &mut block)?,
    }
    Ok(block.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_known_answer() {
        // FIPS-197 appendix C.1: AES-128.
        let key = AdminKey::new(
            AdminKeyType::Aes128,
            Zeroizing::new(hex::decode("000102030405060708090a0b0c0d0e0f").unwrap()),
        );
        let pt = hex::decode("00112233445566778899aabbccddeeff").unwrap();
        assert_eq!(
            hex::encode(respond(&key, &pt).unwrap()),
            "69c4e0d86a7b0430d8cdb78070b4c55a"
        );
        assert!(matches!(
            respond(&key, &pt[..8]),
            Err(ChallengeError::Length { .. })
        ));
    }
}
