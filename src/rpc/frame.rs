//! Where each request ends in the RPC byte stream.
//!
//! Requests are JSON values written back to back (SPDK's framing), so the end of one is found
//! by scanning for the bracket that closes its first one: the scanner tracks the nesting depth
//! and whether it is inside a string (and after a backslash there), and resumes where it
//! stopped when more bytes arrive. Each byte is examined once however the stream is split;
//! serde_json then parses each complete value once. A top-level value must be an object or an
//! array (a request or a batch, RFC 8259 §2 and JSON-RPC 2.0 §4, §6): the scanner cannot find
//! the end of a bare number, and a stream that holds anything else cannot be resynchronised.

use std::ops::Range;

/// Why the stream cannot be read further; the connection is answered and closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum FrameError {
    /// a request must be a JSON object or a batch array, not a value starting with '{0}'
    NotContainer(String),
    /// a request is larger than the {0} bytes allowed
    TooLarge(usize),
}

/// Splits a byte stream into top-level JSON values: `push` what was read, then take values with
/// `next_value` until it returns `None`.
#[derive(Debug)]
pub struct Framer {
    buf: Vec<u8>,
    /// Start of the bytes not yet handed out: the value being scanned, or nothing yet.
    head: usize,
    /// The next byte to examine.
    pos: usize,
    /// Nesting depth of the value being scanned; 0 between values.
    depth: usize,
    in_string: bool,
    escaped: bool,
    limit: usize,
    examined: u64,
}

/// Capacity kept for the next request after a large one was consumed.
const KEEP_CAPACITY: usize = 64 << 10;

