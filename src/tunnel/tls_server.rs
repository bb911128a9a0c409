//! The gateway's TLS identity: certificate and key files, or a self-signed certificate generated
//! on first start, kept in the data directory and reused, identified by its SHA-256 fingerprint.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;

use super::tls::{fingerprint, identity_error, read_certs, read_key, rustls_reason, TlsError};
use super::tls_cert::LeafInfo;

/// File name of the generated certificate inside the data directory.
pub const SELF_SIGNED_CERT: &str = "tunnel-cert.pem";
/// File name of the generated private key inside the data directory.
pub const SELF_SIGNED_KEY: &str = "tunnel-key.pem";

/// The gateway's certificate, ready to accept tunnels.
#[derive(Clone, Debug)]
pub struct ServerIdentity {
    /// rustls configuration: TLS 1.3 only.
    pub config: Arc<rustls::ServerConfig>,
    /// `sha256:<hex>` of the leaf certificate, what agents pin with `--tunnel.fingerprint`.
    pub fingerprint: String,
    /// The leaf's validity and CA flag; `None` if they could not be read.
    pub leaf: Option<LeafInfo>,
}

/// Loads a certificate chain and key from PEM files.
///
/// With `client_ca`, agents must also present a client certificate signed by a CA in that file (mTLS).
pub fn load_identity(
    cert_file: &Path,
    key_file: &Path,
    client_ca: Option<&Path>,
) -> Result<ServerIdentity, TlsError> {
    let certs = read_certs(cert_file)?;
    let key = read_key(key_file)?;
    let client_verifier = client_ca.map(client_verifier).transpose()?;
    build(certs, key, client_verifier).map_err(|e| identity_error(cert_file, key_file, &e))
}

/// Loads the self-signed identity from `data_dir`, generating and storing it on first start.
pub fn self_signed_identity(
    data_dir: &Path,
    names: &[String],
    client_ca: Option<&Path>,
) -> Result<ServerIdentity, TlsError> {
    let cert_file = data_dir.join(SELF_SIGNED_CERT);
    let key_file = data_dir.join(SELF_SIGNED_KEY);
    let error = |reason| TlsError::SelfSigned {
        dir: data_dir.to_owned(),
        reason,
    };
    finish_interrupted(data_dir).map_err(error)?;
    if let Some(reason) = lone_half(data_dir) {
        return Err(error(reason));
    }
    let generated = !cert_file.exists();
    if generated {
        generate(data_dir, &cert_file, &key_file, names).map_err(error)?;
    }
    let identity = load_identity(&cert_file, &key_file, client_ca)?;
    if generated {
        // A warning, not info: on any start but the first, this means the data directory was
        // lost, and every agent pinning the old certificate is now refused.
        tracing::warn!(
            fingerprint = %identity.fingerprint,
            certificate = %cert_file.display(),
            "generated a new self-signed tunnel certificate: agents pinning another fingerprint \
             (--tunnel.fingerprint) refuse it until they are given this one"
        );
    }
    warn_unlisted_names(&cert_file, names);
    Ok(identity)
}

/// Suffix of the files a generation writes before renaming them into place.
const PARTIAL: &str = ".partial";

/// Completes a generation that stopped between its two renames: the key is in place, the
/// certificate written in full (synced before either rename) but not renamed yet.
fn finish_interrupted(data_dir: &Path) -> Result<(), String> {
    let cert = data_dir.join(SELF_SIGNED_CERT);
    let partial = data_dir.join(format!("{SELF_SIGNED_CERT}{PARTIAL}"));
    if cert.exists() || !partial.exists() || !data_dir.join(SELF_SIGNED_KEY).exists() {
        return Ok(());
    }
    std::fs::rename(&partial, &cert)
        .map_err(|e| format!("cannot rename {} into place: {e}", partial.display()))
}

