//! TLS pieces both ends share: PEM loading, fingerprints, the crypto provider and its errors.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

/// Why a TLS identity, trust anchor or configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A certificate file could not be read or holds no PEM certificate.
    #[error("certificate file {path}: {reason}")]
    Cert {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A key file could not be read or holds no PEM private key.
    #[error("key file {path}: {reason}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls rejected the certificate and key together.
    #[error("certificate {cert} and key {key} do not form a usable identity: {reason}")]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls's reason.
        reason: String,
    },
    /// The private key is not the one of the certificate (a renewal copied one file, not both).
    #[error("the key in {key} does not belong to the certificate in {cert}")]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// rustls refused the configuration (no usable trust anchors, no protocol version).
    #[error("TLS configuration: {0}")]
    Config(String),
    /// The self-signed certificate could not be generated or stored.
    // Named as the setting and with the whole path: a relative default (`data`) resolved
    // against a working directory the operator did not choose (`/` under systemd) is the
    // usual cause.
    #[error("self-signed certificate in data directory {} (data_dir, --data-dir): {reason}", std::path::absolute(dir).unwrap_or_else(|_| dir.clone()).display())]
    SelfSigned {
        /// The data directory.
        dir: PathBuf,
        /// What failed.
        reason: String,
    },
}

/// The crypto provider for every TLS connection ferry makes: ring, chosen explicitly so that no
/// process-wide default has to be installed (embedding applications may have their own).
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `sha256:<hex>` of a DER certificate.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(cert.as_ref())))
}

/// Reads every certificate of a PEM file; at least one must be there.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let error = |reason| TlsError::Cert {
        path: path.to_owned(),
        reason,
    };
    let pem = crate::fs_util::read_regular(path).map_err(|e| error(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(pem_reason(&e)))?;
    if certs.is_empty() {
        return Err(TlsError::Cert {
            path: path.to_owned(),
            reason: "no PEM certificate found".into(),
        });
    }
    Ok(certs)
}

fn pem_reason(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::Io(io) => io.to_string(),
        Error::NoItemsFound => "no PEM item of the expected kind found".into(),
        Error::MissingSectionEnd { end_marker } => format!(
            "not valid PEM: no \"-----END {}-----\" line (a truncated file?)",
            String::from_utf8_lossy(end_marker)
        ),
        Error::IllegalSectionStart { line } => format!(
            "not valid PEM: malformed line {:?}",
            String::from_utf8_lossy(line)
        ),
        Error::Base64Decode(e) => format!("not valid PEM: the base64 inside is broken ({e})"),
        other => format!("not valid PEM: {other}"),
    }
}

/// The error for a certificate chain and key that rustls refused together.
pub fn identity_error(cert: &Path, key: &Path, e: &rustls::Error) -> TlsError {
    match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            TlsError::KeyMismatch {
                cert: cert.to_owned(),
                key: key.to_owned(),
            }
        }
        other => TlsError::Mismatch {
            cert: cert.to_owned(),
            key: key.to_owned(),
            reason: rustls_reason(other),
        },
    }
}

/// Reads the first private key of a PEM file.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let error = |reason| TlsError::Key {
        path: path.to_owned(),
        reason,
    };
    let pem = crate::fs_util::read_regular(path).map_err(|e| error(e.to_string()))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        // rustls-pki-types skips the PEM sections it does not know, so an encrypted key reads
        // as no key at all.
        let has = |label: &[u8]| pem.windows(label.len()).any(|w| w == label);
        if has(ENCRYPTED_KEY) || has(LEGACY_ENCRYPTED) {
            error("the key is encrypted, and ferry reads only unencrypted keys (decrypt it: openssl pkey -in KEY -out NEW-KEY, and keep the new file readable by ferry alone)".into())
        } else {
            error(pem_reason(&e))
        }
    })
}

