//! Agent credentials: the tokens file (`<agent-id glob> sha256:<hex of token>` per line, `#`
//! comments). Tokens are stored hashed; a presented token is hashed and compared in constant time
//! against every line, and may only claim ids its line's glob matches.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What the gateway's file of agent tokens is called in errors.
pub const TOKENS_FILE: &str = "tokens file";
/// What the egress proxy's file of client credentials is called in errors.
pub const CREDENTIALS_FILE: &str = "credentials file";

/// Why a tokens file (or the egress proxy's credentials file, same format) could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokensFileError {
    /// The file could not be read.
    // The OS error is part of the message, not a `source` as well: printed as a chain it would
    // say the same thing twice.
    #[error("cannot read {kind} {path}: {error}")]
    Read {
        /// What the file is for: `tokens file` or `credentials file`.
        kind: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// A line is malformed.
    #[error("{kind} {path} line {line}: {reason}")]
    Line {
        /// What the file is for: `tokens file` or `credentials file`.
        kind: &'static str,
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A reload found no credential where there were some.
    #[error("{kind} {path} holds no credentials any more (it had {had}): not applied, since it would lock out every client at once (a file caught while being rewritten?); the previous credentials stay. Stop the service to lock everyone out")]
    Emptied {
        /// What the file is for: `tokens file` or `credentials file`.
        kind: &'static str,
        /// The file.
        path: PathBuf,
        /// Credentials in force before.
        had: usize,
    },
}

/// One credential: the ids it may claim and the hash of its token.
#[derive(Debug, Clone)]
struct Entry {
    ids: glob::Pattern,
    hash: [u8; 32],
}

/// The parsed tokens file.
#[derive(Debug, Clone, Default)]
pub struct TokensFile {
    entries: Vec<Entry>,
    /// Lines whose glob no id (or client name) can match, with their number: valid, yet they
    /// let nobody in, which is worth a warning (a typo, a paste of the wrong thing).
    unmatchable: Vec<(usize, String)>,
    /// A gateway's tokens file: its ids are host names, compared in canonical form (lower case,
    /// no final dot). An egress credentials file's names are compared as written.
    host_names: bool,
}

/// Why a tunnel's credentials were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No line's hash matches the token (401).
    #[error("invalid token")]
    InvalidToken,
    /// The token is valid but may not claim this id (403).
    #[error("token may not claim agent id {0:?}")]
    IdNotAllowed(String),
}

impl TokensFile {
    /// Reads and parses the gateway's tokens file `path`.
    pub fn load(path: &Path) -> Result<TokensFile, TokensFileError> {
        Self::load_as(path, TOKENS_FILE)
    }

    /// Reads and parses `path`; `kind` ([`TOKENS_FILE`], [`CREDENTIALS_FILE`]) names it in errors.
    pub fn load_as(path: &Path, kind: &'static str) -> Result<TokensFile, TokensFileError> {
        let text = crate::fs_util::read_regular_to_string(path).map_err(|error| {
            TokensFileError::Read {
                kind,
                path: path.to_owned(),
                error,
            }
        })?;
        Self::parse_as(&text, kind).map_err(|(line, reason)| TokensFileError::Line {
            kind,
            path: path.to_owned(),
            line,
            reason,
        })
    }

    /// Reads `path` again to replace `current`. A file that went from some credentials to none
    /// is refused: an editor or a config-management tool that truncates the file before writing
    /// it would otherwise cut off every client, for as long as their slow retry lasts.
    pub fn reload_as(
        path: &Path,
        kind: &'static str,
        current: &TokensFile,
    ) -> Result<TokensFile, TokensFileError> {
        let new = Self::load_as(path, kind)?;
        if new.is_empty() && !current.is_empty() {
            return Err(TokensFileError::Emptied {
                kind,
                path: path.to_owned(),
                had: current.len(),
            });
        }
        for warning in new.unmatchable_lines(path) {
            tracing::warn!("{warning}");
        }
        Ok(new)
    }

    /// Parses the text of a tokens file; errors carry the 1-based line number.
    pub fn parse(text: &str) -> Result<TokensFile, (usize, String)> {
        Self::parse_as(text, TOKENS_FILE)
    }

