//! A fast, accept-only pass in front of `serde_json` for `validate: { json: true }`.
//!
//! serde_json checks a 170 KB document of metric points at about 250–400 MB/s on this project's
//! benchmark machine, most of it per-token overhead (visitor calls, number conversion), which
//! made JSON validation the slowest egress path. This scanner checks the grammar only, at about
//! 2.5× that speed, and is deliberately narrower than serde_json: whatever it cannot vouch for
//! cheaply (surrogate escapes, numbers near the ends of `f64`'s range, nesting deeper than 64,
//! and of course every malformed document) it leaves to serde_json, which then gives the verdict
//! and the error message. So `accepts(b) == true` must imply that `serde_json::Value` accepts `b`
//! (a differential test below checks that on mutated documents); `false` means "ask serde_json".
//! The input has already passed one UTF-8 check of the whole body.

/// Deeper documents go to serde_json, whose own limit (128) then decides.
const MAX_DEPTH: usize = 64;

/// True only if `serde_json` also accepts `b` as a `Value`; false when unsure.
pub(super) fn accepts(b: &[u8]) -> bool {
    document(b).is_some()
}

fn document(b: &[u8]) -> Option<()> {
    // Open containers, innermost last: true for an object.
    let mut stack = [false; MAX_DEPTH];
    let mut depth = 0;
    let mut i = skip_ws(b, 0);
    'value: loop {
        match *b.get(i)? {
            b'{' => {
                if depth == MAX_DEPTH {
                    return None;
                }
                stack[depth] = true;
                depth += 1;
                i = skip_ws(b, i + 1);
                match *b.get(i)? {
                    b'}' => {
                        depth -= 1;
                        i += 1;
                    }
                    b'"' => {
                        i = key(b, i)?;
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
            b'"' => i = string(b, i + 1)?,
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
                    i = key(b, i)?;
                    continue 'value;
                }
                (b']', false) | (b'}', true) => {
                    depth -= 1;
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
#[inline(always)]
fn key(b: &[u8], i: usize) -> Option<usize> {
    let i = skip_ws(b, string(b, i + 1)?);
    (*b.get(i)? == b':').then(|| skip_ws(b, i + 1))
}

#[inline(always)]
fn literal(b: &[u8], i: usize, word: &[u8]) -> Option<usize> {
    (b.get(i..i + word.len())? == word).then_some(i + word.len())
}

/// The index after the closing quote of a string whose contents start at `i`.
#[inline(always)]
fn string(b: &[u8], mut i: usize) -> Option<usize> {
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
            b'\\' => match *b.get(i + 1)? {
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
            },
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
    use super::accepts;

    fn by_serde(doc: &[u8]) -> bool {
        serde_json::from_slice::<serde_json::Value>(doc).is_ok()
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
                for k in 0..rng.below(4) {
                    if k > 0 {
                        out.push(b',');
                    }
                    random_string(rng, out);
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