/// Why `data_dir` holds only one of the certificate and its key, if it does. Generating anew
/// would overwrite the half that is left and change the fingerprint every agent pins: a restored
/// backup or a mistaken delete must not silently do that.
pub fn lone_half(data_dir: &Path) -> Option<String> {
    let cert = data_dir.join(SELF_SIGNED_CERT).exists();
    let key = data_dir.join(SELF_SIGNED_KEY).exists();
    if cert == key {
        return None;
    }
    let (there, missing) = if cert {
        (SELF_SIGNED_CERT, SELF_SIGNED_KEY)
    } else {
        (SELF_SIGNED_KEY, SELF_SIGNED_CERT)
    };
    Some(format!(
        "{there} is there but {missing} is missing; restore it, or remove {there} too to \
         generate a new certificate (agents pinned to the old fingerprint will refuse it)"
    ))
}

/// The names are only used when the certificate is generated: say so when a kept certificate
/// does not cover names asked for later, rather than let agents fail on the name.
fn warn_unlisted_names(cert_file: &Path, names: &[String]) {
    for name in unlisted_names(cert_file, names) {
        tracing::warn!(
            name = %name,
            certificate = %cert_file.display(),
            "the kept self-signed certificate is not valid for this name (names apply when it \
             is generated): remove both files in the data directory to generate one for the \
             names now configured"
        );
    }
}

/// The names of `names` (as the configuration writes them: lowercase, no trailing dot) that the
/// certificate in `cert_file` is not valid for. A wildcard `*.example.com` counts as covered
/// when a name it stands for is, as agents check a name, not a pattern.
fn unlisted_names<'a>(cert_file: &Path, names: &'a [String]) -> Vec<&'a String> {
    let Some(cert) = read_certs(cert_file)
        .ok()
        .and_then(|c| c.into_iter().next())
    else {
        return Vec::new();
    };
    let Ok(parsed) = webpki::EndEntityCert::try_from(&cert) else {
        return Vec::new();
    };
    let covers = |name: &str| {
        let reference = match name.strip_prefix("*.") {
            Some(rest) => format!("ferry-wildcard-check.{rest}"),
            None => name.to_owned(),
        };
        rustls::pki_types::ServerName::try_from(reference.as_str())
            .is_ok_and(|n| parsed.verify_is_valid_for_subject_name(&n).is_ok())
    };
    names.iter().filter(|name| !covers(name)).collect()
}

/// Generates the self-signed identity in `data_dir` unless one is there, without the warning of
/// [`self_signed_identity`]: for `ferry quickstart`, whose fresh directory always needs one and
/// which prints the fingerprint itself.
#[cfg(feature = "cli")]
pub(crate) fn ensure_self_signed(data_dir: &Path, names: &[String]) -> Result<(), String> {
    let (cert_file, key_file) = (
        data_dir.join(SELF_SIGNED_CERT),
        data_dir.join(SELF_SIGNED_KEY),
    );
    if cert_file.exists() || key_file.exists() {
        return Ok(());
    }
    generate(data_dir, &cert_file, &key_file, names)
}

