//! Key ceremony input: clear components from hex arguments, files or a no-echo prompt, and
//! the checks that refuse weak material. Components live only in zeroizing buffers and are
//! never written anywhere; errors name a component by its number, never by its value.

use std::path::Path;

use zeroize::Zeroizing;

use crate::diversify::AesKeySize;

pub const MIN_COMPONENTS: usize = 2;
pub const MAX_COMPONENTS: usize = 5;

/// DES weak and semi-weak keys (parity bits ignored when compared).
const DES_WEAK: [[u8; 8]; 16] = [
    [0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01],
    [0xFE, 0xFE, 0xFE, 0xFE, 0xFE, 0xFE, 0xFE, 0xFE],
    [0xE0, 0xE0, 0xE0, 0xE0, 0xF1, 0xF1, 0xF1, 0xF1],
    [0x1F, 0x1F, 0x1F, 0x1F, 0x0E, 0x0E, 0x0E, 0x0E],
    [0x01, 0xFE, 0x01, 0xFE, 0x01, 0xFE, 0x01, 0xFE],
    [0xFE, 0x01, 0xFE, 0x01, 0xFE, 0x01, 0xFE, 0x01],
    [0x1F, 0xE0, 0x1F, 0xE0, 0x0E, 0xF1, 0x0E, 0xF1],
    [0xE0, 0x1F, 0xE0, 0x1F, 0xF1, 0x0E, 0xF1, 0x0E],
    [0x01, 0xE0, 0x01, 0xE0, 0x01, 0xF1, 0x01, 0xF1],
    [0xE0, 0x01, 0xE0, 0x01, 0xF1, 0x01, 0xF1, 0x01],
    [0x1F, 0xFE, 0x1F, 0xFE, 0x0E, 0xFE, 0x0E, 0xFE],
    [0xFE, 0x1F, 0xFE, 0x1F, 0xFE, 0x0E, 0xFE, 0x0E],
    [0x01, 0x1F, 0x01, 0x1F, 0x01, 0x0E, 0x01, 0x0E],
    [0x1F, 0x01, 0x1F, 0x01, 0x0E, 0x01, 0x0E, 0x01],
    [0xE0, 0xFE, 0xE0, 0xFE, 0xF1, 0xFE, 0xF1, 0xFE],
    [0xFE, 0xE0, 0xFE, 0xE0, 0xFE, 0xF1, 0xFE, 0xF1],
];

/// Why key material is refused; says nothing of its value.
pub fn weakness(key: &[u8]) -> Option<&'static str> {
    if key.iter().all(|b| *b == 0) {
        return Some("is all zero");
    }
    if key.windows(2).all(|w| w[0] == w[1]) {
        return Some("repeats a single byte");
    }
    let weak_block = key.chunks(8).any(|block| {
        DES_WEAK.iter().any(|weak| {
            block.len() == 8 && block.iter().zip(weak).all(|(a, b)| a & 0xFE == b & 0xFE)
        })
    });
    weak_block.then_some("contains a weak or semi-weak DES key")
}

/// Parses one hex component (spaces and colons allowed) and checks its length and strength.
pub fn parse_component(
    number: usize,
    text: &str,
    size: AesKeySize,
) -> Result<Zeroizing<Vec<u8>>, String> {
    let digits: Zeroizing<String> = Zeroizing::new(
        text.chars()
            .filter(|c| !c.is_whitespace() && *c != ':')
            .collect(),
    );
    let bytes = Zeroizing::new(
        hex::decode(digits.as_bytes()).map_err(|_| format!("component {number} is not hex"))?,
    );
    if bytes.len() != size.byte_len() {
        return Err(format!(
            "component {number} is {} bytes; {} needs {}",
            bytes.len(),
            size.name(),
            size.byte_len()
        ));
    }
    if let Some(why) = weakness(&bytes) {
        return Err(format!("component {number} {why}"));
    }
    Ok(bytes)
}