/// The PEM label of a PKCS#8 key encrypted with a passphrase.
const ENCRYPTED_KEY: &[u8] = b"-----BEGIN ENCRYPTED PRIVATE KEY-----";
/// The header of a key in OpenSSL's traditional format encrypted with a passphrase (what
/// `openssl genrsa -aes256` wrote before OpenSSL 3, and `openssl ec -aes256` still writes).
const LEGACY_ENCRYPTED: &[u8] = b"Proc-Type: 4,ENCRYPTED";

/// rustls's reason for refusing a certificate or key, in plain words: its own message is often
/// Rust debug output (`invalid peer certificate: Other(OtherError(UnsupportedCertVersion))`).
pub fn rustls_reason(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    let rustls::Error::InvalidCertificate(cert) = e else {
        return e.to_string();
    };
    let words = match cert {
        // rustls says these with UNIX timestamps.
        C::ExpiredContext { time, not_after } => {
            return format!(
                "the certificate expired on {} (it is now {})",
                utc(not_after.as_secs()),
                utc(time.as_secs())
            )
        }
        C::NotValidYetContext { time, not_before } => {
            return format!(
                "the certificate is not valid before {} (it is now {}; is a clock wrong?)",
                utc(not_before.as_secs()),
                utc(time.as_secs())
            )
        }
        C::BadEncoding => "the certificate is not valid DER",
        C::Expired => "the certificate has expired",
        C::NotValidYet => "the certificate is not valid yet",
        C::UnknownIssuer => "the certificate's issuer is not trusted",
        C::BadSignature => "the certificate's signature is invalid",
        C::Other(other) => match other.0.downcast_ref::<webpki::Error>() {
            Some(e) => return webpki_reason(e),
            None => return format!("invalid certificate: {}", other.0),
        },
        other => return other.to_string(),
    };
    words.to_owned()
}

/// A certificate refused for the name checked, in words: `the certificate is valid for
/// other.test, not collector.test`. rustls says the names as Rust debug output
/// (`DnsName("other.test")`).
pub fn name_mismatch(expected: &str, presented: &[String]) -> String {
    let names: Vec<&str> = presented
        .iter()
        .map(|name| {
            let inner = name
                .strip_prefix("DnsName(")
                .or_else(|| name.strip_prefix("IpAddress("))
                .and_then(|rest| rest.strip_suffix(')'))
                .unwrap_or(name);
            inner.trim_matches('"')
        })
        .collect();
    match names.as_slice() {
        [] => format!("the certificate names no host (no subjectAltName), so not {expected}"),
        [one] => format!("the certificate is valid for {one}, not {expected}"),
        [rest @ .., last] => format!(
            "the certificate is valid for {} or {last}, not {expected}",
            rest.join(", ")
        ),
    }
}

/// rustls's error in `e`'s chain, if TLS is what failed (a handshake, an alert from the peer).
pub fn rustls_error_in<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(rustls) = err.downcast_ref::<rustls::Error>() {
            return Some(rustls);
        }
        // An io::Error's `source` skips the error it wraps, which may be an io::Error wrapping
        // rustls's in turn (hyper-rustls wraps tokio-rustls's): go through the wrapped one.
        cur = match err.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    None
}

/// `2026-05-01 12:00:00 UTC` for seconds since the Unix epoch.
pub fn utc(secs: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replace('T', " ")
        .replace('Z', " UTC")
}

fn webpki_reason(e: &webpki::Error) -> String {
    use webpki::Error as W;
    let words = match e {
        W::UnsupportedCertVersion => "unsupported certificate version (X.509 v1; v3 required)",
        W::CaUsedAsEndEntity => "a CA certificate cannot be used as the end-entity certificate",
        W::EndEntityUsedAsCa => "an end-entity certificate cannot be used as a CA",
        W::ExtensionValueInvalid | W::MalformedExtensions => {
            "the certificate has a malformed extension"
        }
        W::UnsupportedCriticalExtension => {
            "the certificate has a critical extension that is not supported"
        }
        W::InvalidSerialNumber => "the certificate's serial number is invalid",
        W::EmptyEkuExtension => "the certificate's extended key usage extension is empty",
        W::RequiredEkuNotFoundContext(_) => {
            "the certificate's extended key usage does not allow this use"
        }
        other => return format!("invalid certificate: {other:?}"),
    };
    words.to_owned()
}

