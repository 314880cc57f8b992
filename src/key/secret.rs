use std::fmt;

use rand::{RngExt as _, distr::Alphanumeric};
use sha2::{Digest as _, Sha256};

use super::Invalid;

/// Characters of random base62 after the prefix (about 190 bits).
const BODY_LEN: usize = 32;
/// Base62 characters encoding the CRC32 of everything before them.
const CHECKSUM_LEN: usize = 6;
/// Body characters included in the display hint.
const HINT_LEN: usize = 4;
const PREFIX_MIN: usize = 2;
const PREFIX_MAX: usize = 24;
/// The longest possible key: prefix, `_`, body, checksum.
const KEY_MAX: usize = PREFIX_MAX + 1 + BODY_LEN + CHECKSUM_LEN;

/// Why a string is not a well-formed key. Distinct so that logs and metrics
/// can tell a typo from a truncated paste from a forged key; the check answer
/// is `MALFORMED_KEY` for all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyFormatError {
    #[error("key prefix is missing or invalid")]
    Prefix,
    #[error("key has the wrong length")]
    Length,
    #[error("key contains characters outside its alphabet")]
    Alphabet,
    #[error("key checksum does not match")]
    Checksum,
}

/// A key prefix: 2-24 characters of `[a-z0-9_]`, starting with a letter and
/// not ending in `_`, such as `kw_live`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPrefix(String);

impl KeyPrefix {
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        check_prefix(s.as_bytes())?;
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn check_prefix(p: &[u8]) -> Result<(), Invalid> {
    if !(PREFIX_MIN..=PREFIX_MAX).contains(&p.len()) {
        return Err(Invalid::new("must be 2 to 24 characters"));
    }
    if !p[0].is_ascii_lowercase() {
        return Err(Invalid::new("must start with a lowercase letter"));
    }
    if p[p.len() - 1] == b'_' {
        return Err(Invalid::new("must not end with '_'"));
    }
    if !p
        .iter()
        .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
    {
        return Err(Invalid::new("may contain only a-z, 0-9 and '_'"));
    }
    Ok(())
}

/// A well-formed API key: `{prefix}_{32 base62}{6 base62 CRC32}`.
///
/// Holding one means the format and checksum were verified; it says nothing
/// about whether the key exists. `Debug` prints only the display hint.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    secret: String,
    /// Byte length of the prefix, without the `_` separator.
    prefix_len: usize,
}

impl ApiKey {
    /// Draws a new key from the thread-local CSPRNG (ChaCha, seeded by the OS).
    pub fn generate(prefix: &KeyPrefix) -> Self {
        let p = prefix.as_str();
        let mut secret = String::with_capacity(p.len() + 1 + BODY_LEN + CHECKSUM_LEN);
        secret.push_str(p);
        secret.push('_');
        secret.extend(
            rand::rng()
                .sample_iter(Alphanumeric)
                .take(BODY_LEN)
                .map(char::from),
        );
        let checksum = encode_checksum(crc32fast::hash(secret.as_bytes()));
        // The checksum is base62 digits, hence ASCII.
        secret.extend(checksum.iter().map(|&b| char::from(b)));
        Self {
            secret,
            prefix_len: p.len(),
        }
    }

    /// Verifies format and checksum without touching any store.
    pub fn parse(s: &str) -> Result<Self, KeyFormatError> {
        let prefix_len = validate(s)?;
        Ok(Self {
            secret: s.to_owned(),
            prefix_len,
        })
    }

    /// [`ApiKey::parse`] and [`ApiKey::hash`] in one, without copying the
    /// secret: all a check needs of a presented key.
    pub fn parse_hash(s: &str) -> Result<KeyHash, KeyFormatError> {
        validate(s)?;
        Ok(KeyHash::of(s))
    }

    /// SHA-256 of the whole key: the only form stored at rest.
    pub fn hash(&self) -> KeyHash {
        KeyHash::of(&self.secret)
    }

    pub fn prefix(&self) -> &str {
        &self.secret[..self.prefix_len]
    }

