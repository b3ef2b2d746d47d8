//! Text key=value pairs of Login and Text PDUs (RFC 7143 §6.1).
//!
//! A data segment holds `key=value` pairs, each terminated by a NUL byte. Keys are at most 63
//! bytes of `[A-Za-z0-9.-+@_]`; values are at most 255 bytes unless the key allows more (text
//! values of up to 8192 bytes, e.g. CHAP challenges in hex).
#![forbid(unsafe_code)]

/// RFC 7143 §6.1: "A key-name ... MUST NOT exceed 63 bytes".
pub const MAX_KEY_LEN: usize = 63;
/// RFC 7143 §6.1: large binary or text values may be up to 8192 bytes.
pub const MAX_VALUE_LEN: usize = 8192;

/// What was wrong with a key=value data segment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum TextError {
    /// key=value pair without '=': {0:?}
    MissingEquals(String),
    /// key name is empty or longer than 63 bytes: {0:?}
    BadKeyName(String),
    /// value of key {0} is longer than 8192 bytes
    ValueTooLong(String),
    /// text is not valid UTF-8
    NotUtf8,
}

/// Splits a data segment into its key=value pairs, in order.
///
/// A trailing pair without its NUL terminator is accepted (some initiators omit it); empty
/// strings between NULs (padding) are skipped.
pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    let mut out = Vec::new();
    for raw in data.split(|&b| b == 0) {
        if raw.is_empty() {
            continue;
        }
        let s = std::str::from_utf8(raw).map_err(|_| TextError::NotUtf8)?;
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| TextError::MissingEquals(s.chars().take(64).collect()))?;
        if k.is_empty() || k.len() > MAX_KEY_LEN || !k.bytes().all(valid_key_byte) {
            return Err(TextError::BadKeyName(k.chars().take(64).collect()));
        }
        if v.len() > MAX_VALUE_LEN {
            return Err(TextError::ValueTooLong(k.to_string()));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

fn valid_key_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+' | b'@' | b'_')
}

/// Appends `key=value\0` to `out`.
pub fn push(out: &mut Vec<u8>, key: &str, value: &str) {
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value.as_bytes());
    out.push(0);
}

/// Encodes pairs as a data segment.
pub fn encode<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        push(&mut out, k, v);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let data = encode([
            ("InitiatorName", "iqn.2000-01.x:y"),
            ("SessionType", "Normal"),
        ]);
        assert_eq!(data.last(), Some(&0));
        let pairs = parse(&data).unwrap();
        assert_eq!(pairs[0], ("InitiatorName".into(), "iqn.2000-01.x:y".into()));
        assert_eq!(pairs[1], ("SessionType".into(), "Normal".into()));
    }

    #[test]
    fn tolerates_padding_and_missing_final_nul() {
        let pairs = parse(b"A=1\0\0\0B=2").unwrap();
        assert_eq!(pairs.len(), 2);
        assert_eq!(pairs[1].1, "2");
    }

    #[test]
    fn value_may_contain_equals() {
        let pairs = parse(b"X=a=b\0").unwrap();
        assert_eq!(pairs[0].1, "a=b");
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(
            parse(b"novalue\0"),
            Err(TextError::MissingEquals(_))
        ));
        assert!(matches!(parse(b"=x\0"), Err(TextError::BadKeyName(_))));
        assert!(matches!(parse(b"a b=x\0"), Err(TextError::BadKeyName(_))));
        assert_eq!(parse(&[0xff, b'=', b'1', 0]), Err(TextError::NotUtf8));
        let long = format!("K={}\0", "v".repeat(MAX_VALUE_LEN + 1));
        assert!(matches!(
            parse(long.as_bytes()),
            Err(TextError::ValueTooLong(_))
        ));
    }
}
