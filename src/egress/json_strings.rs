//! The strings of a JSON body with their escapes decoded, for the deny patterns: a pattern that
//! refuses `-----BEGIN` must also refuse `"\u002d----BEGIN"` or `"a\/b"`, which every JSON parser
//! upstream reads as the same text. Lenient on purpose: it also reads the strings of a document
//! that is not valid JSON (a lone surrogate, a stray byte), since the upstream's parser may be
//! lenient too.

/// Calls `found` with each string of `body` (keys and values), escapes decoded, until it returns
/// true; whether it did.
pub(super) fn any_string(body: &[u8], mut found: impl FnMut(&[u8]) -> bool) -> bool {
    let mut text = Vec::new();
    let mut i = 0;
    while let Some(quote) = body[i..].iter().position(|&c| c == b'"') {
        i = decode(body, i + quote + 1, &mut text);
        if found(&text) {
            return true;
        }
    }
    false
}

/// Decodes the string whose contents start at `i` into `out`; returns the index after its
/// closing quote (the end of `b` if there is none).
pub(super) fn decode(b: &[u8], mut i: usize, out: &mut Vec<u8>) -> usize {
    out.clear();
    while let Some(&c) = b.get(i) {
        match c {
            b'"' => return i + 1,
            b'\\' => i = escape(b, i + 1, out),
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    i
}

/// Decodes the escape after a backslash at `i`; returns the index after it. An escape JSON does
/// not have is kept as written.
fn escape(b: &[u8], i: usize, out: &mut Vec<u8>) -> usize {
    let Some(&c) = b.get(i) else {
        out.push(b'\\');
        return i;
    };
    let byte = match c {
        b'"' | b'\\' | b'/' => c,
        b'b' => 0x08,
        b'f' => 0x0c,
        b'n' => b'\n',
        b'r' => b'\r',
        b't' => b'\t',
        b'u' => return unicode(b, i + 1, out),
        _ => {
            out.extend_from_slice(&[b'\\', c]);
            return i + 1;
        }
    };
    out.push(byte);
    i + 1
}

/// Decodes `XXXX` of `\uXXXX` at `i` (and a low surrogate's `\uXXXX` after a high one).
fn unicode(b: &[u8], i: usize, out: &mut Vec<u8>) -> usize {
    let Some(high) = hex4(b, i) else {
        out.extend_from_slice(b"\\u");
        return i;
    };
    let mut end = i + 4;
    let mut code = high;
    if (0xd800..0xdc00).contains(&high) && b.get(end..end + 2) == Some(b"\\u") {
        if let Some(low) = hex4(b, end + 2).filter(|low| (0xdc00..0xe000).contains(low)) {
            code = 0x10000 + ((high - 0xd800) << 10) + (low - 0xdc00);
            end += 6;
        }
    }
    match char::from_u32(code) {
        Some(ch) => out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes()),
        // A lone surrogate, as WTF-8: the text around it stays contiguous for the patterns.
        None => out.extend_from_slice(&[
            0xe0 | (code >> 12) as u8,
            0x80 | ((code >> 6) & 0x3f) as u8,
            0x80 | (code & 0x3f) as u8,
        ]),
    }
    end
}

fn hex4(b: &[u8], i: usize) -> Option<u32> {
    let digits = std::str::from_utf8(b.get(i..i + 4)?).ok()?;
    if !digits.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(digits, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(body: &str) -> Vec<String> {
        let mut all = Vec::new();
        any_string(body.as_bytes(), |s| {
            all.push(String::from_utf8_lossy(s).into_owned());
            false
        });
        all
    }

    #[test]
    fn keys_and_values_are_decoded() {
        assert_eq!(
            strings(r#"{"k\u0065y": ["\u002d--", "a\/b", "\"q\" \\ \n\t", 1, "\ud83d\ude00"]}"#),
            ["key", "---", "a/b", "\"q\" \\ \n\t", "\u{1f600}"]
        );
    }

    #[test]
    fn broken_documents_are_still_read() {
        assert_eq!(
            strings(r#"["\x", "\u12", "end\"#),
            ["\\x", "\\u12", "end\\"]
        );
        let lone = strings(r#"["a\ud800b"]"#);
        assert_eq!(lone.len(), 1);
        assert!(
            lone[0].starts_with('a') && lone[0].ends_with('b'),
            "{lone:?}"
        );
        assert_eq!(strings("no strings at all"), Vec::<String>::new());
    }

    #[test]
    fn it_stops_at_the_first_hit() {
        let mut seen = 0;
        assert!(any_string(br#"["a", "b", "c"]"#, |s| {
            seen += 1;
            s == b"b"
        }));
        assert_eq!(seen, 2);
    }
}
