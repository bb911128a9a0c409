//! What a certificate says about itself that rustls does not check when it is loaded: its
//! validity dates and whether it is a CA. A server certificate that has expired, is not valid
//! yet, or is a CA is loaded without complaint and then refused by every client: the gateway
//! warns about it at start, refuses a reload that would put one in place of a valid one, and
//! exports the expiry date for alerting. The agent warns about its client certificates (the
//! tunnel's, its targets') whose dates the gateway or a target will refuse.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// A listener's certificate and key files, with what its leaf certificate says.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The certificate chain.
    pub cert: PathBuf,
    /// The private key.
    pub key: PathBuf,
    /// The leaf's dates and CA flag, if they could be read.
    pub leaf: Option<LeafInfo>,
    /// The tunnel certificate the gateway generated in its data directory: agents pinning its
    /// fingerprint do not check its dates, and renewing it means generating a new one.
    pub self_signed: bool,
}

impl CertFiles {
    /// What an operator should hear about these files at `now`: a certificate clients will
    /// refuse, a private key every local user can read.
    pub fn warnings(&self, listener: &str, now: SystemTime) -> Vec<String> {
        self.problem(listener, now)
            .into_iter()
            .chain(readable_by_all(&self.key, listener))
            .collect()
    }

    /// Why clients of `listener` will not accept this certificate as a server's at `now`.
    fn problem(&self, listener: &str, now: SystemTime) -> Option<String> {
        let leaf = self.leaf?;
        let file = self.cert.display();
        // Agents (rustls) refuse a CA certificate as a server's; Prometheus and curl accept a
        // self-signed one made by `openssl req -x509`, which is often CA:TRUE, on the web side.
        if leaf.is_ca && listener == "tunnel" {
            return Some(format!(
                "certificate {file} is a CA certificate (CA:TRUE), which agents refuse as the \
                 gateway's: put the gateway's own certificate first in the file"
            ));
        }
        let dates = leaf.date_problem(now)?;
        Some(match (dates, self.self_signed) {
            (DateProblem::Expired { .. }, false) => {
                format!("certificate {file} {dates}: clients refuse it (renew it, then SIGHUP)")
            }
            (DateProblem::NotYetValid { .. }, false) => format!(
                "certificate {file} {dates}: clients refuse it until then (is this host's clock \
                 right?)"
            ),
            // A reload does not generate a certificate: only a start with neither file does.
            (DateProblem::Expired { .. }, true) => format!(
                "certificate {file} {dates}: agents pinning its fingerprint (tunnel.fingerprint) \
                 do not check dates and still connect, agents verifying it with tunnel.ca_file \
                 refuse it; to renew it, remove both files in the data directory and restart \
                 (a new certificate is generated: give agents its fingerprint)"
            ),
            (DateProblem::NotYetValid { .. }, true) => format!(
                "certificate {file} {dates}: agents pinning its fingerprint (tunnel.fingerprint) \
                 do not check dates and still connect, agents verifying it with tunnel.ca_file \
                 refuse it until then (is this host's clock right?)"
            ),
        })
    }
}

/// A warning if every user may read the private key `path`. Group-readable is left alone: a
/// key shared with a group (`ssl-cert`) on purpose is common.
fn readable_by_all(path: &Path, listener: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o004 != 0).then(|| {
        format!(
            "key file {} is readable by every user (mode {mode:04o}): whoever reads it can pose as this gateway's {listener} listener (chmod o-r)",
            path.display()
        )
    })
}

/// The parts of a leaf certificate the gateway warns about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeafInfo {
    /// `notBefore`, seconds since the Unix epoch.
    pub not_before: i64,
    /// `notAfter`, seconds since the Unix epoch.
    pub not_after: i64,
    /// Whether its basic constraints say `CA:TRUE`.
    pub is_ca: bool,
}

impl LeafInfo {
    /// Reads the validity and basic constraints of a DER certificate; `None` if it cannot be
    /// parsed (rustls reports that on its own).
    pub fn of(der: &[u8]) -> Option<LeafInfo> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let validity = cert.validity();
        let is_ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
        Some(LeafInfo {
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
            is_ca,
        })
    }

    /// What is wrong with its validity dates at `now`, if anything: every client that checks
    /// them (all but agents pinning its fingerprint) refuses it.
    pub fn date_problem(&self, now: SystemTime) -> Option<DateProblem> {
        let now = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        if now > self.not_after {
            Some(DateProblem::Expired {
                not_after: self.not_after,
            })
        } else if now < self.not_before {
            Some(DateProblem::NotYetValid {
                not_before: self.not_before,
                now,
            })
        } else {
            None
        }
    }

    /// What is wrong at `now` with the dates of the first certificate of `file`, if anything;
    /// `None` also when it cannot be read (loading it says so).
    pub fn file_date_problem(file: &Path, now: SystemTime) -> Option<DateProblem> {
        let certs = super::tls::read_certs(file).ok()?;
        LeafInfo::of(certs.first()?)?.date_problem(now)
    }

    /// Why a client certificate (the first of `file`) is refused for its dates at `now`, by
    /// whoever `refused_by` names with its verb; `None` also when it cannot be read (loading it
    /// says so).
    pub fn client_problem(file: &Path, now: SystemTime, refused_by: &str) -> Option<String> {
        let problem = LeafInfo::file_date_problem(file, now)?;
        let then = match problem {
            DateProblem::Expired { .. } => "(renew it, then SIGHUP)",
            DateProblem::NotYetValid { .. } => "until then (is this host's clock right?)",
        };
        Some(format!(
            "certificate {} {problem}: {refused_by} it {then}",
            file.display()
        ))
    }
}

