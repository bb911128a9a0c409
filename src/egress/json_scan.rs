//! The JSON check of `validate: { json: true }` and of schema rules, without building a tree:
//! serde_json's grammar, and no key twice in one object. [`check`] runs a fast, accept-only pass,
//! then serde_json's parser behind it.
//!
//! serde_json checks a 170 KB document of metric points at about 250–400 MB/s on this project's
//! benchmark machine, most of it per-token overhead (visitor calls, number conversion), which
//! made JSON validation the slowest egress path. The fast pass checks the grammar only, at about
//! 2.5× that speed, and is deliberately narrower than serde_json: whatever it cannot vouch for
//! cheaply (surrogate escapes, numbers near the ends of `f64`'s range, nesting deeper than 64, a
//! key seen twice, and of course every malformed document) it leaves to serde_json, which then
//! gives the verdict and the error message. So `accepts(b) == true` must imply that
//! `serde_json::Value` accepts `b` and that no object in it repeats a key (a differential test
//! below checks that on mutated documents); `false` means "ask serde_json".
//!
//! Repeated keys are the one difference from `serde_json::Value`, which keeps the last: parsers
//! disagree on which one counts, so an upstream may act on a value the rule never checked.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashSet;
use std::hash::Hash;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use super::refusal::Refusal;

/// Deeper documents go to serde_json, whose own limit (128) then decides.
const MAX_DEPTH: usize = 64;

/// Refuses (422) `body` unless it is one JSON document, as `serde_json::Value` reads it, without
/// a key twice in one object.
pub(super) fn check(body: &[u8]) -> Result<(), Refusal> {
    // One UTF-8 check of the whole body, then the `str` parser, which skips the check per
    // string: JSON outside strings is ASCII, so this accepts what `from_slice` accepts.
    let text = std::str::from_utf8(body)
        .map_err(|e| Refusal::invalid(format!("body is not valid JSON: not UTF-8 ({e})")))?;
    if accepts(text.as_bytes()) {
        return Ok(());
    }
    let repeated = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = WellFormed(&repeated)
        .deserialize(&mut de)
        .and_then(|()| de.end());
    match (parsed, repeated.into_inner()) {
        (Ok(()), _) => Ok(()),
        (Err(e), Some(key)) => Err(Refusal::invalid(format!(
            "body has the key {} twice in one object (line {} column {}); send each key once",
            shown(&key),
            e.line(),
            e.column()
        ))),
        (Err(e), None) => Err(Refusal::invalid(format!("body is not valid JSON: {e}"))),
    }
}

/// A key for a one-line reason: quoted, and cut short if long.
fn shown(key: &str) -> String {
    const MOST: usize = 40;
    match key.char_indices().nth(MOST) {
        Some((end, _)) => format!("{:?}…", &key[..end]),
        None => format!("{key:?}"),
    }
}

/// True only if `serde_json` also accepts `b` as a `Value` and no object in it repeats a key;
/// false when unsure.
pub(super) fn accepts(b: &[u8]) -> bool {
    document(b).is_some()
}

