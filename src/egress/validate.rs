//! Payload validation per rule: size, content type, required headers, Content-MD5,
//! gzip/deflate/snappy decoding with a decompressed-size limit, well-formed JSON, JSON Schema and
//! deny patterns over the whole body, as sent and decoded (and over a JSON body's strings
//! unescaped). A request is forwarded only after all of it passed.

use std::io::Read;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName};
use md5::{Digest, Md5};

use super::budget::Held;
use super::refusal::Refusal;

/// What a rule checks in a payload.
#[derive(Debug, Clone)]
pub struct Validation {
    /// Largest body accepted as sent (compressed or not).
    pub max_body_bytes: u64,
    /// Largest body after gzip/deflate decoding.
    pub max_decoded_bytes: u64,
    /// Most memory the parsed tree of a JSON body may take for the schema check.
    pub max_json_tree_bytes: u64,
    /// Media types accepted (`application/json`); empty means any.
    pub content_types: Vec<String>,
    /// Headers that must be present.
    pub required_headers: Vec<HeaderName>,
    /// Body must be well-formed JSON.
    pub json: bool,
    /// Body must validate against this schema.
    pub schema: Option<std::sync::Arc<jsonschema::Validator>>,
    /// `Content-MD5` must be present (it is always verified when present).
    pub require_content_md5: bool,
    /// Bodies matching any of these are refused.
    pub deny_patterns: Vec<regex::bytes::Regex>,
}

impl Default for Validation {
    fn default() -> Self {
        Self {
            max_body_bytes: 16 << 20,
            max_decoded_bytes: 64 << 20,
            max_json_tree_bytes: 128 << 20,
            content_types: Vec::new(),
            required_headers: Vec::new(),
            json: false,
            schema: None,
            require_content_md5: false,
            deny_patterns: Vec::new(),
        }
    }
}

impl Validation {
    /// Whether anything needs the body (else it could be forwarded unread; we still bound it).
    pub fn inspects_body(&self) -> bool {
        self.json
            || self.schema.is_some()
            || self.require_content_md5
            || !self.deny_patterns.is_empty()
    }

    /// Whether checks read the body as text: JSON, a schema, deny patterns.
    fn reads_text(&self) -> bool {
        self.json || self.schema.is_some() || !self.deny_patterns.is_empty()
    }

    /// Whether the body is JSON: the rule checks it as JSON, or the client says so
    /// (`application/json`, `application/*+json`).
    fn reads_json(&self, headers: &HeaderMap) -> bool {
        self.json || self.schema.is_some() || {
            let media = media_type(headers);
            media == "application/json"
                || (media.starts_with("application/") && media.ends_with("+json"))
        }
    }

    /// Checks what the headers alone can tell: content type, required headers, declared length.
    pub fn check_headers(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        if let Some(len) = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        {
            if len > self.max_body_bytes {
                return Err(Refusal::too_large(self.max_body_bytes));
            }
        }
        if !self.content_types.is_empty() {
            let media = media_type(headers);
            if !self
                .content_types
                .iter()
                .any(|t| t.eq_ignore_ascii_case(&media))
            {
                return Err(Refusal::unsupported_media(&media, &self.content_types));
            }
        }
        if self.reads_text() {
            check_charset(headers)?;
        }
        for name in &self.required_headers {
            if !headers.contains_key(name) {
                return Err(Refusal::invalid(format!(
                    "required header {name} is missing"
                )));
            }
        }
        if self.require_content_md5 && !headers.contains_key("content-md5") {
            return Err(Refusal::invalid("required header content-md5 is missing"));
        }
        // A body this rule cannot decode is refused before it is uploaded.
        if self.inspects_body() {
            coding(headers)?;
        }
        Ok(())
    }

    /// Whether the body check looks at the body of a request with these headers
    /// (else the body may be forwarded without being gathered into one buffer).
    pub fn needs_body(&self, headers: &HeaderMap) -> bool {
        self.inspects_body() || headers.contains_key("content-md5")
    }