    /// [`TokensFile::parse`] for a file of `kind`, whose errors say how its lines are written.
    fn parse_as(text: &str, kind: &str) -> Result<TokensFile, (usize, String)> {
        // Some editors start a UTF-8 file with a byte-order mark; it would join the first glob.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let host_names = kind != CREDENTIALS_FILE;
        let mut entries = Vec::new();
        let mut unmatchable = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let entry = parse_line(line, kind).map_err(|reason| (i + 1, reason))?;
            if !can_match(entry.ids.as_str(), host_names) {
                let written = line.split_whitespace().next().unwrap_or_default();
                unmatchable.push((i + 1, written.to_owned()));
            }
            entries.push(entry);
        }
        Ok(TokensFile {
            entries,
            unmatchable,
            host_names,
        })
    }

    /// Number of credentials.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the file holds no credential at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A warning, naming `path` (the file this was read from) and the line, for each line whose
    /// glob can never match: no agent id (a host name) or, in the egress proxy's credentials
    /// file, no client name (a Basic user name holds no ':'). Valid lines, so not errors.
    pub fn unmatchable_lines(&self, path: &Path) -> Vec<String> {
        let (kind, names, who) = if self.host_names {
            (
                TOKENS_FILE,
                "an agent id (ids are host names: letters, digits, '-', '_' and '.', not first '-' or '.')",
                "agent",
            )
        } else {
            (
                CREDENTIALS_FILE,
                "a client name (a Basic user name holds no ':'; a bearer token is the name \"bearer\")",
                "client",
            )
        };
        self.unmatchable
            .iter()
            .map(|(line, glob)| {
                format!(
                    "{kind} {} line {line}: the glob {glob:?} can never match {names}: this line lets no {who} in",
                    path.display()
                )
            })
            .collect()
    }

    /// Checks that `token` is known and may claim `agent_id`.
    ///
    /// Every line is compared, matching or not, so timing does not tell which line (if any) matched.
    pub fn authorize(&self, token: &str, agent_id: &str) -> Result<(), AuthError> {
        self.authorize_digest(&token_digest(token), agent_id)
    }

    /// [`TokensFile::authorize`] for a token known by its SHA-256 (a connected agent's, checked
    /// again when the file is reloaded).
    pub fn authorize_digest(&self, presented: &[u8; 32], agent_id: &str) -> Result<(), AuthError> {
        let agent_id = &*self.compared(agent_id);
        let mut known = false;
        let mut allowed = false;
        for entry in &self.entries {
            let matches: bool = entry.hash.ct_eq(presented).into();
            known |= matches;
            allowed |= matches && entry.ids.matches(agent_id);
        }
        match (known, allowed) {
            (_, true) => Ok(()),
            (true, false) => Err(AuthError::IdNotAllowed(agent_id.to_owned())),
            (false, _) => Err(AuthError::InvalidToken),
        }
    }
}

impl TokensFile {
    /// Whether a line for the token with SHA-256 `presented` names `agent_id` itself, not by a
    /// pattern: such a claim outranks one by a glob (see the gateway's duplicate-id rule).
    pub fn names_exactly(&self, presented: &[u8; 32], agent_id: &str) -> bool {
        let agent_id = &*self.compared(agent_id);
        self.entries.iter().any(|entry| {
            let named = entry.ids.as_str() == agent_id && !agent_id.contains(['*', '?', '[']);
            bool::from(entry.hash.ct_eq(presented)) && named
        })
    }
}

impl TokensFile {
    /// `id` in the form the file's patterns were written for.
    fn compared<'a>(&self, id: &'a str) -> std::borrow::Cow<'a, str> {
        if self.host_names {
            crate::http_util::canonical_host_name(id)
        } else {
            std::borrow::Cow::Borrowed(id)
        }
    }
}

fn parse_line(line: &str, kind: &str) -> Result<Entry, String> {
    let mut fields = line.split_whitespace();
    let (Some(glob), Some(hash), None) = (fields.next(), fields.next(), fields.next()) else {
        // The egress proxy's clients are names, not agents.
        let format = if kind == CREDENTIALS_FILE {
            "<name glob> sha256:<hex of secret>"
        } else {
            "<agent-id glob> sha256:<hex of token>"
        };
        return Err(format!("expected `{format}`"));
    };
    // Agent ids are host names, compared in their canonical form (lower case, no final dot);
    // a glob written `Node-*` or `node-1.` must match them in that form too.
    let pattern = if kind == CREDENTIALS_FILE {
        std::borrow::Cow::Borrowed(glob)
    } else {
        crate::http_util::canonical_host_name(glob)
    };
    let ids = glob::Pattern::new(&pattern).map_err(|e| format!("invalid glob {glob:?}: {e}"))?;
    let hex_part = hash.strip_prefix("sha256:").ok_or_else(|| {
        format!("{hash:?} must start with sha256: (hash the token, never store it)")
    })?;
    let mut digest = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut digest)
        .map_err(|_| format!("{hash:?}: expected sha256: followed by 64 hex digits"))?;
    Ok(Entry { ids, hash: digest })
}

