//! The vocabulary of the CM API: identifiers, enums and their wire numbers.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ParseError(pub &'static str);

/// Parses a GUID as MIM clients send it: any case, with or without braces, with or
/// without hyphens. URNs and other forms are refused.
pub fn parse_guid(text: &str) -> Result<Uuid, ParseError> {
    let inner = match (text.strip_prefix('{'), text.ends_with('}')) {
        (Some(rest), true) => &rest[..rest.len() - 1],
        (None, false) => text,
        _ => return Err(ParseError("unbalanced braces")),
    };
    let bytes = inner.as_bytes();
    let mut digits = [0u8; 32];
    let mut n = 0;
    match bytes.len() {
        32 => digits.copy_from_slice(bytes),
        36 => {
            for (i, &c) in bytes.iter().enumerate() {
                if matches!(i, 8 | 13 | 18 | 23) {
                    if c != b'-' {
                        return Err(ParseError("hyphens out of place"));
                    }
                } else {
                    digits[n] = c;
                    n += 1;
                }
            }
        }
        _ => return Err(ParseError("not 32 hex digits")),
    }
    let mut raw = [0u8; 16];
    hex::decode_to_slice(digits, &mut raw).map_err(|_| ParseError("not hex"))?;
    Ok(Uuid::from_bytes(raw))
}

/// A smart card's ID (the GUID in its `cardid` file). Displayed lower-case and hyphenated.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CardId(Uuid);

impl CardId {
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        parse_guid(text).map(Self)
    }
    pub fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }
    pub fn uuid(&self) -> &Uuid {
        &self.0
    }
}

impl fmt::Display for CardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl fmt::Debug for CardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CardId({self})")
    }
}

/// A card's answer to reset: 2 to 33 bytes, kept as upper-case hex.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Atr(String);

impl Atr {
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let digits: String = text.chars().filter(|c| *c != ' ' && *c != ':').collect();
        let bytes = hex::decode(&digits).map_err(|_| ParseError("ATR is not hex"))?;
        if !(2..=33).contains(&bytes.len()) {
            return Err(ParseError("ATR must be 2 to 33 bytes"));
        }
        Ok(Self(hex::encode_upper(bytes)))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! wire_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident = $num:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name { $($variant = $num),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            pub fn number(self) -> i64 { self as i64 }
            pub fn name(self) -> &'static str {
                match self { $($name::$variant => stringify!($variant)),+ }
            }
            pub fn from_number(n: i64) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.number() == n)
            }
            /// Name, any case.
            pub fn from_name(s: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.name().eq_ignore_ascii_case(s))
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_i64(self.number())
            }
        }
    };
}

wire_enum!(
    /// MIM's RequestStatus numbers.
    RequestStatus {
        None = 0,
        Approved = 3,
        Denied = 4,
        Completed = 8,
        Failed = 9,
        Pending = 16,
        Canceled = 17,
        Executing = 18,
    }
);

wire_enum!(
    /// MIM shows Enroll = 1 and Unblock = 5; the others are divkey's numbering.
    RequestType {
        None = 0,
        Enroll = 1,
        Duplicate = 2,
        OfflineUnblock = 3,
        OnlineUpdate = 4,
        Unblock = 5,
        Renew = 6,
        Recover = 7,
        RecoverOnBehalf = 8,
        Reinstate = 9,
        Retire = 10,
        Revoke = 11,
        TemporaryCards = 12,
    }
);

wire_enum!(
    /// MIM's smart card status numbers.
    SmartcardStatus {
        None = 0,
        New = 1,
        Assigned = 2,
        Active = 3,
        Suspended = 4,
        Disabled = 5,
        Retired = 6,
    }
);

impl RequestStatus {
    /// States in which a bound card may receive its key.
    pub fn releases_keys(self) -> bool {
        matches!(self, Self::Approved | Self::Executing)
    }
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Failed | Self::Canceled | Self::Denied
        )
    }
}

impl RequestType {
    /// Types that act on an issued card named in the request rather than a newly bound one.
    pub fn acts_on_existing_card(self) -> bool {
        matches!(
            self,
            Self::OfflineUnblock
                | Self::OnlineUpdate
                | Self::Unblock
                | Self::Renew
                | Self::Reinstate
                | Self::Retire
                | Self::Revoke
        )
    }
}

/// Deserializes a wire enum given as its name (any case) or its number.
pub fn enum_from_json<T>(
    value: &serde_json::Value,
    by_name: fn(&str) -> Option<T>,
    by_number: fn(i64) -> Option<T>,
) -> Option<T> {
    match value {
        serde_json::Value::String(s) => by_name(s).or_else(|| s.parse().ok().and_then(by_number)),
        serde_json::Value::Number(n) => n.as_i64().and_then(by_number),
        _ => None,
    }
}

/// Serialized form used by the store.
impl<'de> Deserialize<'de> for RequestStatus {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        Self::from_number(n).ok_or_else(|| serde::de::Error::custom("unknown request status"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_forms() {
        let want = parse_guid("bc88f13f-83ba-4037-8262-46eba1291c6e").unwrap();
        for s in [
            "{BC88F13F-83BA-4037-8262-46EBA1291C6E}",
            "bc88f13f83ba4037826246eba1291c6e",
            "{bc88f13f83ba4037826246eba1291c6e}",
            "BC88F13F-83ba-4037-8262-46eba1291c6e",
        ] {
            assert_eq!(parse_guid(s).unwrap(), want, "{s}");
        }
        for s in [
            "",
            "{bc88f13f-83ba-4037-8262-46eba1291c6e",
            "bc88f13f-83ba-4037-8262-46eba1291c6e}",
            "urn:uuid:bc88f13f-83ba-4037-8262-46eba1291c6e",
            "bc88f13f-83ba-4037-8262-46eba1291c6",
            "bc88f13f-83ba-4037-8262-46eba1291c6ex",
            "bc88f13f83ba-4037-8262-46eba1291c6e0",
            "gc88f13f-83ba-4037-8262-46eba1291c6e",
            "bc88f13f-83ba-4037-8262+46eba1291c6e",
            " bc88f13f-83ba-4037-8262-46eba1291c6e",
        ] {
            assert!(parse_guid(s).is_err(), "{s}");
        }
    }

    #[test]
    fn windows_card_id_bytes() {
        let id = CardId::parse("bc88f13f-83ba-4037-8262-46eba1291c6e").unwrap();
        assert_eq!(
            hex::encode(id.uuid().to_bytes_le()),
            "3ff188bcba833740826246eba1291c6e"
        );
    }

    #[test]
    fn atr_forms() {
        assert_eq!(Atr::parse("3B:8F 80").unwrap().as_str(), "3B8F80");
        assert!(Atr::parse("3B").is_err());
        assert!(Atr::parse("3B8").is_err());
        assert!(Atr::parse("zz11").is_err());
        assert!(Atr::parse(&"00".repeat(34)).is_err());
        assert!(Atr::parse(&"00".repeat(33)).is_ok());
    }
}