    /// Checks the whole body as received. What the checks build from it (the body decoded, a
    /// schema's tree) is taken from `held` before it is allocated; a 503 once that is full.
    pub(crate) fn check_body(
        &self,
        headers: &HeaderMap,
        body: &Bytes,
        held: &mut Held,
    ) -> Result<(), Refusal> {
        if let Some(md5) = headers.get("content-md5") {
            check_md5(md5.as_bytes(), body)?;
        }
        if !self.inspects_body() {
            return Ok(());
        }
        let decoded = decode(headers, body, self.max_decoded_bytes, held)?;
        // An encoded body is also forwarded with bytes the decoded stream leaves out (gzip's file
        // name, comment and extra field): the patterns read it as sent too.
        let forms: &[&[u8]] = match &decoded {
            std::borrow::Cow::Borrowed(_) => &[body],
            std::borrow::Cow::Owned(plain) => &[plain, body],
        };
        if let Some(pattern) = self
            .deny_patterns
            .iter()
            .find(|p| forms.iter().any(|form| p.is_match(form)))
        {
            return Err(Refusal::denied_pattern(pattern.as_str()));
        }
        // JSON escapes (`\u002d`, `\/`) spell the same text differently; the upstream reads it
        // decoded, so the patterns read every string decoded too. Only a body with an escape
        // can differ, so the common case costs one scan for a backslash.
        if !self.deny_patterns.is_empty() && self.reads_json(headers) && decoded.contains(&b'\\') {
            let mut hit = None;
            super::json_strings::any_string(&decoded, |text| {
                hit = self.deny_patterns.iter().find(|p| p.is_match(text));
                hit.is_some()
            });
            if let Some(pattern) = hit {
                return Err(Refusal::denied_pattern(pattern.as_str()));
            }
        }
        // Also before a schema builds its tree: `Value` keeps the last of a repeated key, so the
        // schema would pass a value other than the one an upstream reading the first acts on.
        if self.json || self.schema.is_some() {
            super::json_scan::check(&decoded)?;
        }
        if let Some(schema) = &self.schema {
            // The tree takes 5 to 30 times the text: it is bounded on its own.
            let value =
                super::json_tree::parse(&decoded, self.max_json_tree_bytes, held).map_err(|e| {
                    match e {
                        super::json_tree::TreeError::Invalid(e) => {
                            Refusal::invalid(format!("body is not valid JSON: {e}"))
                        }
                        super::json_tree::TreeError::TooLarge => {
                            Refusal::json_tree_too_large(self.max_json_tree_bytes)
                        }
                        super::json_tree::TreeError::BudgetFull => {
                            Refusal::body_buffer_full(held.limit())
                        }
                    }
                })?;
            // Name the schema keyword that failed, never the instance: the error's text and
            // its instance path quote the payload (values, object keys), and the reason is
            // logged.
            let mismatch = schema.iter_errors(&value).next().map(|err| {
                format!(
                    "body does not match the JSON schema (fails {})",
                    err.schema_path()
                )
            });
            if let Some(reason) = mismatch {
                return Err(Refusal::invalid(reason));
            }
        }
        Ok(())
    }
}

/// The media type of `Content-Type`, lower case, without parameters; empty if there is none.
fn media_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default()
}

/// Refuses a `Content-Type` charset in which ASCII text is not spelled as ASCII bytes (UTF-16,
/// UTF-32, UTF-7, EBCDIC…): the deny patterns and the JSON checks read the bytes as such text, so
/// `password=` in UTF-16 would pass a pattern for it, and the upstream would decode it.
fn check_charset(headers: &HeaderMap) -> Result<(), Refusal> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let value = String::from_utf8_lossy(value.as_bytes());
    for param in value.split(';').skip(1) {
        let Some((name, charset)) = param.split_once('=') else {
            continue;
        };
        if !name.trim().eq_ignore_ascii_case("charset") {
            continue;
        }
        let charset = charset.trim().trim_matches('"').to_ascii_lowercase();
        let ascii_compatible = matches!(
            charset.as_str(),
            "utf-8" | "utf8" | "us-ascii" | "ascii" | "latin1" | "iso-latin-1"
        ) || ["iso-8859-", "iso8859-", "iso_8859-", "windows-125"]
            .iter()
            .any(|prefix| charset.starts_with(prefix));
        if !ascii_compatible {
            return Err(Refusal::unsupported_charset(&charset));
        }
    }
    Ok(())
}