/// One place of a glob (glob 0.3 syntax, which `glob::Pattern` has already accepted): what
/// single character it takes, or any run of them.
enum GlobItem {
    /// `*` (or `**`): any run of characters, none included.
    Run,
    /// `?`: one character, any.
    Any,
    /// A character as written.
    Char(char),
    /// `[...]` (`negated`: `[!...]`): one character in (or not in) these inclusive ranges.
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

impl GlobItem {
    /// Whether this place takes `c`.
    fn takes(&self, c: char) -> bool {
        match self {
            GlobItem::Run | GlobItem::Any => true,
            GlobItem::Char(x) => *x == c,
            GlobItem::Class { negated, ranges } => {
                ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated
            }
        }
    }

    /// Whether this place takes some character other than `:`, the one character no client
    /// name can hold (an egress credentials file).
    fn takes_other_than_colon(&self) -> bool {
        match self {
            GlobItem::Run | GlobItem::Any => true,
            GlobItem::Char(c) => *c != ':',
            // Excluding a few characters still leaves all the others.
            GlobItem::Class { negated: true, .. } => true,
            GlobItem::Class { ranges, .. } => ranges
                .iter()
                .any(|&(lo, hi)| lo <= hi && (lo != ':' || hi != ':')),
        }
    }
}

/// The places of `pattern`, read the way glob 0.3 reads it.
fn glob_items(pattern: &str) -> Vec<GlobItem> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut items = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let (item, len) = match chars[i] {
            '*' => (GlobItem::Run, 1),
            '?' => (GlobItem::Any, 1),
            '[' => glob_class(&chars[i..]).unwrap_or((GlobItem::Char('['), 1)),
            c => (GlobItem::Char(c), 1),
        };
        items.push(item);
        i += len;
    }
    items
}

/// The class at the start of `chars` (`[...]` or `[!...]`, a `]` right after the opening taken
/// as a member) and how many characters it spans.
fn glob_class(chars: &[char]) -> Option<(GlobItem, usize)> {
    let negated = chars.get(1) == Some(&'!');
    let start = if negated { 2 } else { 1 };
    // The first member may be `]`: the closing one is searched after it.
    let close = start + 1 + chars.get(start + 1..)?.iter().position(|&c| c == ']')?;
    let members = &chars[start..close];
    let mut ranges = Vec::new();
    let mut j = 0;
    while j < members.len() {
        if j + 2 < members.len() && members[j + 1] == '-' {
            ranges.push((members[j], members[j + 2]));
            j += 3;
        } else {
            ranges.push((members[j], members[j]));
            j += 1;
        }
    }
    Some((GlobItem::Class { negated, ranges }, close + 1))
}

/// Whether some name can match `pattern` (as compiled: a tokens file's in canonical form):
/// with `host_names`, an agent id — a host name of at most 253 characters (lower case, as
/// compared), not starting with `-` or `.`; otherwise an egress client name, anything without
/// `:`. Conservative: `true` when unsure.
fn can_match(pattern: &str, host_names: bool) -> bool {
    let items = glob_items(pattern);
    if !host_names {
        return items.iter().all(GlobItem::takes_other_than_colon);
    }
    const HOST_CHARS: &str = "abcdefghijklmnopqrstuvwxyz0123456789-_.";
    let fixed = items.iter().filter(|i| !matches!(i, GlobItem::Run)).count();
    let first_ok = match items.first() {
        Some(first) => HOST_CHARS
            .chars()
            .any(|c| !matches!(c, '-' | '.') && first.takes(c)),
        None => false,
    };
    fixed <= 253
        && first_ok
        && items
            .iter()
            .all(|item| HOST_CHARS.chars().any(|c| item.takes(c)))
}

/// The SHA-256 of a token, as the tokens file holds it.
pub fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A new random token (256 bits, hex) and its tokens-file hash `sha256:<hex>`.
pub fn new_token() -> (String, String) {
    let bytes: [u8; 32] = rand::random();
    let token = hex::encode(bytes);
    let hash = hash_token(&token);
    (token, hash)
}

