//! `--web.config.file`: the Prometheus exporter-toolkit format for the gateway's web listener —
//! TLS (`tls_server_config`) and basic authentication (`basic_auth_users`, bcrypt hashes).
//!
//! Prometheus authenticates scrapes to the gateway through its proxy URL
//! (`proxy_url: http://user:password@gateway:8080` → `Proxy-Authorization`), leaving
//! `Authorization` to the target; service discovery and `/metrics` use `Authorization`.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::tunnel::tls::{crypto_provider, identity_error, read_certs, read_key};
use crate::tunnel::tls_cert::{CertFiles, LeafInfo};

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a web configuration: a mapping such as {basic_auth_users: ...}"
)]
struct File {
    #[serde(default)]
    tls_server_config: Option<TlsServerConfig>,
    #[serde(default)]
    basic_auth_users: HashMap<String, String>,
    /// Accepted for compatibility with exporter-toolkit files; ferry sets its own headers.
    #[serde(default)]
    #[allow(dead_code)]
    http_server_config: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "the TLS settings: a mapping such as {cert_file: ..., key_file: ...}")]
struct TlsServerConfig {
    cert_file: PathBuf,
    key_file: PathBuf,
    #[serde(default)]
    client_ca_file: Option<PathBuf>,
    #[serde(default)]
    client_auth_type: Option<String>,
    #[serde(default)]
    min_version: Option<String>,
}

/// The loaded web configuration.
pub struct WebConfig {
    /// TLS for the web listener, if configured.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The certificate and key files of `tls`, for the gateway's checks and expiry metric.
    pub tls_files: Option<CertFiles>,
    /// Basic-auth users, if configured.
    pub users: Option<BasicAuth>,
}

/// The answer to a basic-auth check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A configured user with its password.
    Allowed,
    /// Missing, malformed, an unknown user or a wrong password.
    Denied,
    /// Too many new passwords are being checked at once to check this one now.
    Busy,
}

/// How many refused credentials are remembered; past that the memory of refusals starts over.
const MAX_REFUSED: usize = 1024;

/// How many checks may wait for or hold a bcrypt slot; past that a new password is answered
/// [`Verdict::Busy`] at once instead of queueing behind a client trying passwords.
const MAX_PENDING_BCRYPT: usize = 64;

/// How many of those checks one client address may have at once: a single client trying
/// passwords cannot take every place and lock out a Prometheus whose password is not verified
/// yet (after a restart or a rotation).
const MAX_PENDING_BCRYPT_PER_IP: usize = 4;

/// Users and their bcrypt hashes; results are cached (bcrypt is slow on purpose, and Prometheus
/// sends the same credentials on every scrape).
pub struct BasicAuth {
    users: HashMap<String, String>,
    cache: Mutex<Verified>,
    /// bcrypt runs off the async workers, at most this many at once: a client trying passwords
    /// (each new one a full bcrypt, ~75 ms) must not stall scrapes whose credentials are cached.
    bcrypt_slots: tokio::sync::Semaphore,
    /// Checks waiting for or holding a bcrypt slot, at most [`MAX_PENDING_BCRYPT`].
    pending: tokio::sync::Semaphore,
    /// Those checks per client address, at most [`MAX_PENDING_BCRYPT_PER_IP`] each; an address
    /// is only here while it has one, so this holds at most [`MAX_PENDING_BCRYPT`] entries.
    pending_per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Credentials already checked, as SHA-256 of `user:password`. Successes and refusals are kept
/// apart so that refusals, however many, never evict a success: a client guessing passwords must
/// not send the real Prometheus back to the bcrypt queue it fills.
#[derive(Default)]
struct Verified {
    /// Per user, the credentials last verified for it: at most one entry per configured user.
    allowed: HashMap<String, [u8; 32]>,
    /// Refused credentials, at most [`MAX_REFUSED`].
    refused: HashSet<[u8; 32]>,
}

impl BasicAuth {
    /// Users by name, with their bcrypt hashes.
    pub fn new(users: HashMap<String, String>) -> Self {
        Self {
            users,
            cache: Mutex::new(Verified::default()),
            bcrypt_slots: tokio::sync::Semaphore::new(2),
            pending: tokio::sync::Semaphore::new(MAX_PENDING_BCRYPT),
            pending_per_ip: Mutex::default(),
        }
    }