fn document(b: &[u8]) -> Option<()> {
    // Open containers, innermost last: true for an object.
    let mut stack = [false; MAX_DEPTH];
    // The keys of the open objects, by depth (kept between objects for their allocations).
    let mut keys: Vec<Shape> = Vec::new();
    let mut depth = 0;
    let mut i = skip_ws(b, 0);
    'value: loop {
        match *b.get(i)? {
            b'{' => {
                if depth == MAX_DEPTH {
                    return None;
                }
                stack[depth] = true;
                if keys.len() <= depth {
                    keys.resize_with(depth + 1, Shape::default);
                }
                keys[depth].open();
                depth += 1;
                i = skip_ws(b, i + 1);
                match *b.get(i)? {
                    b'}' => {
                        depth -= 1;
                        i += 1;
                    }
                    b'"' => {
                        i = key(b, i, &mut keys[depth - 1])?;
                        continue 'value;
                    }
                    _ => return None,
                }
            }
            b'[' => {
                if depth == MAX_DEPTH {
                    return None;
                }
                stack[depth] = false;
                depth += 1;
                i = skip_ws(b, i + 1);
                if *b.get(i)? != b']' {
                    continue 'value;
                }
                depth -= 1;
                i += 1;
            }
            b'"' => i = string(b, i + 1, &mut false)?,
            b't' => i = literal(b, i, b"true")?,
            b'f' => i = literal(b, i, b"false")?,
            b'n' => i = literal(b, i, b"null")?,
            _ => i = number(b, i)?,
        }
        // After a value: close containers, or go on to the next element or member.
        loop {
            i = skip_ws(b, i);
            if depth == 0 {
                return (i == b.len()).then_some(());
            }
            match (*b.get(i)?, stack[depth - 1]) {
                (b',', false) => {
                    i = skip_ws(b, i + 1);
                    continue 'value;
                }
                (b',', true) => {
                    i = skip_ws(b, i + 1);
                    if *b.get(i)? != b'"' {
                        return None;
                    }
                    i = key(b, i, &mut keys[depth - 1])?;
                    continue 'value;
                }
                (b']', false) => {
                    depth -= 1;
                    i += 1;
                }
                (b'}', true) => {
                    depth -= 1;
                    keys[depth].close();
                    i += 1;
                }
                _ => return None,
            }
        }
    }
}

#[inline(always)]
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\n' | b'\r' | b'\t') {
        i += 1;
    }
    i
}

/// A member's key at `i` (its opening quote), the colon and the whitespace before the value.
/// A key already in `seen` is left to serde_json (which then names it). Keys are compared
/// decoded: `"a"` and `"\u0061"` are the same key.
#[inline(always)]
fn key<'a>(b: &'a [u8], i: usize, seen: &mut Shape<'a>) -> Option<usize> {
    let mut escaped = false;
    let end = string(b, i + 1, &mut escaped)?;
    let name = &b[i + 1..end - 1];
    let name = if escaped {
        let mut decoded = Vec::with_capacity(name.len());
        super::json_strings::decode(b, i + 1, &mut decoded);
        Cow::Owned(decoded)
    } else {
        Cow::Borrowed(name)
    };
    if seen.insert(name).is_err() {
        return None;
    }
    let i = skip_ws(b, end);
    (*b.get(i)? == b':').then(|| skip_ws(b, i + 1))
}

/// The keys of the open object at one depth, checked against the keys of the last object closed
/// at that depth. Documents of metric points repeat one shape thousands of times; while an object
/// follows the last one's keys in order, one comparison per key proves it has no repeated key
/// (the last one had none). An object that departs from it is checked in full by [`Keys`], and
/// becomes the shape that the next objects are compared with.
#[derive(Default)]
struct Shape<'a> {
    /// The last closed object's keys in order, all different, when it had few.
    last: Vec<Cow<'a, [u8]>>,
    /// How many of the open object's keys are `last[..matched]`, while it follows `last`.
    matched: usize,
    departed: bool,
    /// The open object's keys, once it departed from `last`.
    seen: Keys<Cow<'a, [u8]>>,
}

impl<'a> Shape<'a> {
    fn open(&mut self) {
        self.matched = 0;
        self.departed = false;
    }

