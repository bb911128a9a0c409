//! Reading the YAML file so that every problem is reported at once, each with its field path.
//!
//! A scalar of the wrong type or format (`shutdown_grace_period: 15`) does not stop the parse:
//! the leaf types ([`Dur`] and the numbers and switches marked `deserialize_with = "lenient"`)
//! fail inside serde_yaml_ng, which gives the error the field path and line, and while [`parse`]
//! runs, that error is recorded and the parse goes on. The file is
//! then parsed once more without the bad fields, so that the validation pass sees their defaults
//! and reports its own problems alongside.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, EnumAccess, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_yaml_ng::Value;

use super::{ConfigError, ConfigErrors, Dur, FileConfig};

thread_local! {
    /// While [`parse`] runs on this thread: the messages of the values it skipped.
    static RECOVERED: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
}

/// Records `result`'s error and returns `placeholder` while [`parse`] collects errors; otherwise
/// (any other deserialization of these types), or when the bad value was a mapping or a list
/// (serde_yaml_ng cannot go on after those), passes the error on.
fn recover<T, E: de::Error>(
    result: Result<T, E>,
    nested: bool,
    placeholder: impl FnOnce() -> T,
) -> Result<T, E> {
    let Err(e) = result else { return result };
    if nested {
        return Err(e);
    }
    RECOVERED.with_borrow_mut(|recovered| match recovered {
        Some(list) => {
            list.push(e.to_string());
            Ok(placeholder())
        }
        None => Err(e),
    })
}

/// Collects recovered errors for as long as it lives (also when a parse panics).
struct Collecting;

impl Collecting {
    fn start() -> Collecting {
        RECOVERED.with_borrow_mut(|r| *r = Some(Vec::new()));
        Collecting
    }

    fn take(&self) -> Vec<String> {
        RECOVERED.with_borrow_mut(|r| r.replace(Vec::new()).unwrap_or_default())
    }
}

impl Drop for Collecting {
    fn drop(&mut self) {
        RECOVERED.with_borrow_mut(|r| *r = None);
    }
}

/// One YAML node, whatever its shape, as the visitors below see it.
enum Node<'de> {
    Str(std::borrow::Cow<'de, str>),
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    /// An integer beyond 64 bits, as written.
    Big(String),
    Null,
    /// A mapping, a sequence or a tagged value: never a leaf.
    Nested(&'static str),
}

impl fmt::Display for Node<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Node::Str(s) => write!(f, "{s:?}"),
            Node::U64(v) => write!(f, "\"{v}\""),
            Node::I64(v) => write!(f, "\"{v}\""),
            Node::F64(v) => write!(f, "\"{v}\""),
            Node::Bool(v) => write!(f, "\"{v}\""),
            Node::Big(v) => write!(f, "\"{v}\""),
            Node::Null => f.write_str("an empty value"),
            Node::Nested(what) => f.write_str(what),
        }
    }
}

/// A visitor that takes any node and hands it to `F`, which may still fail inside the
/// deserializer, where the path is known. A scalar is consumed whole, so a parse can go on after
/// a bad one; a mapping, a list or a tagged value sets `nested`.
struct AnyNode<'a, F> {
    f: F,
    expecting: &'static str,
    nested: &'a Cell<bool>,
}

impl<'a, F> AnyNode<'a, F> {
    fn new(f: F, expecting: &'static str, nested: &'a Cell<bool>) -> Self {
        AnyNode {
            f,
            expecting,
            nested,
        }
    }
}

