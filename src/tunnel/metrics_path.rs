//! Metrics paths as Prometheus handles them. `__metrics_path__` is a decoded path, which Prometheus
//! percent-encodes the way Go escapes a URL path when it builds the scrape URL: `/a b` is requested
//! as `/a%20b`, `/x!y` as `/x%21y`, `/café` as `/caf%C3%A9`. So an agent publishes each target's
//! path decoded, and the gateway and the agent match a scrape by its decoded path, which is the
//! same however the scrape's client chose to encode it.
//!
//! Only a whole decoded path equal to a listed one matches, and the agent fetches the target's own
//! URL, never the requested path: decoding cannot reach anything unlisted (`%2e%2e` is `..` in a
//! path compared as a string, not a segment resolved against anything).

use std::borrow::Cow;
use std::fmt;

/// Why a path cannot be a target's metrics path, or cannot address one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PathProblem {
    /// `%2F`: Prometheus would request a plain `/`, another path to the target.
    EncodedSlash,
    /// A `%` not followed by two hex digits.
    BadEscape,
    /// Bytes that are not UTF-8 once decoded: a label value is text.
    NotUtf8,
    /// A control character once decoded (a line break in logs, `/targets`, the status page).
    Control,
}

impl fmt::Display for PathProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathProblem::EncodedSlash => {
                "has an encoded \"/\" (%2F), which Prometheus cannot request: it would ask for a plain \"/\""
            }
            PathProblem::BadEscape => {
                "has a \"%\" not followed by two hex digits (write a literal \"%\" as %25)"
            }
            PathProblem::NotUtf8 => "does not decode to UTF-8 text (Prometheus's metrics path is text)",
            PathProblem::Control => "has a control character once decoded",
        })
    }
}

/// `path` percent-decoded, as Prometheus's `__metrics_path__` holds it; the same function decodes
/// a configured target's path and a scrape's, so that both sides agree on what matches.
pub(crate) fn decode(path: &str) -> Result<String, PathProblem> {
    // percent-encoding leaves a malformed escape as it is, and decodes `%2F` like any other:
    // both are refused first.
    let bytes = path.as_bytes();
    for (i, _) in path.match_indices('%') {
        match bytes.get(i + 1..i + 3) {
            Some(&[hi, lo]) if hi.is_ascii_hexdigit() && lo.is_ascii_hexdigit() => {
                if hi == b'2' && lo.eq_ignore_ascii_case(&b'f') {
                    return Err(PathProblem::EncodedSlash);
                }
            }
            _ => return Err(PathProblem::BadEscape),
        }
    }
    let decoded = percent_encoding::percent_decode_str(path)
        .decode_utf8()
        .map_err(|_| PathProblem::NotUtf8)?;
    check_decoded(&decoded)?;
    Ok(decoded.into_owned())
}

/// Whether a decoded path can be published: no control character (the `/` root is checked
/// where the path is, with the other rules of a target).
pub(crate) fn check_decoded(decoded: &str) -> Result<(), PathProblem> {
    match decoded.chars().any(char::is_control) {
        true => Err(PathProblem::Control),
        false => Ok(()),
    }
}

/// A scrape's path as received (encoded) in the form published paths are compared with, or
/// `None` if it can address no target. Decoded once per scrape; most paths have nothing to
/// decode and cost no allocation.
pub(crate) fn requested(path: &str) -> Option<Cow<'_, str>> {
    if path.contains('%') {
        decode(path).ok().map(Cow::Owned)
    } else {
        Some(Cow::Borrowed(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_decode_as_prometheus_wrote_them() {
        for (encoded, decoded) in [
            ("/metrics", "/metrics"),
            ("/a%20b/metrics", "/a b/metrics"),
            ("/x%21y/metrics", "/x!y/metrics"),
            ("/x!y/metrics", "/x!y/metrics"),
            ("/m%281%29/metrics", "/m(1)/metrics"),
            ("/s%2A/metrics", "/s*/metrics"),
            ("/s%2a/metrics", "/s*/metrics"),
            ("/caf%C3%A9/metrics", "/café/metrics"),
            ("/100%25", "/100%"),
            ("/q%3Fx=1", "/q?x=1"),
            ("/%2e%2e/secret", "/../secret"),
        ] {
            assert_eq!(decode(encoded).as_deref(), Ok(decoded), "{encoded}");
        }
    }

    #[test]
    fn paths_that_cannot_be_told_apart_are_refused() {
        for (path, problem) in [
            ("/a%2Fb", PathProblem::EncodedSlash),
            ("/a%2fb", PathProblem::EncodedSlash),
            ("/a%zzb", PathProblem::BadEscape),
            ("/a%2", PathProblem::BadEscape),
            ("/a%", PathProblem::BadEscape),
            ("/a%+1", PathProblem::BadEscape),
            ("/caf%C3", PathProblem::NotUtf8),
            ("/%FF", PathProblem::NotUtf8),
            ("/a%0Ab", PathProblem::Control),
            ("/a%00", PathProblem::Control),
        ] {
            assert_eq!(decode(path), Err(problem), "{path}");
        }
    }

    fn matches(path: &str, published: &str) -> bool {
        requested(path).as_deref() == Some(published)
    }

    #[test]
    fn a_scrape_matches_only_the_whole_decoded_path() {
        assert!(matches("/x%21y/metrics", "/x!y/metrics"));
        assert!(matches("/x!y/metrics", "/x!y/metrics"));
        assert!(matches("/a%20b/metrics", "/a b/metrics"));
        assert!(matches("/metrics", "/metrics"));
        // The encoded form of a path is not its decoded form (Prometheus encodes `%` too).
        assert!(!matches("/a%2520b/metrics", "/a b/metrics"));
        assert!(matches("/a%2520b/metrics", "/a%20b/metrics"));
        assert!(!matches("/metrics/", "/metrics"));
        assert!(!matches("/%2e%2e/metrics", "/metrics"));
        assert!(!matches("/app/%2e%2e/metrics", "/metrics"));
        assert!(!matches("/a%2Fb", "/a/b"));
        assert!(!matches("/a%zz", "/a%zz"));
    }
}