    #[inline(always)]
    fn insert(&mut self, key: Cow<'a, [u8]>) -> Result<(), Cow<'a, [u8]>> {
        if !self.departed {
            if self.last.get(self.matched) == Some(&key) {
                self.matched += 1;
                return Ok(());
            }
            self.departed = true;
            self.seen.clear();
            for earlier in &self.last[..self.matched] {
                // Distinct by construction.
                let _ = self.seen.insert(earlier.clone());
            }
        }
        self.seen.insert(key)
    }

    fn close(&mut self) {
        if self.departed && self.seen.many.is_empty() {
            std::mem::swap(&mut self.last, &mut self.seen.few);
        }
    }
}

/// The keys of one object: compared one by one while there are few (most objects), hashed past
/// that, so a huge object costs no more than its size.
#[derive(Debug)]
struct Keys<K> {
    few: Vec<K>,
    many: HashSet<K>,
}

impl<K> Default for Keys<K> {
    fn default() -> Self {
        Keys {
            few: Vec::new(),
            many: HashSet::new(),
        }
    }
}

/// Objects with more keys than this hash them.
const FEW_KEYS: usize = 16;

impl<K: Eq + Hash> Keys<K> {
    /// Adds `key`; if it is there already, gives it back.
    fn insert(&mut self, key: K) -> Result<(), K> {
        if self.many.is_empty() {
            if self.few.contains(&key) {
                return Err(key);
            }
            if self.few.len() < FEW_KEYS {
                self.few.push(key);
                return Ok(());
            }
            self.many.extend(self.few.drain(..));
        }
        match self.many.replace(key) {
            Some(was) => Err(was),
            None => Ok(()),
        }
    }

    fn clear(&mut self) {
        self.few.clear();
        self.many.clear();
    }
}

/// serde_json's parser with a visitor that builds nothing: it accepts exactly the documents
/// `serde_json::Value` accepts (same number, string, escape and nesting-depth checks), except
/// those with a repeated key, which it notes (decoded) and stops at. Building the tree would cost
/// several times the parse itself (an allocation per string, a map per object).
struct WellFormed<'r>(&'r RefCell<Option<String>>);

impl<'de> DeserializeSeed<'de> for WellFormed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for WellFormed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(WellFormed(self.0))?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut keys = Keys::default();
        while let Some(Key(key)) = map.next_key()? {
            if let Err(key) = keys.insert(key) {
                *self.0.borrow_mut() = Some(key.into_owned());
                return Err(serde::de::Error::custom("repeated key"));
            }
            map.next_value_seed(WellFormed(self.0))?;
        }
        Ok(())
    }
}

/// An object key, decoded; borrowed from the body when it has no escape.
struct Key<'de>(Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Key<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object key")
    }
    fn visit_borrowed_str<E>(self, key: &'de str) -> Result<Key<'de>, E> {
        Ok(Key(Cow::Borrowed(key)))
    }
    fn visit_str<E>(self, key: &str) -> Result<Key<'de>, E> {
        Ok(Key(Cow::Owned(key.to_owned())))
    }
}

#[inline(always)]
fn literal(b: &[u8], i: usize, word: &[u8]) -> Option<usize> {
    (b.get(i..i + word.len())? == word).then_some(i + word.len())
}

/// The index after the closing quote of a string whose contents start at `i`; sets `escaped` if
/// it has a backslash.
#[inline(always)]
fn string(b: &[u8], mut i: usize, escaped: &mut bool) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    loop {
        // Eight bytes at a time up to the first quote, backslash or control character (the
        // usual "has a zero byte" / "has a byte less than n" word tricks; the lowest flagged
        // byte is always a true match, and it is looked at again one byte at a time below).
        while let Some(chunk) = b.get(i..i + 8) {
            let w = u64::from_le_bytes(chunk.try_into().ok()?);
            let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
            let found = zero(w ^ (ONES * u64::from(b'"')))
                | zero(w ^ (ONES * u64::from(b'\\')))
                | (w.wrapping_sub(ONES * 0x20) & !w & HIGH);
            if found != 0 {
                i += (found.trailing_zeros() / 8) as usize;
                break;
            }
            i += 8;
        }
        match *b.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => {
                *escaped = true;
                match *b.get(i + 1)? {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => i += 2,
                    b'u' => {
                        let mut code = 0;
                        for &h in b.get(i + 2..i + 6)? {
                            code = code * 16 + char::from(h).to_digit(16)?;
                        }
                        // Surrogate pairs (and lone surrogates, which serde_json refuses): ask it.
                        if (0xD800..0xE000).contains(&code) {
                            return None;
                        }
                        i += 6;
                    }
                    _ => return None,
                }
            }
            0..=0x1f => return None,
            _ => i += 1,
        }
    }
}