fn generate(dir: &Path, cert_file: &Path, key_file: &Path, names: &[String]) -> Result<(), String> {
    if dir.exists() && !dir.is_dir() {
        return Err("it exists and is not a directory".into());
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create directory: {e}"))?;
    let mut names = names.to_vec();
    if names.is_empty() {
        names.push("ferry-gateway".into());
    }
    // rcgen's defaults but for the subject, which `openssl s_client` and browsers show: rcgen
    // names it "rcgen self signed cert". Valid until 4096: agents pin its fingerprint, and a
    // renewal would be a new one to hand out.
    let mut params = rcgen::CertificateParams::new(names).map_err(|e| e.to_string())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ferry gateway (self-signed)");
    let signing_key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params
        .self_signed(&signing_key)
        .map_err(|e| e.to_string())?;
    let generated = rcgen::CertifiedKey { cert, signing_key };
    // Both written and synced under temporary names, then renamed, the certificate last: a
    // start interrupted anywhere leaves either nothing, or a key with its complete certificate
    // still to be renamed (`finish_interrupted`), never a half that would need a new identity.
    let partial = |file: &Path| {
        let mut name = file.as_os_str().to_owned();
        name.push(PARTIAL);
        std::path::PathBuf::from(name)
    };
    let (key_partial, cert_partial) = (partial(key_file), partial(cert_file));
    // Left by a start interrupted before its first rename (or planted): removed, not followed.
    for stale in [&key_partial, &cert_partial] {
        let _ = std::fs::remove_file(stale);
    }
    write_synced(
        &key_partial,
        generated.signing_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_synced(&cert_partial, generated.cert.pem().as_bytes(), 0o644).inspect_err(|_| {
        let _ = std::fs::remove_file(&key_partial);
    })?;
    for (from, to) in [(&key_partial, key_file), (&cert_partial, cert_file)] {
        std::fs::rename(from, to).map_err(|e| format!("cannot rename {}: {e}", from.display()))?;
    }
    // The renames themselves are durable once the directory is synced.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("cannot sync the directory: {e}"))
}

/// Writes `bytes` to a new file created with `mode` (less the umask), synced to disk. Anything
/// already in its place (a link someone planted) is refused rather than written through; the
/// renames that follow replace a link at the final name instead of following it.
pub(crate) fn write_synced(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let error = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(error)?;
    if let Err(e) = f.write_all(bytes).and_then(|()| f.sync_all()) {
        // Out of space, say: an empty or partial file left behind would only mislead.
        drop(f);
        let _ = std::fs::remove_file(path);
        return Err(error(e));
    }
    Ok(())
}

/// Why the client CA file `ca_file` will let no agent in though it loads, if it holds no CA
/// certificate: rustls takes any certificate as a trust anchor, so an agent's own certificate
/// put there by mistake is accepted, and then verifies no other. `None` when it cannot be read
/// (loading it says so).
pub fn client_ca_problem(ca_file: &Path) -> Option<String> {
    let certs = read_certs(ca_file).ok()?;
    let no_ca = !certs
        .iter()
        .any(|c| LeafInfo::of(c).is_none_or(|info| info.is_ca));
    no_ca.then(|| {
        format!(
            "client CA file {} holds no CA certificate (CA:TRUE): only client certificates issued by the key of one in it verify; is it an agent's certificate instead of the CA that issued them?",
            ca_file.display()
        )
    })
}

/// Verifies agents' client certificates against the CAs in `ca_file`.
pub fn client_verifier(ca_file: &Path) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(ca_file)? {
        roots.add(cert).map_err(|e| TlsError::Cert {
            path: ca_file.to_owned(),
            reason: format!("not a usable CA certificate: {}", rustls_reason(&e)),
        })?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), super::tls::crypto_provider())
        .build()
        .map_err(|e| TlsError::Cert {
            path: ca_file.to_owned(),
            reason: format!("no usable client CA: {e}"),
        })
}

