//! Check values of clear admin keys, for the audit trail (SPEC section 3): 3DES keys
//! 3DES-ECB(key, 8 zero bytes), AES keys AES-CMAC(key, 16 zero bytes), first 3 bytes.
//! Master keys never come here: their KCV is computed inside the HSM.

use aes::{Aes128, Aes192, Aes256};
use cmac::{Cmac, Mac};
use des::TdesEde3;
use des::cipher::{BlockEncrypt, KeyInit};
use zeroize::Zeroizing;

use crate::diversify::{AdminKey, AdminKeyType, Kcv};

fn cmac3<M: Mac + KeyInit>(key: &[u8]) -> Option<[u8; 3]> {
    let mut mac = <M as KeyInit>::new_from_slice(key).ok()?;
    mac.update(&[0u8; 16]);
    let tag = mac.finalize().into_bytes();
    Some([tag[0], tag[1], tag[2]])
}

/// The KCV of a derived admin key.
pub fn admin_key_kcv(key: &AdminKey) -> Option<Kcv> {
    let bytes = key.expose();
    let kcv = match key.key_type() {
        AdminKeyType::Des3 => {
            let cipher = TdesEde3::new_from_slice(bytes).ok()?;
            let mut block = Zeroizing::new([0u8; 8]);
            cipher.encrypt_block(block.as_mut_slice().into());
            [block[0], block[1], block[2]]
        }
        AdminKeyType::Aes128 => cmac3::<Cmac<Aes128>>(bytes)?,
        AdminKeyType::Aes192 => cmac3::<Cmac<Aes192>>(bytes)?,
        AdminKeyType::Aes256 => cmac3::<Cmac<Aes256>>(bytes)?,
    };
    Some(Kcv(kcv))
}