/// JSON's insignificant whitespace (RFC 8259 §2).
fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl Framer {
    /// A framer refusing values longer than `limit` bytes.
    pub fn new(limit: usize) -> Framer {
        Framer {
            buf: Vec::new(),
            head: 0,
            pos: 0,
            depth: 0,
            in_string: false,
            escaped: false,
            limit,
            examined: 0,
        }
    }

    /// Appends bytes read from the stream. What was handed out is dropped first, so a byte is
    /// moved at most twice while it waits: once when the values before it are consumed, and
    /// once more when the whitespace before its own value is skipped.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.head > 0 {
            self.buf.drain(..self.head);
            self.pos -= self.head;
            self.head = 0;
            if self.buf.is_empty() && self.buf.capacity() > KEEP_CAPACITY {
                self.buf = Vec::new();
            }
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete value, or `None` until more bytes arrive. After an error the framer must not be used again.
    pub fn next_value(&mut self) -> Result<Option<&[u8]>, FrameError> {
        match self.scan()? {
            Some(r) => Ok(self.buf.get(r)),
            None => Ok(None),
        }
    }

    fn scan(&mut self) -> Result<Option<Range<usize>>, FrameError> {
        while let Some(&b) = self.buf.get(self.pos) {
            self.pos += 1;
            self.examined += 1;
            if self.depth == 0 {
                match b {
                    _ if is_ws(b) => self.head = self.pos,
                    b'{' | b'[' => self.depth = 1,
                    _ => {
                        return Err(FrameError::NotContainer(
                            std::ascii::escape_default(b).to_string(),
                        ))
                    }
                }
            } else if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
            } else {
                match b {
                    b'"' => self.in_string = true,
                    // The depth never exceeds the bytes examined, so it cannot overflow.
                    b'{' | b'[' => self.depth += 1,
                    b'}' | b']' => {
                        self.depth -= 1;
                        if self.depth == 0 {
                            let value = self.head..self.pos;
                            self.head = self.pos;
                            if value.len() > self.limit {
                                return Err(FrameError::TooLarge(self.limit));
                            }
                            return Ok(Some(value));
                        }
                    }
                    _ => {}
                }
            }
            if self.pos - self.head > self.limit {
                return Err(FrameError::TooLarge(self.limit));
            }
        }
        Ok(None)
    }

    /// Whether part of a value has arrived without its end.
    pub fn has_partial(&self) -> bool {
        self.depth > 0
    }

    /// Bytes examined so far (each byte of the stream once).
    pub fn examined(&self) -> u64 {
        self.examined
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    /// Feeds `chunks` and parses every value the framer hands out.
    fn values(f: &mut Framer, chunks: &[&[u8]]) -> Result<Vec<Value>, FrameError> {
        let mut out = Vec::new();
        for c in chunks {
            f.push(c);
            while let Some(v) = f.next_value()? {
                out.push(serde_json::from_slice(v).unwrap());
            }
        }
        Ok(out)
    }

    #[test]
    fn back_to_back_values_split_anywhere() {
        let stream = br#" {"a":"}]\"{[","b":[1,{"c":null}]}[{"id":1}]
{"x":"\\"}"#;
        let whole = values(&mut Framer::new(1 << 20), &[stream]).unwrap();
        assert_eq!(
            whole,
            vec![
                json!({"a": "}]\"{[", "b": [1, {"c": null}]}),
                json!([{"id": 1}]),
                json!({"x": "\\"}),
            ]
        );
        for cut in 0..=stream.len() {
            let (a, b) = stream.split_at(cut);
            let mut f = Framer::new(1 << 20);
            assert_eq!(values(&mut f, &[a, b]).unwrap(), whole, "cut at {cut}");
            assert_eq!(f.examined(), stream.len() as u64);
            assert!(!f.has_partial());
        }
    }

    #[test]
    fn partial_value_waits() {
        let mut f = Framer::new(1 << 20);
        assert!(values(&mut f, &[br#"{"a":[1,"#]).unwrap().is_empty());
        assert!(f.has_partial());
        assert_eq!(
            values(&mut f, &[b"2]}"]).unwrap(),
            vec![json!({"a": [1, 2]})]
        );
        assert!(!f.has_partial());
    }

    #[test]
    fn top_level_scalars_are_refused() {
        for (s, first) in [
            (&b"5"[..], "5"),
            (b"\"x\"", "\\\""),
            (b"null", "n"),
            (b"}", "}"),
            (b"{}\xff", "\\xff"),
        ] {
            let e = values(&mut Framer::new(1 << 20), &[s]).unwrap_err();
            assert_eq!(e, FrameError::NotContainer(first.into()), "{s:?}");
        }
    }

    #[test]
    fn a_value_over_the_limit_is_refused_as_it_grows() {
        let mut f = Framer::new(16);
        f.push(b"  {\"a\":\"0123456");
        assert_eq!(f.next_value(), Ok(None));
        f.push(b"789abcdef");
        assert_eq!(f.next_value(), Err(FrameError::TooLarge(16)));
        // Exactly at the limit is fine, whitespace before it does not count.
        let mut f = Framer::new(16);
        assert_eq!(
            values(&mut f, &[b"   {\"a\":\"01234567\"}"]).unwrap(),
            vec![json!({"a": "01234567"})]
        );
    }

    #[test]
    fn whitespace_between_values_is_not_kept() {
        let mut f = Framer::new(8);
        for _ in 0..100 {
            f.push(b"\n\n\n\n   \t\r\n");
            assert_eq!(f.next_value(), Ok(None));
        }
        assert!(f.buf.len() <= 16, "{}", f.buf.len());
    }

    /// Any JSON value, nested a few levels, with strings full of brackets, quotes and escapes.
    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            "[\\\\\"{}\\[\\]a-z \\n\\u{0}-\\u{1f}é😀]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("[a-z\"\\\\{}]{0,6}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// A top-level value: an object or an array.
    fn request() -> impl Strategy<Value = Value> {
        json_value().prop_map(|v| match v {
            Value::Array(_) | Value::Object(_) => v,
            other => json!({ "id": 1, "params": [other] }),
        })
    }

    proptest! {
        #[test]
        fn splitting_a_stream_anywhere_gives_the_same_values(
            reqs in prop::collection::vec(request(), 1..8),
            gaps in prop::collection::vec("[ \t\r\n]{0,3}", 8),
            pretty in any::<bool>(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let mut stream = Vec::new();
            for (r, gap) in reqs.iter().zip(gaps.iter().cycle()) {
                stream.extend_from_slice(gap.as_bytes());
                let text = if pretty {
                    serde_json::to_vec_pretty(r).unwrap()
                } else {
                    serde_json::to_vec(r).unwrap()
                };
                stream.extend_from_slice(&text);
            }
            let mut at: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
            at.push(0);
            at.push(stream.len());
            at.sort_unstable();
            let chunks: Vec<&[u8]> = at.windows(2).map(|w| &stream[w[0]..w[1]]).collect();
            let mut f = Framer::new(1 << 20);
            let got = values(&mut f, &chunks).unwrap();
            prop_assert_eq!(got, reqs);
            // Each byte examined exactly once, however the stream was cut.
            prop_assert_eq!(f.examined(), stream.len() as u64);
            prop_assert!(!f.has_partial());
        }
    }

    #[test]
    fn byte_by_byte_examines_each_byte_once() {
        // 1 MiB of requests fed one byte at a time: the work is linear in the input.
        let one = br#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"path":"version"}}"#;
        let big =
            json!({"id": 2, "method": "load_config", "params": {"config": "x".repeat(1 << 20)}});
        let mut stream = one.repeat(100);
        stream.extend_from_slice(big.to_string().as_bytes());
        let mut f = Framer::new(16 << 20);
        let mut n = 0;
        for b in &stream {
            f.push(std::slice::from_ref(b));
            while f.next_value().unwrap().is_some() {
                n += 1;
            }
        }
        assert_eq!(n, 101);
        assert_eq!(f.examined(), stream.len() as u64);
    }
}