fn check_md5(header: &[u8], body: &[u8]) -> Result<(), Refusal> {
    use base64::Engine as _;
    let header = header.trim_ascii();
    // The hex digest (what `md5sum` prints) is the usual mistake. It is valid base64 too, so
    // without this it would read as a digest that does not match.
    if header.len() == 32 && header.iter().all(u8::is_ascii_hexdigit) {
        return Err(Refusal::invalid(
            "Content-MD5 must be the base64 of the MD5 digest (this looks like hex)",
        ));
    }
    let expected = base64::engine::general_purpose::STANDARD
        .decode(header)
        .map_err(|_| Refusal::invalid("content-md5 is not base64"))?;
    let actual = Md5::digest(body);
    if expected.as_slice() == actual.as_slice() {
        Ok(())
    } else {
        Err(Refusal::invalid("content-md5 does not match the body"))
    }
}

/// The body after `Content-Encoding` (gzip, deflate, snappy, identity), decoded up to `limit`
/// bytes, each taken from `held` before it is allocated.
fn decode<'a>(
    headers: &HeaderMap,
    body: &'a Bytes,
    limit: u64,
    held: &mut Held,
) -> Result<std::borrow::Cow<'a, [u8]>, Refusal> {
    let Some(encoding) = coding(headers)? else {
        return Ok(std::borrow::Cow::Borrowed(body));
    };
    let mut out = Decoded::default();
    let refused = |e: DecodeError| match e {
        DecodeError::Io(e) => Refusal::invalid(format!("body is not valid {encoding}: {e}")),
        DecodeError::BudgetFull(limit) => Refusal::body_buffer_full(limit),
    };
    match encoding.as_str() {
        "gzip" | "x-gzip" => decode_gzip(body, &mut out, limit, held).map_err(refused)?,
        "deflate" => {
            let mut zlib = flate2::bufread::ZlibDecoder::new(&body[..]);
            read_decoded(&mut zlib, &mut out, limit, held).map_err(refused)?;
            // Bytes after the end of the stream would go upstream unread by every check.
            if out.len() <= limit && !zlib.get_ref().is_empty() {
                return Err(Refusal::invalid(
                    "body is not valid deflate: data after the end of the stream",
                ));
            }
        }
        "snappy" => return decode_snappy(body, limit, held).map(std::borrow::Cow::Owned),
        other => return Err(Refusal::unsupported_encoding(other)),
    }
    if out.len() > limit {
        return Err(Refusal::decoded_too_large(limit));
    }
    Ok(std::borrow::Cow::Owned(out.into_vec()))
}

/// Why decoding stopped.
#[derive(Debug)]
enum DecodeError {
    /// The body is not valid in its coding.
    Io(std::io::Error),
    /// The process-wide body budget (of this size) has no room for more decoded bytes.
    BudgetFull(u64),
}

impl From<std::io::Error> for DecodeError {
    fn from(e: std::io::Error) -> Self {
        DecodeError::Io(e)
    }
}

/// Decodes gzip member after member (gzip files put end to end are one stream to every
/// decoder) into `out`, up to one byte past `limit`. Bytes after the last member that do not
/// begin another one are refused: they would go upstream unread by every check.
fn decode_gzip(
    body: &[u8],
    out: &mut Decoded,
    limit: u64,
    held: &mut Held,
) -> Result<(), DecodeError> {
    let mut rest = body;
    loop {
        let mut member = flate2::bufread::GzDecoder::new(rest);
        read_decoded(&mut member, out, limit, held)?;
        if out.len() > limit {
            return Ok(());
        }
        let after = member.into_inner();
        if after.is_empty() {
            return Ok(());
        }
        if !after.starts_with(&[0x1f, 0x8b]) || after.len() == rest.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "data after the end of the gzip stream",
            )
            .into());
        }
        rest = after;
    }
}

/// The first buffer decoded bytes go into; it doubles from there.
const FIRST_DECODED: u64 = 64 << 10;

/// A buffer decoded bytes are appended to. It is zero-filled to its capacity when it grows, not
/// before every read: a body of thousands of empty gzip members would make that quadratic.
#[derive(Default)]
struct Decoded {
    /// Always as long as its capacity.
    buf: Vec<u8>,
    /// How much of `buf` is data.
    filled: usize,
}