#[inline(always)]
fn digits(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    i
}

/// The index after a number starting at `i`. serde_json refuses numbers whose value overflows
/// `f64` ("number out of range"); the grammar alone cannot tell where that starts, so anything
/// that could come near it (more than 200 integer digits with an exponent, 300 without, or an
/// exponent of three digits or more) is left to serde_json.
#[inline(always)]
fn number(b: &[u8], mut i: usize) -> Option<usize> {
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    let start = i;
    match *b.get(i)? {
        b'0' => i += 1,
        b'1'..=b'9' => i = digits(b, i + 1),
        _ => return None,
    }
    let integer_digits = i - start;
    if integer_digits > 300 {
        return None;
    }
    if b.get(i) == Some(&b'.') {
        let end = digits(b, i + 1);
        if end == i + 1 {
            return None;
        }
        i = end;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let end = digits(b, i);
        if end == i || end - i > 2 || integer_digits > 200 {
            return None;
        }
        i = end;
    }
    Some(i)
}

#[cfg(test)]
mod tests {
    use super::{accepts, check};
    use std::collections::BTreeSet;

    /// The reference: serde_json reads `doc` as a `Value`, and, read again with every object's
    /// keys gathered, no object repeats one (`Value` keeps the last of them silently).
    fn by_serde(doc: &[u8]) -> bool {
        serde_json::from_slice::<serde_json::Value>(doc).is_ok()
            && serde_json::from_slice::<Unique>(doc).is_ok()
    }

    struct Unique;