/// Reads a component from a file (hex text), refusing files that others may read.
pub fn read_component_file(
    number: usize,
    path: &Path,
    size: AesKeySize,
) -> Result<Zeroizing<Vec<u8>>, String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(|e| format!("component {number}: cannot read {}: {e}", path.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(format!(
                "component {number}: {} has mode {:o}; it must deny group and other (chmod 600)",
                path.display(),
                mode & 0o777
            ));
        }
    }
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| format!("component {number}: cannot read {}: {e}", path.display()))?,
    );
    parse_component(number, &text, size)
}

/// Asks for a component without echo on the terminal.
pub fn prompt_component(number: usize, size: AesKeySize) -> Result<Zeroizing<Vec<u8>>, String> {
    let text = Zeroizing::new(
        rpassword::prompt_password(format!(
            "component {number} ({} hex digits, not shown): ",
            size.byte_len() * 2
        ))
        .map_err(|e| format!("component {number}: cannot read the terminal: {e}"))?,
    );
    parse_component(number, &text, size)
}

/// XOR of the components; refused when the result is weak (e.g. two equal components).
pub fn combine(components: &[Zeroizing<Vec<u8>>]) -> Result<Zeroizing<Vec<u8>>, String> {
    if !(MIN_COMPONENTS..=MAX_COMPONENTS).contains(&components.len()) {
        return Err(format!(
            "{} component(s) given; a key ceremony takes {MIN_COMPONENTS} to {MAX_COMPONENTS}",
            components.len()
        ));
    }
    let len = components[0].len();
    let mut key = Zeroizing::new(vec![0u8; len]);
    for c in components {
        if c.len() != len {
            return Err("components must all have the same length".into());
        }
        key.iter_mut().zip(c.iter()).for_each(|(k, b)| *k ^= b);
    }
    if let Some(why) = weakness(&key) {
        return Err(format!("the combined key {why}"));
    }
    // A repeated component cancels out or hands the key to one custodian.
    for (i, a) in components.iter().enumerate() {
        if let Some(j) = components[i + 1..].iter().position(|b| a == b) {
            return Err(format!("components {} and {} are equal", i + 1, i + j + 2));
        }
    }
    if let Some(i) = components.iter().position(|c| **c == *key) {
        return Err(format!("the combined key equals component {}", i + 1));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weak_material_is_named_not_shown() {
        assert_eq!(weakness(&[0; 16]), Some("is all zero"));
        assert_eq!(weakness(&[0x5A; 16]), Some("repeats a single byte"));
        let mut k = [0x11u8; 16];
        k[1] = 0x22;
        k[8..].copy_from_slice(&[0x1F, 0x1F, 0x1F, 0x1F, 0x0F, 0x0E, 0x0E, 0x0E]);
        assert_eq!(weakness(&k), Some("contains a weak or semi-weak DES key"));
        let fine = hex::decode("2b7e151628aed2a6abf7158809cf4f3c").unwrap();
        assert_eq!(weakness(&fine), None);
        let e =
            parse_component(2, "00000000000000000000000000000000", AesKeySize::Aes128).unwrap_err();
        assert_eq!(e, "component 2 is all zero");
    }

    #[test]
    fn combine_needs_two_to_five_and_refuses_cancelling_components() {
        let a = Zeroizing::new(hex::decode("2b7e151628aed2a6abf7158809cf4f3c").unwrap());
        assert!(combine(std::slice::from_ref(&a)).is_err());
        assert!(
            combine(&[a.clone(), a.clone()])
                .unwrap_err()
                .contains("all zero")
        );
        let b = Zeroizing::new(hex::decode("000102030405060708090a0b0c0d0e0f").unwrap());
        let k = combine(&[a.clone(), b]).unwrap();
        assert_eq!(k[0], 0x2b);
        assert_eq!(k[15], 0x3c ^ 0x0f);
        let c = Zeroizing::new(hex::decode("603deb1015ca71be2b73aef0857d7781").unwrap());
        // A, B, A: the XOR is B, one custodian's component.
        let e = combine(&[a.clone(), c.clone(), a.clone()]).unwrap_err();
        assert!(e.contains("equal"), "{e}");
        assert!(combine(&vec![a; 6]).is_err());
    }
}
