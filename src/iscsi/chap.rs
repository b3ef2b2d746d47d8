//! CHAP authentication for the login's security stage (RFC 7143 §12.1.3, RFC 1994), target
//! side: one-way (the initiator proves it knows an `IncomingUser` secret) and mutual (the
//! target then proves it knows the `OutgoingUser` secret), with the hash algorithms of the
//! CHAP_A registry that initiators offer: MD5 (5), SHA-1 (6), SHA-256 (7) and SHA3-256 (8).
//!
//! Secrets are compared in constant time, a challenge the target sent is never accepted back
//! as the initiator's own (reflection), and nothing here formats a secret into a message.
#![forbid(unsafe_code)]

use std::fmt;

use md5::Md5;
use sha1::Sha1;
use sha2::{Digest, Sha256};
use sha3::Sha3_256;

/// A CHAP account: a user name and its secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Account {
    pub user: String,
    pub secret: String,
}

impl fmt::Debug for Account {
    // The secret never reaches a log line, not even through `{:?}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Account")
            .field("user", &self.user)
            .field("secret", &"<hidden>")
            .finish()
    }
}

/// Shortest secret accepted: RFC 7143 §9.2.1 asks for at least 96 bits.
pub const MIN_SECRET: usize = 12;
/// Longest secret accepted (what SCST and open-iscsi take).
pub const MAX_SECRET: usize = 255;

/// Checks a user name and secret before they are stored.
pub fn validate_account(user: &str, secret: &str) -> Result<(), String> {
    if user.is_empty()
        || user.len() > 255
        || user.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err("a CHAP user name is 1 to 255 characters without blanks".into());
    }
    if secret.len() < MIN_SECRET || secret.len() > MAX_SECRET {
        return Err(format!(
            "a CHAP secret is {MIN_SECRET} to {MAX_SECRET} characters (RFC 7143 asks for at least 96 bits)"
        ));
    }
    if secret.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("a CHAP secret may not contain blanks".into());
    }
    Ok(())
}

/// A CHAP_A algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Md5,
    Sha1,
    Sha256,
    Sha3_256,
}

impl Algorithm {
    pub fn from_code(code: &str) -> Option<Algorithm> {
        match code.trim() {
            "5" => Some(Algorithm::Md5),
            "6" => Some(Algorithm::Sha1),
            "7" => Some(Algorithm::Sha256),
            "8" => Some(Algorithm::Sha3_256),
            _ => None,
        }
    }

    pub fn code(self) -> u8 {
        match self {
            Algorithm::Md5 => 5,
            Algorithm::Sha1 => 6,
            Algorithm::Sha256 => 7,
            Algorithm::Sha3_256 => 8,
        }
    }

    pub fn digest_len(self) -> usize {
        match self {
            Algorithm::Md5 => 16,
            Algorithm::Sha1 => 20,
            Algorithm::Sha256 | Algorithm::Sha3_256 => 32,
        }
    }

    /// The CHAP response: H(identifier || secret || challenge) (RFC 1994 §4.1).
    pub fn response(self, id: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
        fn run<D: Digest>(id: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
            let mut d = D::new();
            d.update([id]);
            d.update(secret);
            d.update(challenge);
            d.finalize().to_vec()
        }
        match self {
            Algorithm::Md5 => run::<Md5>(id, secret, challenge),
            Algorithm::Sha1 => run::<Sha1>(id, secret, challenge),
            Algorithm::Sha256 => run::<Sha256>(id, secret, challenge),
            Algorithm::Sha3_256 => run::<Sha3_256>(id, secret, challenge),
        }
    }
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keep the compiler from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

/// Decodes a binary value (RFC 7143 §6.1: `0x` hex or `0b` base64).
pub fn decode_binary(v: &str) -> Option<Vec<u8>> {
    let v = v.trim();
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if h.is_empty() {
            return None;
        }
        // An odd number of digits has an implied leading zero.
        let padded;
        let h = if h.len() % 2 == 1 {
            padded = format!("0{h}");
            padded.as_str()
        } else {
            h
        };
        return (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(h.get(i..i + 2)?, 16).ok())
            .collect();
    }
    if let Some(b) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        return base64_decode(b);
    }
    None
}