    impl<'de> serde::Deserialize<'de> for Unique {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(Unique)
        }
    }

    impl<'de> serde::de::Visitor<'de> for Unique {
        type Value = Unique;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("JSON")
        }
        fn visit_bool<E>(self, _: bool) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_str<E>(self, _: &str) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_unit<E>(self) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Unique, A::Error> {
            while seq.next_element::<Unique>()?.is_some() {}
            Ok(Unique)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Unique, A::Error> {
            let mut seen = BTreeSet::new();
            while let Some((key, Unique)) = map.next_entry::<String, Unique>()? {
                if !seen.insert(key) {
                    return Err(serde::de::Error::custom("repeated key"));
                }
            }
            Ok(Unique)
        }
    }

    #[test]
    fn a_key_twice_in_one_object_is_refused_and_named() {
        let many: String = (0..40).map(|k| format!("\"k{k}\": {k}, ")).collect();
        let long = "x".repeat(300);
        let repeated: Vec<(String, &str)> = vec![
            (r#"{"level":"evil","level":"info"}"#.into(), "\"level\""),
            (
                r#"{"lev\u0065l":"evil","level":"info"}"#.into(),
                "\"level\"",
            ),
            (r#"[{"a": {"b": 1, "c": 2, "b": 3}}]"#.into(), "\"b\""),
            (format!("{{{many}\"k7\": 0}}"), "\"k7\""),
            (format!(r#"{{"{long}":1,"{long}":2}}"#), "\"xxxxxxxxxx"),
            // After objects of one shape, which later ones are compared with.
            (r#"[{"a":1,"b":2},{"a":1,"a":2}]"#.into(), "\"a\""),
            (r#"[{"a":1,"b":2},{"a":1,"b":2,"a":3}]"#.into(), "\"a\""),
            (r#"[{"a":1,"b":2},{"b":1,"a":2,"b":3}]"#.into(), "\"b\""),
            (r#"[{"a":1,"b":2},{"c":1},{"c":1,"c":2}]"#.into(), "\"c\""),
            (
                r#"[{"a":{"x":1,"y":2}},{"a":{"x":1,"x":2}}]"#.into(),
                "\"x\"",
            ),
            (format!("[{{{many}\"z\":0}},{{{many}\"k3\":0}}]"), "\"k3\""),
        ];
        for (doc, named) in &repeated {
            assert!(!accepts(doc.as_bytes()), "{doc}");
            assert!(!by_serde(doc.as_bytes()), "{doc}");
            let err = check(doc.as_bytes()).unwrap_err();
            assert_eq!(err.status.as_u16(), 422, "{doc}");
            assert!(
                err.reason.starts_with(&format!("body has the key {named}")),
                "{doc}: {}",
                err.reason
            );
            assert!(
                err.reason.len() < 160,
                "a long key is cut short: {}",
                err.reason
            );
        }
        let unique: Vec<String> = vec![
            r#"{"a": {"x": 1}, "b": {"x": 2}, "x": 3}"#.into(),
            r#"[{"a": 1}, {"a": 1}]"#.into(),
            r#"[{"a":1,"b":2},{"a":1},{"a":1,"b":2,"c":3},{"c":1,"a":2,"b":3},{}]"#.into(),
            r#"{"a": 1, "A": 2, "a ": 3, "\u00e9": 4, "é ": 5}"#.into(),
            format!("{{{many}\"last\": 0}}"),
        ];
        for doc in &unique {
            assert!(accepts(doc.as_bytes()), "{doc}");
            assert!(check(doc.as_bytes()).is_ok(), "{doc}");
        }
    }

    #[test]
    fn accepts_ordinary_documents_and_refuses_malformed_ones() {
        let good: &[&[u8]] = &[
            b"{\"a\": [1, -2.5e3, true, false, null, \"x\\u00e9\\n\\\"\\\\\\/\", {}], \"b\": {\"c\": \"\"}}",
            b" 42 ",
            b"-0",
            b"0.5E+07",
            b"[]",
            b"{}",
            b"\"\"",
            b"[[[[\"deep\"]]]]",
            "{\"caf\u{e9}\": \"\u{1f600} \u{4e2d} long enough to take the eight-byte path\"}"
                .as_bytes(),
        ];
        for doc in good {
            assert!(accepts(doc), "{:?}", String::from_utf8_lossy(doc));
            assert!(by_serde(doc));
        }
        let bad: &[&[u8]] = &[
            b"",
            b"   ",
            b"[1,]",
            b"{\"a\":1,}",
            b"{1: 2}",
            b"{\"a\" 1}",
            b"{\"a\": 1} trailing",
            b"01",
            b"-",
            b"1.",
            b".5",
            b"1e",
            b"+1",
            b"NaN",
            b"tru",
            b"nul",
            b"\"tab\there\"",
            b"\"\\x\"",
            b"\"\\u12\"",
            b"\"unterminated",
            b"[1 2]",
            b"{\"a\":1]",
            b"[1}",
        ];
        for doc in bad {
            assert!(!accepts(doc), "{:?}", String::from_utf8_lossy(doc));
            assert!(!by_serde(doc));
        }
    }

    #[test]
    fn leaves_what_it_cannot_vouch_for_to_serde_json() {
        let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
        let long_integer = "1".repeat(400);
        let unsure: Vec<&[u8]> = vec![
            b"\"\\ud83d\\ude00\"", // a valid surrogate pair: serde_json accepts
            b"\"\\ud800\"",        // a lone surrogate: serde_json refuses
            b"1e400",              // out of f64's range: serde_json refuses
            b"1e308",              // in range
            deep.as_bytes(),       // deeper than 64, within serde_json's 128
            long_integer.as_bytes(),
        ];
        for doc in unsure {
            assert!(!accepts(doc), "{:?}", String::from_utf8_lossy(doc));
        }
    }

    /// `accepts` must never say yes where serde_json says no: random documents and random
    /// mutations of them (bytes replaced, inserted, deleted, truncated) against `Value`.
    #[test]
    fn never_accepts_what_serde_json_refuses() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let (mut agreed_yes, mut mutants) = (0, 0);
        for _ in 0..20_000 {
            let mut doc = Vec::new();
            random_value(&mut rng, &mut doc, 0);
            assert!(by_serde(&doc), "{:?}", String::from_utf8_lossy(&doc));
            if accepts(&doc) {
                agreed_yes += 1;
            }
            for _ in 0..8 {
                let mut m = doc.clone();
                mutate(&mut rng, &mut m);
                if std::str::from_utf8(&m).is_err() {
                    continue; // the caller checks UTF-8 first
                }
                mutants += 1;
                if accepts(&m) {
                    assert!(by_serde(&m), "accepted {:?}", String::from_utf8_lossy(&m));
                }
            }
        }
        // The fast path must actually be taken for ordinary documents.
        assert!(
            agreed_yes > 18_000,
            "fast path accepted only {agreed_yes} of 20000"
        );
        assert!(mutants > 100_000, "{mutants}");
    }

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    const PIECES: &[&str] = &[
        "\"", "\\", "\\u", "\\ud800", "\\udc00", "0", "-", ".", "e", "E+", "1e400", "[", "]", "{",
        "}", ",", ":", " ", "\t", "\n", "true", "nul", "\u{1}", "\u{e9}", "ÿ", "00", "9",
    ];

    fn mutate(rng: &mut XorShift, doc: &mut Vec<u8>) {
        let at = rng.below(doc.len() + 1);
        match rng.below(4) {
            0 => {
                doc.truncate(at);
            }
            1 if at < doc.len() => {
                doc.remove(at);
            }
            2 if at < doc.len() => {
                doc[at] = PIECES[rng.below(PIECES.len())].as_bytes()[0];
            }
            _ => {
                let piece = PIECES[rng.below(PIECES.len())].as_bytes();
                doc.splice(at..at, piece.iter().copied());
            }
        }
    }

    fn random_value(rng: &mut XorShift, out: &mut Vec<u8>, depth: usize) {
        let kind = if depth > 4 {
            rng.below(5)
        } else {
            rng.below(7)
        };
        match kind {
            0 => out.extend_from_slice([&b"true"[..], b"false", b"null"][rng.below(3)]),
            1 | 2 => {
                let n = [
                    "0",
                    "-0",
                    "7",
                    "-12",
                    "3.25",
                    "1e5",
                    "-2.5E-3",
                    "6.02e+23",
                    "1e99",
                    "123456789012345678901234567890",
                    "0.000001",
                    "18446744073709551616",
                    "-9223372036854775809",
                ];
                out.extend_from_slice(n[rng.below(n.len())].as_bytes());
            }
            3 | 4 => random_string(rng, out),
            5 => {
                out.push(b'[');
                for k in 0..rng.below(4) {
                    if k > 0 {
                        out.extend_from_slice(b", ");
                    }
                    random_value(rng, out, depth + 1);
                }
                out.push(b']');
            }
            _ => {
                out.push(b'{');
                // Distinct keys, as decoded (`"\u00e9"` is `"é"`): a repeated one is refused.
                let mut keys = BTreeSet::new();
                for _ in 0..rng.below(4) {
                    let mut key = Vec::new();
                    random_string(rng, &mut key);
                    let decoded: String = serde_json::from_slice(&key).unwrap();
                    if !keys.insert(decoded) {
                        continue;
                    }
                    if keys.len() > 1 {
                        out.push(b',');
                    }
                    out.extend_from_slice(&key);
                    out.extend_from_slice(b": ");
                    random_value(rng, out, depth + 1);
                }
                out.push(b'}');
            }
        }
    }

    fn random_string(rng: &mut XorShift, out: &mut Vec<u8>) {
        let parts = [
            "abc",
            "web-01",
            "a longer piece of text",
            "\\n",
            "\\\"",
            "\\\\",
            "\\/",
            "\\u00e9",
            "\\u0000",
            "\u{e9}",
            "\u{4e2d}",
            "\u{1f600}",
            "\\t",
            "\u{7f}",
        ];
        out.push(b'"');
        for _ in 0..rng.below(5) {
            out.extend_from_slice(parts[rng.below(parts.len())].as_bytes());
        }
        out.push(b'"');
    }
}
