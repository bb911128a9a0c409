//! Reading `Authorization` and `Proxy-Authorization` values, in one place for every listener
//! that takes credentials (the gateway's web listener and tunnel upgrade, the egress proxy): the
//! scheme is case-insensitive (RFC 9110 §11.1), so `basic`, `BASIC` and `Basic` are one scheme.

/// The credentials after the scheme of `value` when its scheme is `scheme` (any case), trimmed;
/// `None` for another scheme. `Some("")` when the value has the scheme and nothing after it.
pub(crate) fn credentials<'a>(value: &'a str, scheme: &str) -> Option<&'a str> {
    let value = value.trim_start();
    let (written, rest) = value.split_once([' ', '\t']).unwrap_or((value, ""));
    written
        .eq_ignore_ascii_case(scheme)
        .then_some(rest.trim_matches([' ', '\t']))
}

/// The user and password of `Basic` credentials (`base64(user:password)`, what [`credentials`]
/// gives for scheme `basic`); `None` when they do not decode to UTF-8 with a colon.
pub(crate) fn basic_user_password(credentials: &str) -> Option<(String, String)> {
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(credentials)
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheme_matches_in_any_case_and_only_as_a_whole_word() {
        for value in ["Basic eA==", "basic eA==", "BASIC  eA== ", " bAsIc\teA=="] {
            assert_eq!(credentials(value, "basic"), Some("eA=="), "{value:?}");
        }
        assert_eq!(credentials("Bearer", "bearer"), Some(""));
        assert_eq!(credentials("Basicx eA==", "basic"), None);
        assert_eq!(credentials("Bearer eA==", "basic"), None);
        assert_eq!(credentials("", "basic"), None);
    }

    #[test]
    fn basic_credentials_decode_to_user_and_password() {
        assert_eq!(
            basic_user_password("dXNlcjpwdzpzdGlsbA=="),
            Some(("user".into(), "pw:still".into()))
        );
        // "user" without a colon, and what is not base64.
        assert_eq!(basic_user_password("dXNlcg=="), None);
        assert_eq!(basic_user_password("not base64!"), None);
    }
}
