//! Diversification algorithms of SPEC section 3, pure over a [`CmacPrf`].
//!
//! Nothing here knows where the master key lives: the HSM layer implements [`CmacPrf`]
//! with `CKM_AES_CMAC` on a token key, and tests implement it in software as an oracle.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::domain::CardId;

/// One AES block, as produced by AES-CMAC.
pub type Block = [u8; 16];

/// AES-CMAC under a master key that the caller of this module never sees.
pub trait CmacPrf {
    type Error;
    fn cmac(&mut self, message: &[u8]) -> Result<Zeroizing<Block>, Self::Error>;
}

/// The key type a profile hands out to cards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminKeyType {
    Des3,
    Aes128,
    Aes192,
    Aes256,
}

impl AdminKeyType {
    pub const ALL: [AdminKeyType; 4] = [Self::Des3, Self::Aes128, Self::Aes192, Self::Aes256];

    pub fn byte_len(self) -> usize {
        match self {
            Self::Des3 | Self::Aes192 => 24,
            Self::Aes128 => 16,
            Self::Aes256 => 32,
        }
    }

    /// KT byte of the SP 800-108 fixed input: keeps key types apart.
    fn kt_byte(self) -> u8 {
        match self {
            Self::Des3 => 0x01,
            Self::Aes128 => 0x02,
            Self::Aes192 => 0x03,
            Self::Aes256 => 0x04,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Des3 => "des3",
            Self::Aes128 => "aes128",
            Self::Aes192 => "aes192",
            Self::Aes256 => "aes256",
        }
    }
}

/// AES key sizes, for master keys and AN10922 variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AesKeySize {
    Aes128,
    Aes192,
    Aes256,
}

impl AesKeySize {
    pub fn byte_len(self) -> usize {
        match self {
            Self::Aes128 => 16,
            Self::Aes192 => 24,
            Self::Aes256 => 32,
        }
    }

    pub fn from_len(len: usize) -> Option<Self> {
        match len {
            16 => Some(Self::Aes128),
            24 => Some(Self::Aes192),
            32 => Some(Self::Aes256),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Aes128 => "aes128",
            Self::Aes192 => "aes192",
            Self::Aes256 => "aes256",
        }
    }

    pub fn admin_key_type(self) -> AdminKeyType {
        match self {
            Self::Aes128 => AdminKeyType::Aes128,
            Self::Aes192 => AdminKeyType::Aes192,
            Self::Aes256 => AdminKeyType::Aes256,
        }
    }
}

/// How the 16 card ID bytes are laid out before derivation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CardIdLayout {
    /// Windows Base CSP `cardid` file / .NET `Guid.ToByteArray()`: first three fields little-endian.
    #[default]
    Windows,
    /// The bytes in string order.
    Rfc4122,
}

impl CardIdLayout {
    pub fn bytes(self, card: &CardId) -> [u8; 16] {
        match self {
            Self::Windows => card.uuid().to_bytes_le(),
            Self::Rfc4122 => *card.uuid().as_bytes(),
        }
    }
}

pub const DEFAULT_LABEL: &str = "divkey admin key";
/// AN10922 allows at most 31 bytes of M for AES; 16 go to the card ID.
pub const MAX_SYSTEM_ID_LEN: usize = 15;

/// Everything that decides a card's key besides the master key and the card ID.
/// Recorded with each card so that later template edits never change an issued card's key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "algorithm", rename_all = "kebab-case")]
pub enum Derivation {
    Sp800108Cmac {
        key_type: AdminKeyType,
        label: String,
        card_id_bytes: CardIdLayout,
    },
    An10922 {
        size: AesKeySize,
        #[serde(with = "hex::serde")]
        system_id: Vec<u8>,
        card_id_bytes: CardIdLayout,
    },
}

impl Derivation {
    pub fn key_type(&self) -> AdminKeyType {
        match self {
            Self::Sp800108Cmac { key_type, .. } => *key_type,
            Self::An10922 { size, .. } => size.admin_key_type(),
        }
    }

    /// The algorithm's name as the configuration spells it.
    pub fn algorithm_name(&self) -> String {
        match self {
            Self::Sp800108Cmac { .. } => "sp800-108-cmac".to_owned(),
            Self::An10922 { size, .. } => format!("an10922-{}", size.name()),
        }
    }

    /// The master key size this derivation needs, if it needs one in particular.
    pub fn required_master_size(&self) -> Option<AesKeySize> {
        match self {
            Self::Sp800108Cmac { .. } => None,
            Self::An10922 { size, .. } => Some(*size),
        }
    }
}

/// A derived card admin key. The bytes are wiped on drop and never printed.
pub struct AdminKey {
    key_type: AdminKeyType,
    bytes: Zeroizing<Vec<u8>>,
}

impl AdminKey {
    /// A key of this type from clear bytes (a template's default key).
    pub fn new(key_type: AdminKeyType, bytes: Zeroizing<Vec<u8>>) -> Self {
        Self { key_type, bytes }
    }

    pub fn key_type(&self) -> AdminKeyType {
        self.key_type
    }
    pub fn expose(&self) -> &[u8] {
        &self.bytes
    }
}

impl std::fmt::Debug for AdminKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AdminKey({}, ***)", self.key_type.name())
    }
}

