//! tracing set-up: `--log.level`, `--log.format logfmt|json`, to stderr.
//!
//! logfmt lines are written here, not by a logfmt crate: `key=value` pairs, a value quoted when it
//! holds a space, `=` or `"`, and inside quotes only `"`, `\` and control characters escaped — so
//! an apostrophe in a message stays an apostrophe.

use std::fmt::{self, Write};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields};
use tracing_subscriber::fmt::{FmtContext, FormattedFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, LogSection};

/// Whether [`init`] installed the JSON format: errors that end the process are then written as
/// JSON records too, or a log pipeline that parses every line would choke on the last one.
static JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the log is JSON (see [`JSON`]).
pub fn is_json() -> bool {
    JSON.load(std::sync::atomic::Ordering::Relaxed)
}

/// Installs the global subscriber. Noisy dependencies stay at warn unless asked for by name.
pub fn init(log: &LogSection) {
    JSON.store(
        matches!(log.format, LogFormat::Json),
        std::sync::atomic::Ordering::Relaxed,
    );
    // Validation refused a level `filter` cannot read; this is for a caller that skipped it.
    let filter = filter(&log.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let layer = match log.format {
        LogFormat::Logfmt => tracing_subscriber::fmt::layer()
            .event_format(Logfmt)
            .fmt_fields(LogfmtFields)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(layer)
        .try_init();
}

/// The filter of `log.level`: a level, or tracing filter directives (`info,ferry::agent=debug`)
/// used as written.
pub fn filter(level: &str) -> Result<EnvFilter, String> {
    let directives = if level.contains('=') {
        level.to_owned()
    } else {
        format!("{level},h2=warn,hyper=warn,rustls=warn")
    };
    EnvFilter::builder().parse(&directives).map_err(|e| {
        format!("{level:?} is not a level (error, warn, info, debug, trace) or a tracing filter such as info,ferry::agent=debug: {e}")
    })
}

/// One logfmt line per event: `ts level target span`, the event's fields, then its spans' fields.
pub struct Logfmt;

impl<S, N> FormatEvent<S, N> for Logfmt
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: format::Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let ts = humantime::format_rfc3339_millis(std::time::SystemTime::now());
        let level = meta.level().as_str().to_ascii_lowercase();
        write!(w, "ts={ts} level={level} target=")?;
        write_value(&mut w, meta.target())?;
        let span = event
            .parent()
            .and_then(|id| ctx.span(id))
            .or_else(|| ctx.lookup_current());
        if let Some(span) = &span {
            w.write_str(" span=")?;
            write_value(&mut w, span.name())?;
        }
        let mut fields = Fields::new(&mut w, true);
        event.record(&mut fields);
        fields.result?;
        if let Some(leaf) = ctx.lookup_current() {
            for span in leaf.scope().from_root() {
                let ext = span.extensions();
                if let Some(data) = ext.get::<FormattedFields<N>>().filter(|d| !d.is_empty()) {
                    write!(w, " {data}")?;
                }
            }
        }
        writeln!(w)
    }
}

/// Span fields in logfmt, stored with each span and appended to its events' lines.
pub struct LogfmtFields;

impl<'w> FormatFields<'w> for LogfmtFields {
    fn format_fields<R: RecordFields>(&self, mut w: format::Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = Fields::new(&mut w, false);
        fields.record(&mut visitor);
        visitor.result
    }
}

/// Writes each field as `key=value`, separated by spaces.
struct Fields<'a, W> {
    w: &'a mut W,
    /// Whether a space goes before the first field too.
    space: bool,
    result: fmt::Result,
}

impl<'a, W: Write> Fields<'a, W> {
    fn new(w: &'a mut W, space_first: bool) -> Self {
        Fields {
            w,
            space: space_first,
            result: Ok(()),
        }
    }

    fn entry(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        self.result = (|| {
            if self.space {
                self.w.write_char(' ')?;
            }
            self.space = true;
            self.w.write_str(field.name().trim_start_matches("r#"))?;
            self.w.write_char('=')?;
            write_value(self.w, value)
        })();
    }
}

impl<W: Write> Visit for Fields<'_, W> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.entry(field, value);
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.entry(field, &value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.entry(field, &format!("{value:?}"));
    }
}

/// A logfmt value: bare unless it holds a space, `=`, `"` or a control character; quoted, with
/// `"`, `\` and control characters escaped, if it does.
fn write_value(w: &mut impl Write, value: &str) -> fmt::Result {
    if !value
        .chars()
        .any(|c| c <= ' ' || c == '=' || c == '"' || c.is_control())
    {
        return w.write_str(value);
    }
    w.write_char('"')?;
    for c in value.chars() {
        match c {
            '"' => w.write_str("\\\"")?,
            '\\' => w.write_str("\\\\")?,
            '\n' => w.write_str("\\n")?,
            '\r' => w.write_str("\\r")?,
            '\t' => w.write_str("\\t")?,
            c if c.is_control() => write!(w, "\\u{{{:x}}}", c as u32)?,
            c => w.write_char(c)?,
        }
    }
    w.write_char('"')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(s: &str) -> String {
        let mut out = String::new();
        write_value(&mut out, s).unwrap();
        out
    }

    #[test]
    fn logfmt_values_escape_only_quotes_backslashes_and_control_characters() {
        assert_eq!(
            value("check the tokens file's glob"),
            r#""check the tokens file's glob""#
        );
        assert_eq!(value(r#"say "hi" \ bye"#), r#""say \"hi\" \\ bye""#);
        assert_eq!(value("two\nlines"), r#""two\nlines""#);
        assert_eq!(value("a=b"), r#""a=b""#);
        assert_eq!(value("bare'word"), "bare'word");
        assert_eq!(value("Zürich"), "Zürich");
        assert_eq!(value(""), "");
    }

    #[test]
    fn a_logged_event_is_one_logfmt_line() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .event_format(Logfmt)
                .fmt_fields(LogfmtFields)
                .with_writer(move || writer.clone()),
        );
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("session", agent = "node-1");
            let _enter = span.enter();
            tracing::error!(retry_in = ?std::time::Duration::from_secs(60), n = 3, "GATEWAY REFUSED OUR CREDENTIALS: check the tokens file's glob");
        });
        let line = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let rest = line.split_once(' ').unwrap().1;
        assert!(line.starts_with("ts=") && line.ends_with('\n'), "{line}");
        assert_eq!(
            rest,
            "level=error target=ferry::cli::logging::tests span=session message=\"GATEWAY REFUSED OUR CREDENTIALS: check the tokens file's glob\" retry_in=60s n=3 agent=node-1\n"
        );
    }
}
