//! What a certificate says about itself that rustls does not check when it is loaded: its
//! validity dates and whether it is a CA. A server certificate that has expired, is not valid
//! yet, or is a CA is loaded without complaint and then refused by every client: the gateway
//! warns about it at start and on reload, and exports the expiry date for alerting. The agent
//! warns the same way about its client certificates (the tunnel's, its targets').

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
}

impl CertFiles {
    /// What an operator should hear about these files at `now`: a certificate no client will
    /// accept, a private key every local user can read.
    pub fn warnings(&self, listener: &str, now: SystemTime) -> Vec<String> {
        // Agents (rustls) refuse a CA certificate as a server's; Prometheus and curl accept a
        // self-signed one made by `openssl req -x509`, which is often CA:TRUE, on the web side.
        let ca_refused = listener == "tunnel";
        let problem = self
            .leaf
            .and_then(|leaf| leaf.problem(&self.cert, now, ca_refused));
        problem
            .into_iter()
            .chain(readable_by_all(&self.key, listener))
            .collect()
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

    /// Why clients will not accept this certificate as a server's at `now`, naming `file`;
    /// with `ca_refused`, the clients are ferry agents, which also refuse a CA certificate.
    pub fn problem(&self, file: &Path, now: SystemTime, ca_refused: bool) -> Option<String> {
        let now = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let file = file.display();
        if self.is_ca && ca_refused {
            return Some(format!(
                "certificate {file} is a CA certificate (CA:TRUE), which agents refuse as the \
                 gateway's: put the gateway's own certificate first in the file"
            ));
        }
        self.dates_problem(&file, now, "clients refuse")
    }

    /// Why the certificate in `file` is refused at `now` for its dates alone, by whoever
    /// `refused_by` names with its verb (`clients refuse`, `the gateway refuses`).
    fn dates_problem(
        &self,
        file: &dyn std::fmt::Display,
        now: i64,
        refused_by: &str,
    ) -> Option<String> {
        if now > self.not_after {
            return Some(format!(
                "certificate {file} expired on {}: {refused_by} it (renew it, then SIGHUP)",
                utc(self.not_after)
            ));
        }
        if now < self.not_before {
            return Some(format!(
                "certificate {file} is not valid before {} (now {}): {refused_by} it until \
                 then (is this host's clock right?)",
                utc(self.not_before),
                utc(now)
            ));
        }
        None
    }

    /// Why a client certificate (the first of `file`) is refused for its dates at `now`, by
    /// whoever `refused_by` names with its verb; `None` also when it cannot be read (loading it
    /// says so).
    pub fn client_problem(file: &Path, now: SystemTime, refused_by: &str) -> Option<String> {
        let certs = super::tls::read_certs(file).ok()?;
        let now = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        LeafInfo::of(certs.first()?)?.dates_problem(&file.display(), now, refused_by)
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

    #[test]
    fn problems_name_the_file_and_the_dates() {
        let file = Path::new("/etc/ferry/tun.crt");
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000); // 2027-01-15 08:00:00 UTC
        let expired = LeafInfo::of(&cert(|p| {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2026, 10, 1);
        }))
        .unwrap();
        assert_eq!(
            expired.problem(file, now, true).unwrap(),
            "certificate /etc/ferry/tun.crt expired on 2026-10-01 00:00:00 UTC: clients refuse it (renew it, then SIGHUP)"
        );
        let early = LeafInfo::of(&cert(|p| {
            p.not_before = rcgen::date_time_ymd(2030, 1, 1);
            p.not_after = rcgen::date_time_ymd(2031, 1, 1);
        }))
        .unwrap();
        let said = early.problem(file, now, true).unwrap();
        assert!(
            said.contains("not valid before 2030-01-01 00:00:00 UTC (now 2027-01-15 08:00:00 UTC)"),
            "{said}"
        );
        let ca = LeafInfo::of(&cert(|p| {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        }))
        .unwrap();
        assert!(ca
            .problem(file, SystemTime::now(), true)
            .unwrap()
            .contains("is a CA certificate (CA:TRUE), which agents refuse"));
        assert_eq!(ca.problem(file, SystemTime::now(), false), None);
        let fine = LeafInfo::of(&cert(|_| {})).unwrap();
        assert_eq!(fine.problem(file, SystemTime::now(), true), None);
    }
}