/// Derives the admin key of `card` under the master key behind `prf`.
pub fn derive_admin_key<P: CmacPrf>(
    prf: &mut P,
    derivation: &Derivation,
    card: &CardId,
) -> Result<AdminKey, P::Error> {
    let bytes = match derivation {
        Derivation::Sp800108Cmac {
            key_type,
            label,
            card_id_bytes,
        } => {
            let fixed = sp800_108_fixed_input(label, *key_type, &card_id_bytes.bytes(card));
            let mut out = kdf_counter_cmac(prf, &fixed, key_type.byte_len() * 8)?;
            if *key_type == AdminKeyType::Des3 {
                set_odd_parity(&mut out);
            }
            out
        }
        Derivation::An10922 {
            size,
            system_id,
            card_id_bytes,
        } => {
            let mut m = Zeroizing::new(Vec::with_capacity(16 + system_id.len()));
            m.extend_from_slice(&card_id_bytes.bytes(card));
            m.extend_from_slice(system_id);
            an10922_aes(prf, *size, &m)?
        }
    };
    Ok(AdminKey {
        key_type: derivation.key_type(),
        bytes,
    })
}

/// `Label || 0x00 || KT || CID || [L]_32`.
pub fn sp800_108_fixed_input(label: &str, key_type: AdminKeyType, cid: &[u8; 16]) -> Vec<u8> {
    let l_bits = (key_type.byte_len() * 8) as u32;
    let mut fixed = Vec::with_capacity(label.len() + 22);
    fixed.extend_from_slice(label.as_bytes());
    fixed.push(0x00);
    fixed.push(key_type.kt_byte());
    fixed.extend_from_slice(cid);
    fixed.extend_from_slice(&l_bits.to_be_bytes());
    fixed
}

/// NIST SP 800-108 KDF in counter mode, PRF = AES-CMAC, 8-bit counter before the fixed input.
/// `l_bits` must be a multiple of 8 and at most 255 blocks.
pub fn kdf_counter_cmac<P: CmacPrf>(
    prf: &mut P,
    fixed_input: &[u8],
    l_bits: usize,
) -> Result<Zeroizing<Vec<u8>>, P::Error> {
    let len = l_bits / 8;
    debug_assert!(l_bits.is_multiple_of(8) && len.div_ceil(16) <= 255);
    let mut out = Zeroizing::new(Vec::with_capacity(len.div_ceil(16) * 16));
    let mut message = Vec::with_capacity(1 + fixed_input.len());
    message.push(0);
    message.extend_from_slice(fixed_input);
    let mut counter: u8 = 1;
    while out.len() < len {
        message[0] = counter;
        out.extend_from_slice(&*prf.cmac(&message)?);
        counter = counter.wrapping_add(1);
    }
    out.truncate(len);
    Ok(out)
}

/// NXP AN10922 AES diversification. `m` must be 16 to 31 bytes: with at least 16 bytes of M
/// each step is a plain CMAC of `const || M` (AN10922's own padding then equals CMAC's).
pub fn an10922_aes<P: CmacPrf>(
    prf: &mut P,
    size: AesKeySize,
    m: &[u8],
) -> Result<Zeroizing<Vec<u8>>, P::Error> {
    debug_assert!((16..=31).contains(&m.len()));
    let mut step = |constant: u8| {
        let mut d = Zeroizing::new(Vec::with_capacity(1 + m.len()));
        d.push(constant);
        d.extend_from_slice(m);
        prf.cmac(&d)
    };
    let mut out = Zeroizing::new(Vec::with_capacity(size.byte_len()));
    match size {
        AesKeySize::Aes128 => out.extend_from_slice(&*step(0x01)?),
        AesKeySize::Aes192 => {
            // AN10922 2.3: A = CMAC(0x11||M), B = CMAC(0x12||M); key = A0..7 || (A8..15 ^ B0..7) || B8..15.
            let a = step(0x11)?;
            let b = step(0x12)?;
            out.extend_from_slice(&a[..8]);
            out.extend(a[8..].iter().zip(&b[..8]).map(|(x, y)| x ^ y));
            out.extend_from_slice(&b[8..]);
        }
        AesKeySize::Aes256 => {
            out.extend_from_slice(&*step(0x41)?);
            out.extend_from_slice(&*step(0x42)?);
        }
    }
    Ok(out)
}

/// Sets the low bit of every byte so each byte has an odd number of one bits (DES parity).
pub fn set_odd_parity(bytes: &mut [u8]) {
    for b in bytes {
        let high = (*b & 0xFE).count_ones();
        *b = (*b & 0xFE) | u8::from(high % 2 == 0);
    }
}

/// Key check value of an AES key behind `prf`: first 3 bytes of AES-CMAC(key, 16 zero bytes).
pub fn aes_kcv<P: CmacPrf>(prf: &mut P) -> Result<Kcv, P::Error> {
    let mac = prf.cmac(&[0u8; 16])?;
    Ok(Kcv([mac[0], mac[1], mac[2]]))
}

/// A 3-byte key check value, shown as 6 upper-case hex digits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Kcv(pub [u8; 3]);

impl std::fmt::Display for Kcv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", hex::encode_upper(self.0))
    }
}

impl std::fmt::Debug for Kcv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kcv({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_parity_every_byte() {
        let mut all: Vec<u8> = (0..=255).collect();
        set_odd_parity(&mut all);
        for (i, b) in all.iter().enumerate() {
            assert_eq!(b.count_ones() % 2, 1, "byte {i}");
            assert_eq!(b & 0xFE, (i as u8) & 0xFE);
        }
    }

    #[test]
    fn fixed_input_layout() {
        let cid = [0xAA; 16];
        let f = sp800_108_fixed_input("ab", AdminKeyType::Des3, &cid);
        assert_eq!(&f[..4], b"ab\x00\x01");
        assert_eq!(&f[4..20], &cid);
        assert_eq!(&f[20..], &192u32.to_be_bytes());
    }
}