    /// The display hint: prefix, `_` and the first 4 body characters, e.g.
    /// `kw_live_aB3x`. Not secret: it is stored and shown in listings.
    pub fn start(&self) -> &str {
        &self.secret[..self.prefix_len + 1 + HINT_LEN]
    }

    /// The plaintext. Called once per key, to hand it to the minting caller.
    pub fn expose_secret(&self) -> &str {
        &self.secret
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({}…)", self.start())
    }
}

/// CRC32 as exactly 6 base62 digits, zero-padded on the left (62^6 > 2^32).
/// Format and checksum of a presented key; the prefix's length.
fn validate(s: &str) -> Result<usize, KeyFormatError> {
    let b = s.as_bytes();
    if b.len() > KEY_MAX {
        return Err(KeyFormatError::Length);
    }
    if !b.is_ascii() {
        return Err(KeyFormatError::Alphabet);
    }
    // The body and checksum are base62, so the last '_' ends the prefix.
    let sep = b
        .iter()
        .rposition(|&c| c == b'_')
        .ok_or(KeyFormatError::Prefix)?;
    check_prefix(&b[..sep]).map_err(|_| KeyFormatError::Prefix)?;
    let tail = &b[sep + 1..];
    if tail.len() != BODY_LEN + CHECKSUM_LEN {
        return Err(KeyFormatError::Length);
    }
    if !tail.iter().all(u8::is_ascii_alphanumeric) {
        return Err(KeyFormatError::Alphabet);
    }
    let (checked, checksum) = b.split_at(b.len() - CHECKSUM_LEN);
    let claimed = base62::decode(checksum).map_err(|_| KeyFormatError::Checksum)?;
    if claimed != u128::from(crc32fast::hash(checked)) {
        return Err(KeyFormatError::Checksum);
    }
    Ok(sep)
}

fn encode_checksum(crc: u32) -> [u8; CHECKSUM_LEN] {
    let mut digits = [0u8; CHECKSUM_LEN];
    // Cannot fail: a u32 needs at most 6 base62 digits.
    let n = base62::encode_bytes(crc, &mut digits).unwrap_or(0);
    let mut out = [b'0'; CHECKSUM_LEN];
    out[CHECKSUM_LEN - n..].copy_from_slice(&digits[..n]);
    out
}

/// SHA-256 of a key. Not a secret (it cannot be reversed or presented as a
/// credential), but `Debug` still shows only a short fingerprint.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash([u8; 32]);