/// Encodes bytes as a `0x` hex binary value.
pub fn encode_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + 2 * bytes.len());
    s.push_str("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        })
    }
    let s = s.trim_end_matches('=').as_bytes();
    if s.is_empty() || s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

/// Why a CHAP exchange failed. The login answers 0x0201 for all of them; the reason goes to
/// the log (never with a secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum ChapError {
    /// the initiator offered no CHAP algorithm the target supports ({0})
    NoAlgorithm(String),
    /// a CHAP key arrived out of order ({0})
    OutOfOrder(&'static str),
    /// CHAP_R or CHAP_N is missing
    Missing,
    /// the CHAP value of {0} is malformed
    Malformed(&'static str),
    /// unknown CHAP user {0:?}
    UnknownUser(String),
    /// wrong CHAP response for user {0:?}
    WrongSecret(String),
    /// the initiator asked for mutual CHAP but the target has no OutgoingUser
    NoOutgoing,
    /// the initiator's challenge repeats the target's (reflection)
    Reflection,
    /// the initiator's challenge is too short or too long
    BadChallenge,
    /// no random challenge could be made: {0}
    Random(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Waiting for CHAP_A.
    Start,
    /// Challenge sent; waiting for CHAP_N/CHAP_R.
    Challenged {
        alg: Algorithm,
        id: u8,
        challenge: Vec<u8>,
    },
    /// The initiator is authenticated (and the target too, if mutual).
    Done,
}

/// One connection's CHAP exchange.
#[derive(Debug)]
pub struct Chap {
    state: State,
}

impl Default for Chap {
    fn default() -> Self {
        Self::new()
    }
}

impl Chap {
    pub fn new() -> Chap {
        Chap {
            state: State::Start,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The first CHAP step: the initiator's CHAP_A list. Returns the keys to send (CHAP_A,
    /// CHAP_I, CHAP_C). The target takes the first algorithm of the initiator's list it knows.
    pub fn offer(&mut self, chap_a: &str) -> Result<Vec<(String, String)>, ChapError> {
        if self.state != State::Start {
            return Err(ChapError::OutOfOrder("CHAP_A"));
        }
        let alg = chap_a
            .split(',')
            .find_map(Algorithm::from_code)
            .ok_or_else(|| ChapError::NoAlgorithm(chap_a.chars().take(64).collect()))?;
        let mut rnd = [0u8; 33];
        getrandom::fill(&mut rnd).map_err(|e| ChapError::Random(e.to_string()))?;
        let id = rnd[0];
        // At least 16 bytes, and as long as the digest.
        let challenge = rnd[1..1 + alg.digest_len().max(16)].to_vec();
        let keys = vec![
            ("CHAP_A".to_string(), alg.code().to_string()),
            ("CHAP_I".to_string(), id.to_string()),
            ("CHAP_C".to_string(), encode_hex(&challenge)),
        ];
        self.state = State::Challenged { alg, id, challenge };
        Ok(keys)
    }

    /// The initiator's answer: CHAP_N and CHAP_R, and CHAP_I/CHAP_C when it wants the target
    /// to authenticate too. Checks the response against `incoming` and, for mutual CHAP,
    /// returns the target's CHAP_N/CHAP_R made with `outgoing`. Returns the user name that
    /// authenticated along with the keys to send.
    pub fn answer(
        &mut self,
        keys: &[(String, String)],
        incoming: &[Account],
        outgoing: Option<&Account>,
    ) -> Result<(String, Vec<(String, String)>), ChapError> {
        let State::Challenged { alg, id, challenge } = &self.state else {
            return Err(ChapError::OutOfOrder("CHAP_R"));
        };
        let (alg, id) = (*alg, *id);
        let get = |k: &str| keys.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.as_str());
        let (Some(name), Some(resp)) = (get("CHAP_N"), get("CHAP_R")) else {
            return Err(ChapError::Missing);
        };
        let resp = decode_binary(resp).ok_or(ChapError::Malformed("CHAP_R"))?;
        if resp.len() != alg.digest_len() {
            return Err(ChapError::Malformed("CHAP_R"));
        }
        // Mutual CHAP: check the initiator's challenge before anything is computed with it.
        let mutual = match (get("CHAP_I"), get("CHAP_C")) {
            (None, None) => None,
            (Some(i), Some(c)) => {
                let i: u8 = i
                    .trim()
                    .parse()
                    .map_err(|_| ChapError::Malformed("CHAP_I"))?;
                let c = decode_binary(c).ok_or(ChapError::Malformed("CHAP_C"))?;
                if c.len() < 16 || c.len() > 1024 {
                    return Err(ChapError::BadChallenge);
                }
                if constant_time_eq(&c, challenge) {
                    return Err(ChapError::Reflection);
                }
                Some((i, c))
            }
            _ => return Err(ChapError::Missing),
        };
        // Every account of that name is tried (a target may list one user twice while a
        // secret is being rotated); the comparison never stops early on a mismatch.
        let mut ok = false;
        let mut known = false;
        for a in incoming.iter().filter(|a| a.user == name) {
            known = true;
            let expect = alg.response(id, a.secret.as_bytes(), challenge);
            ok |= constant_time_eq(&expect, &resp);
        }
        if !known {
            return Err(ChapError::UnknownUser(name.chars().take(64).collect()));
        }
        if !ok {
            return Err(ChapError::WrongSecret(name.chars().take(64).collect()));
        }
        let mut out = Vec::new();
        if let Some((i, c)) = mutual {
            let Some(o) = outgoing else {
                return Err(ChapError::NoOutgoing);
            };
            if incoming.iter().any(|a| a.secret == o.secret) {
                // RFC 7143 §12.1.3: the two directions must not share a secret.
                return Err(ChapError::NoOutgoing);
            }
            out.push(("CHAP_N".to_string(), o.user.clone()));
            out.push((
                "CHAP_R".to_string(),
                encode_hex(&alg.response(i, o.secret.as_bytes(), &c)),
            ));
        }
        self.state = State::Done;
        Ok((name.to_string(), out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acct(u: &str, s: &str) -> Account {
        Account {
            user: u.into(),
            secret: s.into(),
        }
    }

    fn get<'a>(keys: &'a [(String, String)], k: &str) -> &'a str {
        keys.iter()
            .find(|(kk, _)| kk == k)
            .map(|(_, v)| v.as_str())
            .unwrap()
    }

    /// What an initiator computes from the target's challenge.
    fn initiator_reply(
        offer: &[(String, String)],
        user: &str,
        secret: &str,
    ) -> Vec<(String, String)> {
        let alg = Algorithm::from_code(get(offer, "CHAP_A")).unwrap();
        let id: u8 = get(offer, "CHAP_I").parse().unwrap();
        let c = decode_binary(get(offer, "CHAP_C")).unwrap();
        vec![
            ("CHAP_N".into(), user.into()),
            (
                "CHAP_R".into(),
                encode_hex(&alg.response(id, secret.as_bytes(), &c)),
            ),
        ]
    }

    #[test]
    fn known_md5_vector() {
        // RFC 1994 style: MD5(0x01 || "secret" || challenge).
        let r = Algorithm::Md5.response(1, b"secret", &[0u8; 16]);
        assert_eq!(r.len(), 16);
        let again = Algorithm::Md5.response(1, b"secret", &[0u8; 16]);
        assert_eq!(r, again);
        assert_ne!(r, Algorithm::Md5.response(2, b"secret", &[0u8; 16]));
        assert_eq!(Algorithm::Sha3_256.response(1, b"x", b"y").len(), 32);
        assert_eq!(Algorithm::Sha1.response(1, b"x", b"y").len(), 20);
    }

    #[test]
    fn one_way_with_every_algorithm() {
        for a in ["5", "6", "7", "8"] {
            let mut c = Chap::new();
            let offer = c.offer(a).unwrap();
            assert_eq!(get(&offer, "CHAP_A"), a);
            let reply = initiator_reply(&offer, "joe", "twelve-chars-secret");
            let (user, out) = c
                .answer(&reply, &[acct("joe", "twelve-chars-secret")], None)
                .unwrap();
            assert_eq!(user, "joe");
            assert!(out.is_empty());
            assert!(c.is_done());
        }
    }

    #[test]
    fn picks_the_first_supported_in_the_initiators_order() {
        let mut c = Chap::new();
        assert_eq!(get(&c.offer("99,7,5").unwrap(), "CHAP_A"), "7");
        let mut c = Chap::new();
        assert!(matches!(c.offer("1,2"), Err(ChapError::NoAlgorithm(_))));
    }

    #[test]
    fn wrong_secret_and_unknown_user_fail() {
        let accts = [acct("joe", "twelve-chars-secret")];
        let mut c = Chap::new();
        let offer = c.offer("5").unwrap();
        let reply = initiator_reply(&offer, "joe", "another-secret!");
        assert_eq!(
            c.answer(&reply, &accts, None),
            Err(ChapError::WrongSecret("joe".into()))
        );
        let mut c = Chap::new();
        let offer = c.offer("5").unwrap();
        let reply = initiator_reply(&offer, "ann", "twelve-chars-secret");
        assert_eq!(
            c.answer(&reply, &accts, None),
            Err(ChapError::UnknownUser("ann".into()))
        );
    }

    #[test]
    fn mutual_answers_with_the_outgoing_secret_and_refuses_reflection() {
        let accts = [acct("joe", "twelve-chars-secret")];
        let out = acct("tgt", "target-side-secret");
        let mut c = Chap::new();
        let offer = c.offer("7").unwrap();
        let mut reply = initiator_reply(&offer, "joe", "twelve-chars-secret");
        let my_c = [7u8; 32];
        reply.push(("CHAP_I".into(), "42".into()));
        reply.push(("CHAP_C".into(), encode_hex(&my_c)));
        let (_, keys) = c.answer(&reply, &accts, Some(&out)).unwrap();
        assert_eq!(get(&keys, "CHAP_N"), "tgt");
        let r = decode_binary(get(&keys, "CHAP_R")).unwrap();
        assert_eq!(
            r,
            Algorithm::Sha256.response(42, b"target-side-secret", &my_c)
        );

        // The target's own challenge sent back is refused.
        let mut c = Chap::new();
        let offer = c.offer("5").unwrap();
        let mut reply = initiator_reply(&offer, "joe", "twelve-chars-secret");
        reply.push(("CHAP_I".into(), "1".into()));
        reply.push(("CHAP_C".into(), get(&offer, "CHAP_C").into()));
        assert_eq!(
            c.answer(&reply, &accts, Some(&out)),
            Err(ChapError::Reflection)
        );

        // Mutual without an OutgoingUser fails.
        let mut c = Chap::new();
        let offer = c.offer("5").unwrap();
        let mut reply = initiator_reply(&offer, "joe", "twelve-chars-secret");
        reply.push(("CHAP_I".into(), "1".into()));
        reply.push(("CHAP_C".into(), encode_hex(&[1u8; 16])));
        assert_eq!(c.answer(&reply, &accts, None), Err(ChapError::NoOutgoing));
    }

    #[test]
    fn binary_values() {
        assert_eq!(decode_binary("0x0aFF"), Some(vec![0x0a, 0xff]));
        assert_eq!(decode_binary("0xabc"), Some(vec![0x0a, 0xbc]));
        assert_eq!(decode_binary("0bAQID"), Some(vec![1, 2, 3]));
        assert_eq!(decode_binary("0bAQI="), Some(vec![1, 2]));
        assert_eq!(decode_binary("0x"), None);
        assert_eq!(decode_binary("0xzz"), None);
        assert_eq!(decode_binary("1234"), None);
        assert_eq!(encode_hex(&[0, 255]), "0x00ff");
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn debug_hides_the_secret() {
        let s = format!("{:?}", acct("joe", "twelve-chars-secret"));
        assert!(!s.contains("twelve"));
    }

    #[test]
    fn account_validation() {
        assert!(validate_account("joe", "twelve-chars").is_ok());
        assert!(validate_account("joe", "short").is_err());
        assert!(validate_account("", "twelve-chars").is_err());
        assert!(validate_account("a b", "twelve-chars").is_err());
    }
}