impl<'de, T, F: FnOnce(Node<'de>) -> Result<T, String>> Visitor<'de> for AnyNode<'_, F> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<T, E> {
        (self.f)(Node::Str(v.into())).map_err(E::custom)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.f)(Node::Str(v.to_owned().into())).map_err(E::custom)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        (self.f)(Node::U64(v)).map_err(E::custom)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        (self.f)(Node::I64(v)).map_err(E::custom)
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<T, E> {
        (self.f)(Node::Big(v.to_string())).map_err(E::custom)
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<T, E> {
        (self.f)(Node::Big(v.to_string())).map_err(E::custom)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        (self.f)(Node::F64(v)).map_err(E::custom)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<T, E> {
        (self.f)(Node::Bool(v)).map_err(E::custom)
    }
    fn visit_unit<E: de::Error>(self) -> Result<T, E> {
        (self.f)(Node::Null).map_err(E::custom)
    }
    fn visit_none<E: de::Error>(self) -> Result<T, E> {
        (self.f)(Node::Null).map_err(E::custom)
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<T, A::Error> {
        self.nested.set(true);
        (self.f)(Node::Nested("a mapping")).map_err(de::Error::custom)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<T, A::Error> {
        self.nested.set(true);
        (self.f)(Node::Nested("a list")).map_err(de::Error::custom)
    }
    fn visit_enum<A: EnumAccess<'de>>(self, _: A) -> Result<T, A::Error> {
        self.nested.set(true);
        (self.f)(Node::Nested("a tagged value")).map_err(de::Error::custom)
    }
}

/// A duration node: read by [`Dur::parse`], as a flag is. YAML reads `0` and `15` as numbers:
/// they go by their text, so `0` is zero and `15` asks for a unit.
fn parse_dur(node: Node<'_>) -> Result<Dur, String> {
    match &node {
        Node::Str(s) => Dur::parse(s),
        Node::U64(v) => Dur::parse(&v.to_string()),
        Node::I64(v) => Dur::parse(&v.to_string()),
        Node::Big(v) => Dur::parse(v),
        _ => Err(format!("{node} is not a duration (e.g. 10s, 500ms, 1h30m)")),
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let nested = Cell::new(false);
        let parsed = d.deserialize_any(AnyNode::new(parse_dur, "a duration", &nested));
        recover(parsed, nested.get(), || Dur(Duration::ZERO))
    }
}

/// A number or switch of the file format: read from any node, and recovered (reported, then
/// left at its default) when it is not one, like [`Dur`]. For `deserialize_with`.
pub(crate) fn lenient<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    let nested = Cell::new(false);
    let parsed = d.deserialize_any(AnyNode::new(scalar::<T>, "a single value", &nested));
    recover(parsed, nested.get(), T::default)
}

/// [`lenient`] for an optional number: an empty value is `None`.
#[cfg(any(feature = "agent", feature = "egress"))]
pub(crate) fn lenient_opt<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    let nested = Cell::new(false);
    let parsed = d.deserialize_any(AnyNode::new(
        |node| match node {
            Node::Null => Ok(None),
            node => scalar::<T>(node).map(Some),
        },
        "a number",
        &nested,
    ));
    recover(parsed, nested.get(), || None)
}

fn scalar<'de, T: Deserialize<'de>>(node: Node<'de>) -> Result<T, String> {
    type E = de::value::Error;
    let parsed = match &node {
        Node::U64(v) => T::deserialize(IntoDeserializer::<E>::into_deserializer(*v)),
        Node::I64(v) => T::deserialize(IntoDeserializer::<E>::into_deserializer(*v)),
        Node::F64(v) => T::deserialize(IntoDeserializer::<E>::into_deserializer(*v)),
        Node::Bool(v) => T::deserialize(IntoDeserializer::<E>::into_deserializer(*v)),
        Node::Str(s) => T::deserialize(IntoDeserializer::<E>::into_deserializer(s.as_ref())),
        Node::Big(s) => T::deserialize(IntoDeserializer::<E>::into_deserializer(s.as_str())),
        Node::Null | Node::Nested(_) => {
            let words = expected::<T>().map_or("a single value", |e| e.words);
            return Err(format!("{node} is not {words}"));
        }
    };
    parsed.map_err(|e| match expected::<T>() {
        Some(expected) => problem(&node, &expected),
        // An enum's own error lists the accepted values.
        None => format!("{node}: {e}"),
    })
}

/// What a leaf must be: in words, and for a whole number its largest value.
struct Expected {
    words: &'static str,
    max: Option<u64>,
}