/// Why a certificate is not valid at some moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DateProblem {
    /// Past its `notAfter` (seconds since the Unix epoch).
    Expired {
        /// `notAfter`.
        not_after: i64,
    },
    /// Before its `notBefore`.
    NotYetValid {
        /// `notBefore`, seconds since the Unix epoch.
        not_before: i64,
        /// The moment it was checked at, seconds since the Unix epoch.
        now: i64,
    },
}

/// `expired on <date>` or `is not valid before <date> (now <date>)`, to follow a file's name.
impl std::fmt::Display for DateProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            DateProblem::Expired { not_after } => write!(f, "expired on {}", utc(not_after)),
            DateProblem::NotYetValid { not_before, now } => write!(
                f,
                "is not valid before {} (now {})",
                utc(not_before),
                utc(now)
            ),
        }
    }
}

/// `2026-05-01 12:00:00 UTC` for seconds since the Unix epoch (clamped to 1970).
fn utc(secs: i64) -> String {
    super::tls::utc(u64::try_from(secs).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    use std::time::Duration;

    fn cert(params: impl FnOnce(&mut CertificateParams)) -> Vec<u8> {
        let mut p = CertificateParams::new(vec!["gw.test".to_owned()]).unwrap();
        params(&mut p);
        p.self_signed(&KeyPair::generate().unwrap())
            .unwrap()
            .der()
            .to_vec()
    }

    #[test]
    fn reads_the_dates_and_the_ca_flag() {
        let der = cert(|p| {
            p.not_before = rcgen::date_time_ymd(2020, 2, 29);
            p.not_after = rcgen::date_time_ymd(2051, 1, 2);
        });
        let info = LeafInfo::of(&der).unwrap();
        assert_eq!(utc(info.not_before), "2020-02-29 00:00:00 UTC");
        assert_eq!(utc(info.not_after), "2051-01-02 00:00:00 UTC");
        assert!(!info.is_ca);
        let ca = cert(|p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained));
        assert!(LeafInfo::of(&ca).unwrap().is_ca);
        let explicit_no = cert(|p| p.is_ca = IsCa::ExplicitNoCa);
        assert!(!LeafInfo::of(&explicit_no).unwrap().is_ca);
        assert_eq!(LeafInfo::of(b"not DER"), None);
    }

    /// Files for `der`'s certificate at `/etc/ferry/tun.crt`, with a key file that is not there.
    fn files(der: &[u8], self_signed: bool) -> CertFiles {
        CertFiles {
            cert: PathBuf::from("/etc/ferry/tun.crt"),
            key: PathBuf::from("/nonexistent/tun.key"),
            leaf: LeafInfo::of(der),
            self_signed,
        }
    }

    /// 2027-01-15 08:00:00 UTC, and a certificate that expired on 2026-10-01.
    fn expired_at_now() -> (SystemTime, Vec<u8>) {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let expired = cert(|p| {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2026, 10, 1);
        });
        (now, expired)
    }

    #[test]
    fn problems_name_the_file_and_the_dates() {
        let (now, expired) = expired_at_now();
        assert_eq!(
            files(&expired, false).warnings("tunnel", now),
            ["certificate /etc/ferry/tun.crt expired on 2026-10-01 00:00:00 UTC: clients refuse it (renew it, then SIGHUP)"]
        );
        let early = cert(|p| {
            p.not_before = rcgen::date_time_ymd(2030, 1, 1);
            p.not_after = rcgen::date_time_ymd(2031, 1, 1);
        });
        let said = files(&early, false).warnings("web", now).join("\n");
        assert!(
            said.contains("not valid before 2030-01-01 00:00:00 UTC (now 2027-01-15 08:00:00 UTC)"),
            "{said}"
        );
        let ca = cert(|p| {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        });
        let said = files(&ca, false).warnings("tunnel", SystemTime::now());
        assert!(
            said[0].contains("is a CA certificate (CA:TRUE), which agents refuse"),
            "{said:?}"
        );
        assert!(files(&ca, false)
            .warnings("web", SystemTime::now())
            .is_empty());
        let fine = cert(|_| {});
        assert!(files(&fine, false)
            .warnings("tunnel", SystemTime::now())
            .is_empty());
    }

    /// The generated certificate is pinned by most agents, which do not check its dates, and is
    /// renewed by generating a new one at start (SIGHUP does not): the warning says that.
    #[test]
    fn an_expired_self_signed_certificate_gets_advice_that_works() {
        let (now, expired) = expired_at_now();
        let said = files(&expired, true).warnings("tunnel", now);
        assert_eq!(said.len(), 1, "{said:?}");
        for part in [
            "certificate /etc/ferry/tun.crt expired on 2026-10-01 00:00:00 UTC",
            "agents pinning its fingerprint (tunnel.fingerprint) do not check dates",
            "agents verifying it with tunnel.ca_file refuse it",
            "remove both files in the data directory and restart",
        ] {
            assert!(said[0].contains(part), "{part:?} not in {said:?}");
        }
        assert!(!said[0].contains("SIGHUP"), "{said:?}");
    }

    #[test]
    fn date_problems_read_as_the_end_of_a_sentence() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let early = LeafInfo {
            not_before: 1_900_000_000,
            not_after: 2_000_000_000,
            is_ca: false,
        };
        assert_eq!(
            early.date_problem(now).unwrap().to_string(),
            "is not valid before 2030-03-17 17:46:40 UTC (now 2027-01-15 08:00:00 UTC)"
        );
        let valid = UNIX_EPOCH + Duration::from_secs(1_950_000_000);
        assert_eq!(early.date_problem(valid), None);
    }
}