impl Decoded {
    fn len(&self) -> u64 {
        self.filled as u64
    }

    fn into_vec(mut self) -> Vec<u8> {
        self.buf.truncate(self.filled);
        self.buf
    }
}

/// Appends what `reader` yields to `out` until `out` holds one byte past `limit` (to tell
/// "exactly at the limit" from "over it"). `held` pays for all of `out`'s capacity, taken before
/// each allocation: a few kilobytes of gzip decode to gigabytes, so what the decoding may
/// allocate is bounded by the process-wide budget, not only per request.
fn read_decoded(
    reader: impl Read,
    out: &mut Decoded,
    limit: u64,
    held: &mut Held,
) -> Result<(), DecodeError> {
    let end = limit.saturating_add(1);
    let mut reader = reader.take(end.saturating_sub(out.len()));
    while reader.limit() > 0 {
        if out.filled == out.buf.len() && !grow_decoded(&mut out.buf, end, held) {
            return Err(DecodeError::BudgetFull(held.limit()));
        }
        match reader.read(&mut out.buf[out.filled..]) {
            Ok(0) => break,
            Ok(n) => out.filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Doubles `out` (zero-filled), to at most `end` bytes, paying for it from `held`, which already
/// pays for `out`'s capacity. While it grows, the old buffer and the new one both exist: both
/// are paid for until the old one is gone. False if `held` could not pay.
fn grow_decoded(out: &mut Vec<u8>, end: u64, held: &mut Held) -> bool {
    let old = out.capacity() as u64;
    let new = old
        .saturating_mul(2)
        .max(FIRST_DECODED)
        .min(end)
        .min(isize::MAX as u64);
    if new <= old {
        return false;
    }
    let Ok(new_len) = usize::try_from(new) else {
        return false;
    };
    if !held.grow(new) {
        return false;
    }
    out.reserve_exact(new_len - out.len());
    held.shrink(old);
    // The allocator may hand over more than asked for; that is paid for too.
    let extra = (out.capacity() as u64).saturating_sub(new);
    if extra > 0 && !held.grow(extra) {
        return false;
    }
    out.resize(out.capacity(), 0);
    true
}

/// The body's one content coding (lowercase), `None` for identity; refused if the proxy cannot
/// decode it, or if there are several.
fn coding(headers: &HeaderMap) -> Result<Option<String>, Refusal> {
    // Every Content-Encoding line counts: an upstream reads two lines as two codings, so
    // checking only the first would let a doubly encoded body through unread.
    let mut codings = Vec::new();
    for value in headers.get_all(header::CONTENT_ENCODING) {
        let value = value
            .to_str()
            .map_err(|_| Refusal::unsupported_encoding("(not ASCII)"))?;
        codings.extend(
            value
                .split(',')
                .map(|c| c.trim().to_ascii_lowercase())
                .filter(|c| !c.is_empty() && c != "identity"),
        );
    }
    match codings.as_slice() {
        [] => Ok(None),
        [one] if matches!(one.as_str(), "gzip" | "x-gzip" | "deflate" | "snappy") => {
            Ok(Some(one.clone()))
        }
        [other] => Err(Refusal::unsupported_encoding(other)),
        several => Err(Refusal::unsupported_encoding(&several.join(", "))),
    }
}

/// Snappy in the block format, as Prometheus remote_write sends it (`Content-Encoding: snappy`).
/// The block starts with its decoded length, so the limit is checked before anything is decoded.
fn decode_snappy(body: &[u8], limit: u64, held: &mut Held) -> Result<Vec<u8>, Refusal> {
    let invalid = |e: snap::Error| Refusal::invalid(format!("body is not valid snappy: {e}"));
    let len = snap::raw::decompress_len(body).map_err(invalid)?;
    if len as u64 > limit {
        return Err(Refusal::decoded_too_large(limit));
    }
    if !held.grow(len as u64) {
        return Err(Refusal::body_buffer_full(held.limit()));
    }
    snap::raw::Decoder::new()
        .decompress_vec(body)
        .map_err(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use std::io::Write;

    /// A share of a budget that never runs out.
    fn unbounded() -> Held {
        super::super::budget::BodyBudget::new(u64::MAX, Default::default()).share()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn gzip(data: &[u8]) -> Bytes {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(data).unwrap();
        enc.finish().unwrap().into()
    }

    #[test]
    fn deny_patterns_see_the_first_bytes_and_the_decoded_body() {
        let v = Validation {
            deny_patterns: vec![regex::bytes::Regex::new("secret").unwrap()],
            ..Validation::default()
        };
        let err = v
            .check_body(
                &headers(&[]),
                &Bytes::from_static(b"secret at byte 0"),
                &mut unbounded(),
            )
            .unwrap_err();
        assert_eq!(err.status.as_u16(), 403);
        let gz = gzip(b"{\"x\": \"a secret inside\"}");
        assert!(v
            .check_body(
                &headers(&[("content-encoding", "gzip")]),
                &gz,
                &mut unbounded()
            )
            .is_err());
        assert!(v
            .check_body(
                &headers(&[]),
                &Bytes::from_static(b"all clear"),
                &mut unbounded()
            )
            .is_ok());
    }

    /// What the decoded stream leaves out is forwarded all the same: gzip's header fields are
    /// read by the deny patterns, and data after the end of a deflate stream is refused.
    #[test]
    fn bytes_outside_the_decoded_stream_are_checked_or_refused() {
        let v = Validation {
            deny_patterns: vec![regex::bytes::Regex::new("SECRET").unwrap()],
            ..Validation::default()
        };
        let gz = |builder: flate2::GzBuilder| -> Bytes {
            let mut enc = builder.write(Vec::new(), flate2::Compression::default());
            enc.write_all(b"{\"a\": 1}").unwrap();
            enc.finish().unwrap().into()
        };
        let h = headers(&[("content-encoding", "gzip")]);
        assert!(v
            .check_body(&h, &gz(flate2::GzBuilder::new()), &mut unbounded())
            .is_ok());
        for (field, body) in [
            ("FNAME", gz(flate2::GzBuilder::new().filename("SECRET"))),
            ("FCOMMENT", gz(flate2::GzBuilder::new().comment("SECRET"))),
            ("FEXTRA", gz(flate2::GzBuilder::new().extra(&b"SECRET"[..]))),
        ] {
            let err = v.check_body(&h, &body, &mut unbounded()).unwrap_err();
            assert_eq!(err.status.as_u16(), 403, "{field}: {}", err.reason);
        }

        // gzip files end to end are one body; anything else after the last is refused as such.
        let json = Validation {
            json: true,
            ..Validation::default()
        };
        let members = [gzip(b"{\"a\": "), gzip(b"1}")].concat().into();
        assert!(json.check_body(&h, &members, &mut unbounded()).is_ok());
        for tail in [&b"SECRET"[..], &[0; 8], b"\x1f"] {
            let body = [&gzip(b"{\"a\": 1}")[..], tail].concat().into();
            let err = json.check_body(&h, &body, &mut unbounded()).unwrap_err();
            assert_eq!(
                err.reason, "body is not valid gzip: data after the end of the gzip stream",
                "{tail:?}"
            );
        }
        let truncated_member = [&gzip(b"{}")[..], &gzip(b"{}")[..12]].concat().into();
        let err = json
            .check_body(&h, &truncated_member, &mut unbounded())
            .unwrap_err();
        assert_eq!(err.status.as_u16(), 422, "{}", err.reason);

        let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        zlib.write_all(b"{\"a\": 1}").unwrap();
        let deflated = zlib.finish().unwrap();
        let h = headers(&[("content-encoding", "deflate")]);
        assert!(json
            .check_body(&h, &deflated.clone().into(), &mut unbounded())
            .is_ok());
        let trailing = [&deflated[..], b"trailing"].concat().into();
        let err = json
            .check_body(&h, &trailing, &mut unbounded())
            .unwrap_err();
        assert_eq!(err.status.as_u16(), 422, "{}", err.reason);
        assert!(err.reason.contains("after the end"), "{}", err.reason);
    }

    #[test]
    fn a_gzip_bomb_is_stopped_at_the_decoded_limit() {
        let bomb = gzip(&vec![b'0'; 10 << 20]);
        assert!(
            bomb.len() < 64 << 10,
            "10 MiB of zeros compress well: {}",
            bomb.len()
        );
        let v = Validation {
            json: true,
            max_decoded_bytes: 1 << 20,
            ..Validation::default()
        };
        let err = v
            .check_body(
                &headers(&[("content-encoding", "gzip")]),
                &bomb,
                &mut unbounded(),
            )
            .unwrap_err();
        assert_eq!(err.status.as_u16(), 413, "{}", err.reason);
    }

    /// Prometheus remote_write: snappy block format. Deny patterns see the decoded protobuf; a
    /// block announcing more than the limit is refused before it is decoded.
    #[test]
    fn snappy_bodies_are_decoded_within_the_limit() {
        let snappy =
            |data: &[u8]| -> Bytes { snap::raw::Encoder::new().compress_vec(data).unwrap().into() };
        let v = Validation {
            deny_patterns: vec![regex::bytes::Regex::new("customer_email").unwrap()],
            max_decoded_bytes: 1 << 20,
            ..Validation::default()
        };
        let h = headers(&[("content-encoding", "snappy")]);
        let leak = snappy(b"label customer_emai1=x, label customer_email=a@example.com");
        assert!(
            !leak.windows(14).any(|w| w == b"customer_email"),
            "the pattern must not be visible in the compressed bytes for this test to mean anything"
        );
        let err = v.check_body(&h, &leak, &mut unbounded()).unwrap_err();
        assert_eq!(err.status.as_u16(), 403, "{}", err.reason);
        assert!(v
            .check_body(&h, &snappy(b"up{job=\"node\"} 1"), &mut unbounded())
            .is_ok());

        let bomb = snappy(&vec![0; 10 << 20]);
        assert!(bomb.len() < 1 << 20, "{}", bomb.len());
        let err = v.check_body(&h, &bomb, &mut unbounded()).unwrap_err();
        assert_eq!(err.status.as_u16(), 413, "{}", err.reason);

        let err = v
            .check_body(
                &h,
                &Bytes::from_static(b"\x05not snappy at all"),
                &mut unbounded(),
            )
            .unwrap_err();
        assert_eq!(err.status.as_u16(), 422, "{}", err.reason);
        assert!(
            err.reason.starts_with("body is not valid snappy"),
            "{}",
            err.reason
        );
    }

    #[test]
    fn the_json_check_accepts_exactly_what_serde_json_value_accepts() {
        let v = Validation {
            json: true,
            ..Validation::default()
        };
        let deep_ok = format!("{}{}", "[".repeat(100), "]".repeat(100));
        let too_deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let cases: Vec<&[u8]> = vec![
            b"{\"a\": [1, -2.5e3, true, null, \"x\\u00e9\\n\", {}], \"b\": {\"c\": \"\"}}",
            b" 42 ",
            b"\"\\ud83d\\ude00\"",
            deep_ok.as_bytes(),
            b"",
            b"{\"a\": 1e400}",
            b"\"\\ud800\"",
            b"\"\\x\"",
            b"\"\xff\"",
            "{\"caf\u{e9}\": \"\u{1f600} \u{4e2d}\"}".as_bytes(),
            "\u{e9}".as_bytes(),
            b"\"\xc0\xaf\"",
            b"\"\xe2\x82\"",
            b"[\"a\"]\xff",
            b"\"tab\there\"",
            b"[1,]",
            b"{1: 2}",
            b"{\"a\" 1}",
            b"{\"a\": 1} trailing",
            b"01",
            b"NaN",
            too_deep.as_bytes(),
        ];
        // The one difference: `Value` keeps the last of a repeated key, the check refuses it.
        let repeated: Vec<&[u8]> = vec![
            b"{\"a\": 1, \"a\": 2}",
            b"[{\"b\": {\"a\": 1, \"c\": 2, \"\\u0061\": 3}}]",
        ];
        for case in &repeated {
            assert!(serde_json::from_slice::<serde_json::Value>(case).is_ok());
            let err = v
                .check_body(
                    &headers(&[]),
                    &Bytes::copy_from_slice(case),
                    &mut unbounded(),
                )
                .unwrap_err();
            assert_eq!(err.status.as_u16(), 422);
            assert!(
                err.reason.starts_with("body has the key \"a\" twice"),
                "{}",
                err.reason
            );
        }
        for case in cases {
            let by_value = serde_json::from_slice::<serde_json::Value>(case).is_ok();
            let ours = v.check_body(
                &headers(&[]),
                &Bytes::copy_from_slice(case),
                &mut unbounded(),
            );
            assert_eq!(
                ours.is_ok(),
                by_value,
                "{:?}: {:?}",
                String::from_utf8_lossy(case),
                ours.err().map(|e| e.reason)
            );
            if let Err(e) = ours {
                assert_eq!(e.status.as_u16(), 422);
                assert!(
                    e.reason.starts_with("body is not valid JSON"),
                    "{}",
                    e.reason
                );
            }
        }
    }

    #[test]
    fn json_schema_md5_and_headers() {
        let schema =
            jsonschema::validator_for(&serde_json::json!({"type": "object", "required": ["host"]}))
                .unwrap();
        let v = Validation {
            schema: Some(std::sync::Arc::new(schema)),
            content_types: vec!["application/json".into()],
            required_headers: vec![HeaderName::from_static("x-agent")],
            ..Validation::default()
        };
        let ok = headers(&[
            ("content-type", "application/json; charset=utf-8"),
            ("x-agent", "1"),
        ]);
        assert!(v.check_headers(&ok).is_ok());
        assert_eq!(
            v.check_headers(&headers(&[
                ("content-type", "text/plain"),
                ("x-agent", "1")
            ]))
            .unwrap_err()
            .status
            .as_u16(),
            415
        );
        assert_eq!(
            v.check_headers(&headers(&[("content-type", "application/json")]))
                .unwrap_err()
                .status
                .as_u16(),
            422
        );
        assert!(v
            .check_body(
                &ok,
                &Bytes::from_static(b"{\"host\": \"a\"}"),
                &mut unbounded()
            )
            .is_ok());
        let err = v
            .check_body(
                &ok,
                &Bytes::from_static(b"{\"hostname\": \"a\"}"),
                &mut unbounded(),
            )
            .unwrap_err();
        assert!(err.reason.contains("schema"), "{}", err.reason);
        let err = v
            .check_body(&ok, &Bytes::from_static(b"{\"host\": "), &mut unbounded())
            .unwrap_err();
        assert!(err.reason.contains("not valid JSON"), "{}", err.reason);
        use base64::Engine as _;
        let good =
            base64::engine::general_purpose::STANDARD.encode(Md5::digest(b"{\"host\": \"a\"}"));
        let with_md5 = headers(&[("content-md5", &good)]);
        assert!(v
            .check_body(
                &with_md5,
                &Bytes::from_static(b"{\"host\": \"a\"}"),
                &mut unbounded()
            )
            .is_ok());
        assert!(v
            .check_body(
                &with_md5,
                &Bytes::from_static(b"{\"host\": \"b\"}"),
                &mut unbounded()
            )
            .is_err());
    }

    #[test]
    fn no_decoded_limit_is_too_large_to_count_past() {
        let v = Validation {
            json: true,
            max_decoded_bytes: u64::MAX,
            ..Validation::default()
        };
        let h = headers(&[("content-encoding", "gzip")]);
        assert!(v
            .check_body(&h, &gzip(b"{\"a\": 1}"), &mut unbounded())
            .is_ok());
    }

    #[test]
    fn decoded_bytes_are_taken_from_the_body_budget() {
        let v = Validation {
            json: true,
            ..Validation::default()
        };
        let h = headers(&[("content-encoding", "gzip")]);
        let gauge = prometheus_client::metrics::gauge::Gauge::default();
        let budget = super::super::budget::BodyBudget::new(1 << 20, gauge.clone());
        let zeros = gzip(&vec![b'0'; 4 << 20]);
        let err = v.check_body(&h, &zeros, &mut budget.share()).unwrap_err();
        assert_eq!(err.kind, "body_buffer_full", "{err:?}");
        assert_eq!(gauge.get(), 0, "given back");
        let mut held = budget.share();
        assert!(v.check_body(&h, &gzip(b"[1, 2]"), &mut held).is_ok());
        drop(held);
        assert_eq!(gauge.get(), 0);
    }
}