/// What a leaf of type `T` must be; `None` for types whose own error says it.
fn expected<T>() -> Option<Expected> {
    let (words, max) = match std::any::type_name::<T>() {
        "bool" => ("true or false", None),
        "u16" => ("a whole number from 0 to 65535", Some(u64::from(u16::MAX))),
        "u32" => (
            "a whole number from 0 to 4294967295",
            Some(u64::from(u32::MAX)),
        ),
        "u64" => ("a whole number (0 or more)", Some(u64::MAX)),
        "usize" => ("a whole number (0 or more)", u64::try_from(usize::MAX).ok()),
        _ => return None,
    };
    Some(Expected { words, max })
}

/// Why `node` is not what `expected` describes, in the terms the user wrote it in: a value in
/// quotes, a decimal number where a whole one belongs, a number out of range.
fn problem(node: &Node<'_>, expected: &Expected) -> String {
    let not = || format!("{node} is not {}", expected.words);
    let Some(max) = expected.max else {
        return match node {
            Node::Str(s) if s.trim().parse::<bool>().is_ok() => {
                format!("{node} is in quotes: write {} without them", s.trim())
            }
            _ => not(),
        };
    };
    let too_large = || format!("{node} is too large: at most {max}");
    let negative = || format!("{node} is negative: must be {}", expected.words);
    match node {
        Node::Str(s) if s.trim().parse::<i128>().is_ok() => {
            format!("{node} is in quotes: write {} without them", s.trim())
        }
        Node::U64(_) => too_large(),
        Node::I64(v) if *v < 0 => negative(),
        Node::Big(v) if v.starts_with('-') => negative(),
        Node::Big(_) => too_large(),
        Node::F64(v) if v.is_finite() && v.fract() == 0.0 => {
            if *v < 0.0 {
                negative()
            } else if *v > max as f64 {
                too_large()
            } else {
                format!("{node} is written as a decimal number (like 1e6 or 1.0): write it as {v}")
            }
        }
        _ => not(),
    }
}

/// Parses YAML text; `origin` names it in errors. Every wrongly typed value is reported (each
/// with its field path and line), not only the first.
pub(super) fn parse(text: &str, origin: &str) -> Result<FileConfig, ConfigErrors> {
    let (file, errs) = parse_recovering(text, origin);
    match file {
        Some(file) => errs.finish(file),
        None => Err(errs),
    }
}

/// Parses YAML text, recording every wrongly typed value and every unknown field. The file comes
/// back, those fields left out (at their defaults), unless a problem stopped the parse (bad YAML,
/// a mapping where a value belongs, an unknown top-level section).
pub(super) fn parse_recovering(text: &str, origin: &str) -> (Option<FileConfig>, ConfigErrors) {
    let mut errs = ConfigErrors::new(origin);
    let (result, recovered) = parse_collecting(text);
    errs.errors.extend(recovered);
    let file = match result {
        Ok(file) if errs.errors.is_empty() => Some(file),
        // Parse again without the bad fields, so that they hold their defaults.
        Ok(_) => without_fields(text, &errs.errors),
        Err(e) => {
            let first = yaml_error(&e.to_string());
            match unknown_key(&first).map(str::to_owned) {
                Some(key) => {
                    let more = more_unknown_fields(text, &first.field, &key);
                    let unknown: Vec<ConfigError> = std::iter::once(first).chain(more).collect();
                    errs.errors.extend(unknown.iter().cloned());
                    without_unknown_fields(text, &unknown, &mut errs.errors)
                }
                None => {
                    errs.errors.push(first);
                    None
                }
            }
        }
    };
    for e in &mut errs.errors {
        name_a_missing_role(e, text);
    }
    (file, errs)
}

/// Deserializes `text`, with the wrongly typed values it skipped.
fn parse_collecting(text: &str) -> (Result<FileConfig, serde_yaml_ng::Error>, Vec<ConfigError>) {
    let collecting = Collecting::start();
    let result = serde_yaml_ng::from_str::<FileConfig>(text);
    let recovered = collecting.take().iter().map(|e| yaml_error(e)).collect();
    (result, recovered)
}