    /// Whether `header` (`Basic <base64 user:password>`), sent from `client` (unknown when
    /// mounted in another server), names a user with that password; [`Verdict::Busy`] when a
    /// password not seen before cannot be checked now.
    pub async fn check(&self, header: Option<&str>, client: Option<IpAddr>) -> Verdict {
        let Some((user, password)) = header.and_then(basic_credentials) else {
            return Verdict::Denied;
        };
        // An unknown user costs a bcrypt like a wrong password does (against a configured
        // user's hash, whose cost it shares, and refused whatever it says): answering at once
        // would tell a client which user names exist.
        let (known, hash) = match self.users.get(&user) {
            Some(hash) => (true, hash),
            None => match self.users.values().next() {
                Some(hash) => (false, hash),
                None => return Verdict::Denied,
            },
        };
        let key: [u8; 32] = Sha256::digest(format!("{user}:{password}")).into();
        if let Some(verdict) = self.lock().known(&user, &key) {
            return verdict;
        }
        let Some(_per_ip) = PerIp::take(&self.pending_per_ip, client) else {
            return Verdict::Busy;
        };
        let Ok(_pending) = self.pending.try_acquire() else {
            return Verdict::Busy;
        };
        let Ok(_slot) = self.bcrypt_slots.acquire().await else {
            return Verdict::Denied;
        };
        let hash = hash.clone();
        let ok = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(false);
        self.lock().remember(user, key, known && ok)
    }

    /// These users, remembering the passwords `old` verified for users whose hash is the same
    /// here (a reload must not send every client back to bcrypt); a changed or removed user's
    /// password is verified again, and past refusals are forgotten.
    pub fn keeping_verified(self, old: &BasicAuth) -> Self {
        let kept: HashMap<String, [u8; 32]> = old
            .lock()
            .allowed
            .iter()
            .filter(|(user, _)| self.users.get(*user) == old.users.get(*user))
            .map(|(user, key)| (user.clone(), *key))
            .collect();
        self.lock().allowed = kept;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Verified> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Verified {
    /// The cached verdict on `key` for `user`, if there is one.
    fn known(&self, user: &str, key: &[u8; 32]) -> Option<Verdict> {
        if self.allowed.get(user) == Some(key) {
            Some(Verdict::Allowed)
        } else if self.refused.contains(key) {
            Some(Verdict::Denied)
        } else {
            None
        }
    }

    fn remember(&mut self, user: String, key: [u8; 32], ok: bool) -> Verdict {
        if ok {
            self.allowed.insert(user, key);
            return Verdict::Allowed;
        }
        // Bounded: a client trying many passwords does not grow the memory without end.
        if self.refused.len() >= MAX_REFUSED {
            self.refused.clear();
        }
        self.refused.insert(key);
        Verdict::Denied
    }
}

/// A client address's place among the pending bcrypt checks, given back when dropped.
struct PerIp<'a> {
    counts: &'a Mutex<HashMap<IpAddr, usize>>,
    ip: Option<IpAddr>,
}

impl<'a> PerIp<'a> {
    /// A place for `ip`, or `None` when it has [`MAX_PENDING_BCRYPT_PER_IP`] already. Without an
    /// address (a mounted gateway) only the overall limit applies.
    fn take(counts: &'a Mutex<HashMap<IpAddr, usize>>, ip: Option<IpAddr>) -> Option<Self> {
        if let Some(ip) = ip {
            let mut counts = counts.lock().unwrap_or_else(|p| p.into_inner());
            let n = counts.entry(ip).or_default();
            if *n >= MAX_PENDING_BCRYPT_PER_IP {
                return None;
            }
            *n += 1;
        }
        Some(Self { counts, ip })
    }
}

impl Drop for PerIp<'_> {
    fn drop(&mut self) {
        let Some(ip) = self.ip else { return };
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&ip);
            }
        }
    }
}