/// `sha256:<hex>` of a token, as written in the tokens file.
pub fn hash_token(token: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(token.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(lines: &[(&str, &str)]) -> TokensFile {
        let text: String = lines
            .iter()
            .map(|(glob, token)| format!("{glob} {}  # comment\n", hash_token(token)))
            .collect();
        TokensFile::parse(&format!("# header\n\n{text}")).unwrap()
    }

    #[test]
    fn token_may_claim_only_ids_matching_its_glob() {
        let f = file(&[("node-*", "alpha"), ("db-1", "beta")]);
        assert_eq!(f.len(), 2);
        assert_eq!(f.authorize("alpha", "node-7"), Ok(()));
        assert_eq!(f.authorize("beta", "db-1"), Ok(()));
        assert_eq!(
            f.authorize("alpha", "db-1"),
            Err(AuthError::IdNotAllowed("db-1".into()))
        );
        assert_eq!(f.authorize("gamma", "node-7"), Err(AuthError::InvalidToken));
    }

    #[test]
    fn only_a_line_without_pattern_names_an_id_exactly() {
        let text = format!(
            "node-* {}\nnode-1 {}\nnode-[2] {}\n",
            hash_token("group"),
            hash_token("own"),
            hash_token("two")
        );
        let file = TokensFile::parse(&text).unwrap();
        let d = |t: &str| token_digest(t);
        assert!(file.names_exactly(&d("own"), "node-1"));
        assert!(!file.names_exactly(&d("group"), "node-1"));
        assert!(
            !file.names_exactly(&d("two"), "node-2"),
            "a pattern, though of one id"
        );
        assert!(!file.names_exactly(&d("own"), "node-2"));
    }

    #[test]
    fn agent_ids_match_whatever_their_case_but_client_names_as_written() {
        let line = format!("Node-* {}\nweb-1. {}\n", hash_token("t"), hash_token("w"));
        let tokens = TokensFile::parse(&line).unwrap();
        for id in ["node-2", "NODE-2", "node-2."] {
            assert_eq!(tokens.authorize("t", id), Ok(()), "{id}");
        }
        assert!(tokens.names_exactly(&token_digest("w"), "WEB-1"));
        let creds = TokensFile::parse_as(&line, CREDENTIALS_FILE).unwrap();
        assert!(creds.authorize("t", "Node-2").is_ok());
        assert!(creds.authorize("t", "node-2").is_err());
    }

    #[test]
    fn a_byte_order_mark_does_not_join_the_first_glob() {
        let text = format!("\u{feff}node-1 {}\n", hash_token("t"));
        let file = TokensFile::parse(&text).unwrap();
        assert!(file.authorize("t", "node-1").is_ok());
    }

    #[test]
    fn the_same_token_on_two_lines_may_claim_both_globs() {
        let f = file(&[("a-*", "t"), ("b-*", "t")]);
        assert!(f.authorize("t", "a-1").is_ok() && f.authorize("t", "b-1").is_ok());
    }

    #[test]
    fn malformed_lines_are_reported_with_their_number() {
        for (text, needle) in [
            ("ok sha256:00\n", "64 hex digits"),
            ("node-1 deadbeef\n", "must start with sha256:"),
            ("node-1\n", "expected"),
            ("[ sha256:aa\n", "invalid glob"),
        ] {
            let (line, reason) = TokensFile::parse(&format!("# c\n{text}")).unwrap_err();
            assert_eq!(line, 2, "{text}");
            assert!(reason.contains(needle), "{text}: {reason}");
        }
    }

    #[test]
    fn globs_no_name_can_match_are_told_apart_with_their_line() {
        let hash = hash_token("x");
        let never_an_id = [
            "<script>alert(1)</script>*",
            "-node",
            ".node",
            "node/1",
            "node:9100",
            "[<>]*",
            "[-]x",
            "[z-a]",
        ];
        let some_id = [
            "*",
            "node-?",
            "NODE-1.",
            "[a-z]*.example.com",
            "[!-]*",
            "[]a]",
            "*-1",
            "_x",
        ];
        for glob in never_an_id {
            let file = TokensFile::parse(&format!("# c\n\n{glob} {hash}\n")).unwrap();
            let warnings = file.unmatchable_lines(Path::new("F"));
            assert_eq!(warnings.len(), 1, "{glob}");
            assert!(
                warnings[0].starts_with(&format!("tokens file F line 3: the glob {glob:?}")),
                "{warnings:?}"
            );
        }
        for glob in some_id {
            let file = TokensFile::parse(&format!("{glob} {hash}\n")).unwrap();
            assert!(file.unmatchable_lines(Path::new("F")).is_empty(), "{glob}");
        }
        // A client name is anything but a ':' (it ends a Basic user name).
        let creds = |glob: &str| {
            TokensFile::parse_as(&format!("{glob} {hash}\n"), CREDENTIALS_FILE)
                .unwrap()
                .unmatchable_lines(Path::new("C"))
        };
        for glob in ["<script>*", "-x", "bearer", "[!:]", "a/b"] {
            assert!(creds(glob).is_empty(), "{glob}");
        }
        for glob in ["ci:*", "[:]x"] {
            let warnings = creds(glob);
            assert_eq!(warnings.len(), 1, "{glob}");
            assert!(
                warnings[0].starts_with("credentials file C line 1:"),
                "{warnings:?}"
            );
        }
    }

    #[test]
    fn new_tokens_are_random_and_hash_to_their_line() {
        let (a, ha) = new_token();
        let (b, _) = new_token();
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        let f = TokensFile::parse(&format!("* {ha}")).unwrap();
        assert!(f.authorize(&a, "anything").is_ok());
    }
}