/// The file parsed without its `unknown` fields, so that one misspelt key does not hide every
/// other problem: the wrongly typed values the first parse did not reach are added to `errors`.
/// `None` for an unknown top-level section: which roles the file means is then a guess, and
/// "no role configured" would be the guess's fault.
fn without_unknown_fields(
    text: &str,
    unknown: &[ConfigError],
    errors: &mut Vec<ConfigError>,
) -> Option<FileConfig> {
    if unknown.iter().any(|e| e.field.is_empty()) {
        return None;
    }
    let mut value: Value = serde_yaml_ng::from_str(text).ok()?;
    for e in unknown {
        if let Some(key) = unknown_key(e) {
            remove(&mut value, &join_path(&e.field, key));
        }
    }
    let copy = serde_yaml_ng::to_string(&value).ok()?;
    let (result, recovered) = parse_collecting(&copy);
    // The copy's lines are not the file's: each is looked up in the file.
    let fresh: Vec<ConfigError> = recovered
        .iter()
        .filter(|r| !errors.iter().any(|e| e.field == r.field))
        .map(|r| at_line_in(r.clone(), text))
        .collect();
    errors.extend(fresh);
    let file = match result {
        Ok(file) => file,
        Err(e) => {
            errors.push(at_line_in(yaml_error(&e.to_string()), text));
            return None;
        }
    };
    if recovered.is_empty() {
        Some(file)
    } else {
        without_fields(&copy, &recovered)
    }
}

/// `e` with the line of its field's key in `text`, or without a line when the key is written
/// more than once there.
fn at_line_in(mut e: ConfigError, text: &str) -> ConfigError {
    if let Some(at) = e.message.rfind(" at line ") {
        e.message.truncate(at);
    }
    let key = e.field.rsplit('.').next().unwrap_or("");
    let key = key.split('[').next().unwrap_or(key);
    if let Some(line) = line_of_key(text, key) {
        e.message.push_str(&format!(" at line {line}"));
    }
    e
}

/// What a top-level section configures and the Cargo feature that compiles it in, for a section
/// this build leaves out.
fn left_out(section: &str) -> Option<(&'static str, &'static str)> {
    match section {
        "gateway" if !cfg!(feature = "gateway") => Some(("the gateway role", "gateway")),
        "agent" if !cfg!(feature = "agent") => Some(("the agent role", "agent")),
        "egress" if !cfg!(feature = "egress") => Some(("the egress role", "egress")),
        "exporter" if !cfg!(feature = "geo") => Some(("the exporter role", "geo")),
        "geoip" if !cfg!(feature = "geo") => Some(("the country database", "geo")),
        _ => None,
    }
}

/// Rewrites "unknown field `gateway`, expected one of `log`, `agent`" for a section this build
/// leaves out (an embedding application's `features = ["agent"]`): the section is right, the
/// build is what lacks it.
fn name_a_missing_role(e: &mut ConfigError, text: &str) {
    if !e.field.is_empty() {
        return;
    }
    let Some(key) = unknown_key(e).map(str::to_owned) else {
        return;
    };
    let Some((what, feature)) = left_out(&key) else {
        return;
    };
    let at = match e.message.rfind(" at line ") {
        Some(i) => e.message[i..].to_owned(),
        None => line_of_key(text, &key).map_or_else(String::new, |l| format!(" at line {l}")),
    };
    let message =
        format!("{what} is not compiled into this build of ferry (Cargo feature `{feature}`){at}");
    e.message = message;
    e.field = key;
}

/// The key of an "unknown field" error.
fn unknown_key(e: &ConfigError) -> Option<&str> {
    let rest = e.message.strip_prefix("unknown field `")?;
    rest.split_once('`').map(|(key, _)| key)
}