fn build(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_verifier: Option<Arc<dyn ClientCertVerifier>>,
) -> Result<ServerIdentity, rustls::Error> {
    let fingerprint = fingerprint(&certs[0]);
    let leaf = LeafInfo::of(&certs[0]);
    let builder = rustls::ServerConfig::builder_with_provider(super::tls::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match client_verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(ServerIdentity {
        config: Arc::new(config),
        fingerprint,
        leaf,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_certificate_or_key_is_an_error_and_is_not_overwritten() {
        for keep in [SELF_SIGNED_CERT, SELF_SIGNED_KEY] {
            let dir = tempfile::tempdir().unwrap();
            self_signed_identity(dir.path(), &[], None).unwrap();
            let gone = if keep == SELF_SIGNED_CERT {
                SELF_SIGNED_KEY
            } else {
                SELF_SIGNED_CERT
            };
            let kept = std::fs::read(dir.path().join(keep)).unwrap();
            std::fs::remove_file(dir.path().join(gone)).unwrap();
            let err = self_signed_identity(dir.path(), &[], None)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("{keep} is there but {gone} is missing")),
                "{err}"
            );
            assert_eq!(std::fs::read(dir.path().join(keep)).unwrap(), kept);
            assert!(!dir.path().join(gone).exists());
        }
    }

    #[test]
    fn self_signed_identity_is_generated_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = self_signed_identity(dir.path(), &["gw.test".into()], None).unwrap();
        let again = self_signed_identity(dir.path(), &["gw.test".into()], None).unwrap();
        assert_eq!(first.fingerprint, again.fingerprint);
        assert!(first.fingerprint.starts_with("sha256:") && first.fingerprint.len() == 71);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(SELF_SIGNED_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Named as ferry's, as `openssl s_client` shows it.
        let certs = read_certs(&dir.path().join(SELF_SIGNED_CERT)).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&certs[0]).unwrap();
        assert_eq!(cert.subject().to_string(), "CN=ferry gateway (self-signed)");
    }

    /// The configured names (checked and lowercased by the configuration) are all covered by
    /// the certificate generated from them: no "not valid for this name" warning on any start.
    #[test]
    fn a_generated_certificate_covers_every_name_it_was_made_for() {
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<String> = [
            "gw.example.com",
            "gw2.example.com",
            "*.example.org",
            "127.0.0.1",
            "::1",
        ]
        .map(String::from)
        .into();
        self_signed_identity(dir.path(), &names, None).unwrap();
        let cert = dir.path().join(SELF_SIGNED_CERT);
        assert!(unlisted_names(&cert, &names).is_empty());
        let later = ["gw.example.com".to_owned(), "other.example.com".to_owned()];
        assert_eq!(unlisted_names(&cert, &later), [&later[1]]);
    }

    #[test]
    fn links_planted_where_the_key_and_certificate_go_are_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let (key_target, cert_target) = (dir.path().join("k"), dir.path().join("c"));
        std::os::unix::fs::symlink(&key_target, data.join(SELF_SIGNED_KEY)).unwrap();
        std::os::unix::fs::symlink(&cert_target, data.join(SELF_SIGNED_CERT)).unwrap();
        self_signed_identity(&data, &[], None).unwrap();
        assert!(!key_target.exists() && !cert_target.exists());
        for file in [SELF_SIGNED_KEY, SELF_SIGNED_CERT] {
            let meta = std::fs::symlink_metadata(data.join(file)).unwrap();
            assert!(meta.file_type().is_file(), "{file} is a file of its own");
        }
        // Links planted under the temporary names are not written through either.
        let (data, target) = (dir.path().join("data2"), dir.path().join("t"));
        std::fs::create_dir(&data).unwrap();
        std::os::unix::fs::symlink(&target, data.join(format!("{SELF_SIGNED_KEY}{PARTIAL}")))
            .unwrap();
        self_signed_identity(&data, &[], None).unwrap();
        assert!(!target.exists());
    }

    /// Generation leaves no temporary file behind; one interrupted between its renames (the
    /// key in place, the complete certificate not yet) is finished, not refused as a lone half.
    #[test]
    fn generation_renames_complete_files_and_an_interrupted_one_is_finished() {
        let dir = tempfile::tempdir().unwrap();
        let first = self_signed_identity(dir.path(), &[], None).unwrap();
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [SELF_SIGNED_CERT, SELF_SIGNED_KEY]);
        let partial = dir.path().join(format!("{SELF_SIGNED_CERT}{PARTIAL}"));
        std::fs::rename(dir.path().join(SELF_SIGNED_CERT), &partial).unwrap();
        let again = self_signed_identity(dir.path(), &[], None).unwrap();
        assert_eq!(again.fingerprint, first.fingerprint);
        assert!(!partial.exists());
    }

    #[test]
    fn a_key_that_does_not_belong_to_the_certificate_names_both_files() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        self_signed_identity(a.path(), &[], None).unwrap();
        self_signed_identity(b.path(), &[], None).unwrap();
        let cert = a.path().join(SELF_SIGNED_CERT);
        let key = b.path().join(SELF_SIGNED_KEY);
        let err = load_identity(&cert, &key, None).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "the key in {} does not belong to the certificate in {}",
                key.display(),
                cert.display()
            )
        );
    }

    #[test]
    fn unreadable_or_empty_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let err = load_identity(&empty, &empty, None).unwrap_err().to_string();
        assert!(err.contains("empty.pem") && err.contains("no PEM"), "{err}");
        let err = load_identity(&dir.path().join("missing.pem"), &empty, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.pem"), "{err}");
    }
}