impl KeyHash {
    fn of(secret: &str) -> Self {
        Self(Sha256::digest(secret.as_bytes()).into())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash(")?;
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn prefix(s: &str) -> KeyPrefix {
        KeyPrefix::parse(s).expect("valid prefix")
    }

    #[test]
    fn generated_key_has_the_documented_shape() {
        let key = ApiKey::generate(&prefix("kw_live"));
        let s = key.expose_secret();
        assert_eq!(s.len(), "kw_live_".len() + 32 + 6);
        assert!(s.starts_with("kw_live_"));
        assert!(
            s["kw_live_".len()..]
                .bytes()
                .all(|c| c.is_ascii_alphanumeric())
        );
        assert_eq!(key.prefix(), "kw_live");
        assert_eq!(key.start(), &s[..12]);
    }

    #[test]
    fn two_generated_keys_differ() {
        let p = prefix("kw_test");
        assert_ne!(ApiKey::generate(&p), ApiKey::generate(&p));
    }

    #[test]
    fn checksum_is_crc32_in_six_base62_digits() {
        // 1337 is "LZ" in base62 (0-9A-Za-z), so the padded form is "0000LZ".
        assert_eq!(&encode_checksum(1337), b"0000LZ");
        assert_eq!(&encode_checksum(0), b"000000");
        assert_eq!(&encode_checksum(u32::MAX), b"4gfFC3");
    }

    #[test]
    fn parse_reports_each_kind_of_damage_distinctly() {
        let key = ApiKey::generate(&prefix("kw_live"));
        let s = key.expose_secret();
        let body_and_sum = &s["kw_live_".len()..];

        assert_eq!(ApiKey::parse(s).as_ref(), Ok(&key));
        assert_eq!(ApiKey::parse(body_and_sum), Err(KeyFormatError::Prefix));
        assert_eq!(
            ApiKey::parse(&format!("Kw_{body_and_sum}")),
            Err(KeyFormatError::Prefix)
        );
        assert_eq!(
            ApiKey::parse(&s[..s.len() - 1]),
            Err(KeyFormatError::Length)
        );
        assert_eq!(ApiKey::parse(&format!("{s}x")), Err(KeyFormatError::Length));
        assert_eq!(
            ApiKey::parse(&format!("{}-{}", &s[..20], &s[21..])),
            Err(KeyFormatError::Alphabet)
        );
        assert_eq!(
            ApiKey::parse(&format!("{}é{}", &s[..20], &s[22..])),
            Err(KeyFormatError::Alphabet)
        );
        let mut forged = s.to_owned();
        forged.replace_range(10..11, if &s[10..11] == "a" { "b" } else { "a" });
        assert_eq!(ApiKey::parse(&forged), Err(KeyFormatError::Checksum));
        assert_eq!(
            ApiKey::parse(&"a".repeat(10_000)),
            Err(KeyFormatError::Length)
        );
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let key = ApiKey::generate(&prefix("kw_live"));
        let shown = format!("{key:?} {:?}", key.hash());
        assert!(!shown.contains(key.expose_secret()));
        assert!(!shown.contains(&key.expose_secret()[12..]));
        assert!(shown.contains(key.start()));
    }

    #[test]
    fn hash_is_sha256_of_the_whole_key() {
        let key = ApiKey::generate(&prefix("kw_live"));
        let expected: [u8; 32] = Sha256::digest(key.expose_secret().as_bytes()).into();
        assert_eq!(key.hash().as_bytes(), &expected);
        assert_eq!(KeyHash::from_slice(&expected), Some(key.hash()));
        assert_eq!(KeyHash::from_slice(&expected[..31]), None);
    }

    #[test]
    fn prefix_rules_are_enforced() {
        for ok in ["kw", "kw_live", "a1", "abcdefghijklmnopqrstuvwx", "a_b_c"] {
            assert!(KeyPrefix::parse(ok).is_ok(), "{ok} should be accepted");
        }
        for bad in [
            "",
            "k",
            "1kw",
            "_kw",
            "kw_",
            "KW",
            "kw-live",
            "kw live",
            "kw.live",
            "abcdefghijklmnopqrstuvwxy",
        ] {
            assert!(KeyPrefix::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    fn arb_prefix() -> impl Strategy<Value = KeyPrefix> {
        "[a-z][a-z0-9_]{0,22}[a-z0-9]"
            .prop_map(|s| KeyPrefix::parse(&s).expect("valid by construction"))
    }

    proptest! {
        #[test]
        fn generated_keys_always_parse(p in arb_prefix()) {
            let key = ApiKey::generate(&p);
            let parsed = ApiKey::parse(key.expose_secret());
            prop_assert_eq!(parsed.as_ref(), Ok(&key));
            prop_assert_eq!(key.prefix(), p.as_str());
            prop_assert_eq!(ApiKey::parse_hash(key.expose_secret()), Ok(key.hash()));
        }

        #[test]
        fn any_single_character_change_is_rejected(
            p in arb_prefix(),
            pos in any::<prop::sample::Index>(),
            replacement in any::<char>(),
        ) {
            let key = ApiKey::generate(&p);
            let mut chars: Vec<char> = key.expose_secret().chars().collect();
            let i = pos.index(chars.len());
            prop_assume!(chars[i] != replacement);
            chars[i] = replacement;
            let damaged: String = chars.into_iter().collect();
            prop_assert!(ApiKey::parse(&damaged).is_err(), "accepted {}", damaged);
            prop_assert!(ApiKey::parse_hash(&damaged).is_err(), "hashed {}", damaged);
        }

        #[test]
        fn arbitrary_input_never_panics(s in any::<String>()) {
            let _ = ApiKey::parse(&s);
        }
    }
}