/// Parses `sha256:<64 hex digits>` into the 32 bytes it names.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], String> {
    let hex_part = s
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("{s:?} must start with sha256:"))?;
    let cleaned: String = hex_part.chars().filter(|c| *c != ':').collect();
    let mut out = [0u8; 32];
    hex::decode_to_slice(&cleaned, &mut out)
        .map_err(|_| format!("{s:?} must be sha256: followed by 64 hex digits"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::UnixTime;
    use std::time::Duration;

    /// A certificate file cut short (a copy interrupted, a paste that lost its end) is named
    /// with the line it lacks, in words, not as a list of byte values.
    #[test]
    fn a_truncated_pem_file_is_named_in_words() {
        let dir = tempfile::tempdir().unwrap();
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let pem = cert.cert.pem();
        let path = dir.path().join("leaf.pem");
        std::fs::write(&path, &pem[..pem.len() / 2]).unwrap();
        let err = read_certs(&path).unwrap_err().to_string();
        assert!(
            err.contains("leaf.pem")
                && err.contains("no \"-----END CERTIFICATE-----\" line (a truncated file?)"),
            "{err}"
        );
    }

    #[test]
    fn expiry_errors_say_utc_dates_not_unix_timestamps() {
        let at = |secs| UnixTime::since_unix_epoch(Duration::from_secs(secs));
        let expired = rustls::Error::InvalidCertificate(rustls::CertificateError::ExpiredContext {
            time: at(1_795_307_138),
            not_after: at(1_792_283_104),
        });
        assert_eq!(
            rustls_reason(&expired),
            "the certificate expired on 2026-10-18 00:25:04 UTC (it is now 2026-11-22 00:25:38 UTC)"
        );
        let early =
            rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidYetContext {
                time: at(1_792_283_104),
                not_before: at(1_795_307_138),
            });
        assert_eq!(
            rustls_reason(&early),
            "the certificate is not valid before 2026-11-22 00:25:38 UTC (it is now 2026-10-18 00:25:04 UTC; is a clock wrong?)"
        );
    }

    /// hyper-rustls wraps tokio-rustls's io::Error in another: rustls's error is still found.
    #[test]
    fn rustls_errors_are_found_inside_io_errors_inside_io_errors() {
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateExpired);
        let inner = std::io::Error::new(std::io::ErrorKind::InvalidData, alert);
        let outer = std::io::Error::other(inner);
        assert!(matches!(
            rustls_error_in(&outer),
            Some(rustls::Error::AlertReceived(
                rustls::AlertDescription::CertificateExpired
            ))
        ));
        assert!(rustls_error_in(&std::io::Error::other("no TLS here")).is_none());
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_said_in_words() {
        let e = identity_error(
            Path::new("tun.crt"),
            Path::new("tun.key"),
            &rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch),
        );
        assert_eq!(
            e.to_string(),
            "the key in tun.key does not belong to the certificate in tun.crt"
        );
    }

    #[test]
    fn an_encrypted_key_is_said_to_be_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.key");
        std::fs::write(
            &path,
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIBvTBXBgkqhkiG9w0BBQ0w\n-----END ENCRYPTED PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = read_key(&path).unwrap_err().to_string();
        assert!(
            e.contains("client.key")
                && e.contains("the key is encrypted")
                && e.contains("openssl pkey"),
            "{e}"
        );
        // OpenSSL's traditional format says so in a header, which the PEM parser trips on.
        std::fs::write(
            &path,
            "-----BEGIN EC PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-256-CBC,00112233445566778899AABBCCDDEEFF\n\nMHcCAQEEIB\n-----END EC PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = read_key(&path).unwrap_err().to_string();
        assert!(e.contains("the key is encrypted"), "{e}");
    }
}