/// The user and password of a `Basic <base64 user:password>` header, the scheme in any case.
fn basic_credentials(header: &str) -> Option<(String, String)> {
    crate::auth_header::basic_user_password(crate::auth_header::credentials(header, "basic")?)
}

/// Loads and checks `path`; errors name the file and the field.
pub fn load(path: &Path) -> Result<WebConfig, String> {
    load_all(path).map_err(|problems| problems.join("; "))
}

/// [`load`], with every problem of the file, one line each (unless it cannot be parsed at all).
pub fn load_all(path: &Path) -> Result<WebConfig, Vec<String>> {
    let at = path.display();
    let text = crate::fs_util::read_regular_to_string(path)
        .map_err(|e| vec![format!("cannot read {at}: {e}")])?;
    let file: File = serde_yaml_ng::from_str(&text)
        .map_err(|e| vec![format!("{at}: {}", e.to_string().replace('\n', " "))])?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut problems = Vec::new();
    let (tls, tls_files) = match file.tls_server_config {
        Some(t) => match tls_config(&t, base) {
            Ok((config, files)) => (Some(config), Some(files)),
            Err(e) => {
                problems.push(format!("{at}: tls_server_config: {e}"));
                (None, None)
            }
        },
        None => (None, None),
    };
    let mut users: Vec<&String> = file.basic_auth_users.keys().collect();
    users.sort();
    for user in users {
        if file.basic_auth_users[user]
            .parse::<bcrypt::HashParts>()
            .is_err()
        {
            problems.push(format!("{at}: basic_auth_users.{user}: not a bcrypt hash (e.g. made with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`)"));
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let users = (!file.basic_auth_users.is_empty()).then(|| BasicAuth::new(file.basic_auth_users));
    Ok(WebConfig {
        tls,
        tls_files,
        users,
    })
}

fn tls_config(
    t: &TlsServerConfig,
    base: &Path,
) -> Result<(Arc<rustls::ServerConfig>, CertFiles), String> {
    // exporter-toolkit resolves relative paths against the config file's directory.
    let resolve = |p: &Path| {
        if p.is_absolute() {
            p.to_owned()
        } else {
            base.join(p)
        }
    };
    let (cert_file, key_file) = (resolve(&t.cert_file), resolve(&t.key_file));
    let certs = read_certs(&cert_file).map_err(|e| e.to_string())?;
    let key = read_key(&key_file).map_err(|e| e.to_string())?;
    let files = CertFiles {
        leaf: LeafInfo::of(&certs[0]),
        cert: cert_file,
        key: key_file,
        self_signed: false,
    };
    let versions: &[&rustls::SupportedProtocolVersion] = match t.min_version.as_deref() {
        None | Some("TLS12") => rustls::ALL_VERSIONS,
        Some("TLS13") => &[&rustls::version::TLS13],
        Some(other) => {
            return Err(format!(
                "min_version {other:?} is not supported (TLS12 or TLS13)"
            ))
        }
    };
    let builder = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(versions)
        .map_err(|e| e.to_string())?;
    let builder = match (t.client_auth_type.as_deref(), &t.client_ca_file) {
        (None | Some("NoClientCert"), _) => builder.with_no_client_auth(),
        (Some("RequireAndVerifyClientCert"), Some(ca)) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs(&resolve(ca)).map_err(|e| e.to_string())? {
                roots.add(cert).map_err(|e| format!("client_ca_file: {e}"))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), crypto_provider())
                .build()
                .map_err(|e| format!("client_ca_file: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        (Some("RequireAndVerifyClientCert"), None) => return Err("client_auth_type RequireAndVerifyClientCert needs client_ca_file".into()),
        (Some(other), _) => return Err(format!("client_auth_type {other:?} is not supported (NoClientCert or RequireAndVerifyClientCert)")),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| identity_error(&files.cert, &files.key, &e).to_string())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(config), files))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(creds: &str) -> String {
        use base64::Engine as _;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(creds)
        )
    }

    #[tokio::test]
    async fn basic_auth_checks_bcrypt_hashes_and_caches_results() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let auth = BasicAuth::new(HashMap::from([("prometheus".to_owned(), hash)]));
        for (creds, verdict) in [
            ("prometheus:s3cret", Verdict::Allowed),
            ("prometheus:s3cret", Verdict::Allowed),
            ("prometheus:wrong", Verdict::Denied),
            ("prometheus:wrong", Verdict::Denied),
            ("other:s3cret", Verdict::Denied),
        ] {
            assert_eq!(
                auth.check(Some(&header(creds)), None).await,
                verdict,
                "{creds}"
            );
        }
        assert_eq!(auth.check(Some("Bearer x"), None).await, Verdict::Denied);
        assert_eq!(auth.check(None, None).await, Verdict::Denied);
    }

    /// A client guessing passwords fills the memory of refusals and the bcrypt queue: the real
    /// client, once verified, is still answered at once, and a new password is answered busy
    /// rather than queued behind the guesses.
    #[tokio::test]
    async fn guessing_passwords_never_evicts_a_verified_one_nor_queues_without_bound() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let auth = BasicAuth::new(HashMap::from([("prometheus".to_owned(), hash)]));
        let check = |creds: String| {
            let auth = &auth;
            async move { auth.check(Some(&header(&creds)), None).await }
        };
        assert_eq!(check("prometheus:s3cret".into()).await, Verdict::Allowed);
        assert_eq!(check("prometheus:guess".into()).await, Verdict::Denied);
        // The rest of the guesses as their bcrypt would end, without paying for it.
        for i in 0..MAX_REFUSED as u64 + 10 {
            let key: [u8; 32] = Sha256::digest(format!("prometheus:guess{i}")).into();
            auth.lock().remember("prometheus".into(), key, false);
        }
        // Every bcrypt slot busy, every queue place taken: only the cache can answer now.
        let _slots = auth.bcrypt_slots.acquire_many(2).await.unwrap();
        let _queue = auth
            .pending
            .acquire_many(MAX_PENDING_BCRYPT as u32)
            .await
            .unwrap();
        let verified = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            check("prometheus:s3cret".into()),
        );
        assert_eq!(verified.await, Ok(Verdict::Allowed));
        let fresh = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            check("prometheus:one-more-guess".into()),
        );
        assert_eq!(fresh.await, Ok(Verdict::Busy));
    }

    /// One address trying passwords gets at most a few places in the bcrypt queue: another
    /// client's new password is still checked; the address gets its places back as its checks end.
    #[tokio::test]
    async fn one_address_cannot_take_every_place_in_the_bcrypt_queue() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let auth = BasicAuth::new(HashMap::from([("prometheus".to_owned(), hash)]));
        let (guesser, prometheus) = (
            Some(IpAddr::from([10, 0, 0, 66])),
            Some(IpAddr::from([10, 0, 0, 9])),
        );
        // The guesser's checks all wait for the two bcrypt slots, held here.
        let slots = auth.bcrypt_slots.acquire_many(2).await.unwrap();
        let guesses: Vec<_> = (0..MAX_PENDING_BCRYPT_PER_IP)
            .map(|i| {
                let (auth, creds) = (&auth, header(&format!("prometheus:guess{i}")));
                async move { auth.check(Some(&creds), guesser).await }
            })
            .collect();
        let guessing = futures_util::future::join_all(guesses);
        tokio::pin!(guessing);
        // Let every guess take its place and block on a slot.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(100), &mut guessing)
                .await
                .is_err()
        );
        let one_more = header("prometheus:guess-n");
        let past = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            auth.check(Some(&one_more), guesser),
        );
        assert_eq!(past.await, Ok(Verdict::Busy), "past the address's places");
        drop(slots);
        let real = header("prometheus:s3cret");
        let (verdicts, real) = tokio::join!(guessing, auth.check(Some(&real), prometheus));
        assert_eq!(real, Verdict::Allowed, "another address is still checked");
        assert!(
            verdicts.iter().all(|v| *v == Verdict::Denied),
            "{verdicts:?}"
        );
        assert!(auth.pending_per_ip.lock().unwrap().is_empty());
        assert_eq!(
            auth.check(Some(&one_more), guesser).await,
            Verdict::Denied,
            "places given back"
        );
    }

    /// An unknown user is refused only after a bcrypt, as a wrong password is: it takes a place
    /// in the queue (here: none is free, so it is answered busy, not refused at once), and a
    /// configured user's password does not let it in.
    #[tokio::test]
    async fn an_unknown_user_costs_a_bcrypt_like_a_known_one() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let auth = BasicAuth::new(HashMap::from([("prometheus".to_owned(), hash)]));
        assert_eq!(
            auth.check(Some(&header("nobody:s3cret")), None).await,
            Verdict::Denied
        );
        let _queue = auth
            .pending
            .acquire_many(MAX_PENDING_BCRYPT as u32)
            .await
            .unwrap();
        assert_eq!(
            auth.check(Some(&header("nobody:other")), None).await,
            Verdict::Busy
        );
        assert_eq!(
            auth.check(Some(&header("nobody:s3cret")), None).await,
            Verdict::Denied,
            "remembered as refused"
        );
    }

    /// A reload keeps what was verified for an unchanged user (no bcrypt again) and nothing for a
    /// user whose hash changed.
    #[tokio::test]
    async fn a_reload_keeps_only_the_passwords_of_unchanged_users() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let other = bcrypt::hash("other", 4).unwrap();
        let old = BasicAuth::new(HashMap::from([
            ("prometheus".to_owned(), hash.clone()),
            ("admin".to_owned(), other.clone()),
        ]));
        for creds in ["prometheus:s3cret", "admin:other"] {
            assert_eq!(
                old.check(Some(&header(creds)), None).await,
                Verdict::Allowed
            );
        }
        let rotated = bcrypt::hash("other", 4).unwrap();
        let new = BasicAuth::new(HashMap::from([
            ("prometheus".to_owned(), hash),
            ("admin".to_owned(), rotated),
        ]))
        .keeping_verified(&old);
        // Nothing can be checked with bcrypt now: only what was kept can be answered.
        let _queue = new
            .pending
            .acquire_many(MAX_PENDING_BCRYPT as u32)
            .await
            .unwrap();
        assert_eq!(
            new.check(Some(&header("prometheus:s3cret")), None).await,
            Verdict::Allowed
        );
        assert_eq!(
            new.check(Some(&header("admin:other")), None).await,
            Verdict::Busy,
            "a changed hash is checked again"
        );
    }

    #[test]
    fn bad_files_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.yml");
        std::fs::write(&path, "basic_auth_users:\n  prometheus: plaintext\n").unwrap();
        let err = load(&path).err().unwrap();
        assert!(
            err.contains("basic_auth_users.prometheus") && err.contains("bcrypt"),
            "{err}"
        );
        std::fs::write(
            &path,
            "tls_server_config:\n  cert_file: missing.pem\n  key_file: missing.pem\n",
        )
        .unwrap();
        let err = load(&path).err().unwrap();
        assert!(
            err.contains("tls_server_config") && err.contains("missing.pem"),
            "{err}"
        );
        std::fs::write(&path, "basic_auth_user: {}\n").unwrap();
        assert!(load(&path).err().unwrap().contains("unknown field"));
    }
}