/// An unknown field stops serde, so each one after the first is found by parsing again without
/// the ones found so far (at most 20). Those parses read a re-serialised copy whose line numbers
/// are not the file's: the line is looked up in the file instead, and left out when ambiguous.
fn more_unknown_fields(text: &str, parent: &str, key: &str) -> Vec<ConfigError> {
    let mut found = Vec::new();
    let Ok(mut value) = serde_yaml_ng::from_str::<Value>(text) else {
        return found;
    };
    let mut gone = join_path(parent, key);
    for _ in 0..20 {
        remove(&mut value, &gone);
        let Ok(copy) = serde_yaml_ng::to_string(&value) else {
            break;
        };
        // Wrongly typed values are not this pass's business: the first parse reported those it
        // reached, and the rest are reported once the unknown fields are fixed.
        let collecting = Collecting::start();
        let result = serde_yaml_ng::from_str::<FileConfig>(&copy);
        drop(collecting);
        let Err(e) = result else { break };
        let mut e = yaml_error(&e.to_string());
        let Some(key) = unknown_key(&e).map(str::to_owned) else {
            break;
        };
        if let Some(at) = e.message.rfind(" at line ") {
            e.message.truncate(at);
        }
        if let Some(line) = line_of_key(text, &key) {
            e.message.push_str(&format!(" at line {line}"));
        }
        gone = join_path(&e.field, &key);
        found.push(e);
    }
    found
}

fn join_path(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

/// The 1-based line where `key:` is written, if it is written exactly once.
fn line_of_key(text: &str, key: &str) -> Option<usize> {
    let mut lines = text.lines().enumerate().filter(|(_, line)| {
        let line = line.split('#').next().unwrap_or("");
        let line = line.trim_start().trim_start_matches("- ");
        line.starts_with(&format!("{key}:"))
            || line.contains(&format!("{{ {key}:"))
            || line.contains(&format!(", {key}:"))
    });
    match (lines.next(), lines.next()) {
        (Some((n, _)), None) => Some(n + 1),
        _ => None,
    }
}

/// The file parsed again with the fields of `bad` left out.
fn without_fields(text: &str, bad: &[ConfigError]) -> Option<FileConfig> {
    let mut value: Value = serde_yaml_ng::from_str(text).ok()?;
    for e in bad {
        remove(&mut value, &e.field);
    }
    let text = serde_yaml_ng::to_string(&value).ok()?;
    serde_yaml_ng::from_str(&text).ok()
}

/// Removes the mapping entry at `path` (`agent.targets[1].port`), if there is one.
fn remove(value: &mut Value, path: &str) {
    let mut segments: Vec<&str> = Vec::new();
    for part in path.split('.') {
        let mut pieces = part.split('[');
        segments.extend(pieces.next().filter(|k| !k.is_empty()));
        segments.extend(pieces.map(|i| i.trim_end_matches(']')));
    }
    let Some((last, parents)) = segments.split_last() else {
        return;
    };
    let mut node = value;
    for segment in parents {
        let next = match node {
            Value::Mapping(m) => m.get_mut(*segment),
            Value::Sequence(s) => segment.parse::<usize>().ok().and_then(|i| s.get_mut(i)),
            _ => None,
        };
        match next {
            Some(n) => node = n,
            None => return,
        }
    }
    if let Value::Mapping(m) = node {
        m.remove(*last);
    }
}

/// Splits serde_yaml_ng's `path: message at line L column C` into field and message.
fn yaml_error(text: &str) -> ConfigError {
    let text = text.replace('\n', " ");
    let field_like = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.[]?".contains(c))
    };
    match text.split_once(": ") {
        Some((path, message)) if field_like(path) => ConfigError {
            field: path.to_owned(),
            message: message.to_owned(),
        },
        _ => ConfigError {
            field: String::new(),
            message: text,
        },
    }
}

#[cfg(test)]
mod tests {
    /// An application built with `features = ["agent"]` reading a file written for the binary.
    #[cfg(not(any(feature = "gateway", feature = "egress")))]
    #[test]
    fn a_section_this_build_leaves_out_names_the_cargo_feature() {
        let text = "gateway:\n  data_dir: /x\nagent:\n  agent_id: a\negress:\n  rules: []\n";
        let errs = super::parse(text, "ferry.yaml").unwrap_err();
        let lines: Vec<String> = errs.to_string().lines().map(str::to_owned).collect();
        assert_eq!(
            lines,
            [
                "ferry.yaml: gateway: the gateway role is not compiled into this build of ferry (Cargo feature `gateway`) at line 1",
                "ferry.yaml: egress: the egress role is not compiled into this build of ferry (Cargo feature `egress`) at line 5",
            ]
        );
    }
}
