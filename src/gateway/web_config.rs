//! `--web.config.file`: the Prometheus exporter-toolkit format for the gateway's web listener —
//! TLS (`tls_server_config`) and basic authentication (`basic_auth_users`, bcrypt hashes).
//!
//! Prometheus authenticates scrapes to the gateway through its proxy URL
//! (`proxy_url: http://user:password@gateway:8080` → `Proxy-Authorization`), leaving
//! `Authorization` to the target; service discovery and `/metrics` use `Authorization`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::tunnel::tls::{crypto_provider, read_certs, read_key};

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// Basic-auth users, if configured.
    pub users: Option<BasicAuth>,
}

/// Users and their bcrypt hashes; verified results are cached (bcrypt is slow on purpose, and
/// Prometheus sends the same credentials on every scrape).
pub struct BasicAuth {
    users: HashMap<String, String>,
    verified: Mutex<HashMap<[u8; 32], bool>>,
    /// bcrypt runs off the async workers, at most this many at once: a client trying passwords
    /// (each new one a full bcrypt, ~75 ms) must not stall scrapes whose credentials are cached.
    bcrypt_slots: tokio::sync::Semaphore,
}

impl BasicAuth {
    /// Users by name, with their bcrypt hashes.
    pub fn new(users: HashMap<String, String>) -> Self {
        Self {
            users,
            verified: Mutex::new(HashMap::new()),
            bcrypt_slots: tokio::sync::Semaphore::new(2),
        }
    }

    /// Whether `header` (`Basic <base64 user:password>`) names a user with that password.
    pub async fn check(&self, header: Option<&str>) -> bool {
        use base64::Engine as _;
        let Some(encoded) = header.and_then(|h| h.strip_prefix("Basic ")) else {
            return false;
        };
        let Some(decoded) = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()
            .and_then(|d| String::from_utf8(d).ok())
        else {
            return false;
        };
        let Some((user, password)) = decoded.split_once(':') else {
            return false;
        };
        let Some(hash) = self.users.get(user) else {
            return false;
        };
        let key: [u8; 32] = Sha256::digest(decoded.as_bytes()).into();
        if let Some(ok) = self.lock().get(&key) {
            return *ok;
        }
        let Ok(_slot) = self.bcrypt_slots.acquire().await else {
            return false;
        };
        let (password, hash) = (password.to_owned(), hash.clone());
        let ok = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(false);
        let mut cache = self.lock();
        // Bounded: a client trying many passwords does not grow the cache without end.
        if cache.len() >= 1024 {
            cache.clear();
        }
        cache.insert(key, ok);
        ok
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], bool>> {
        self.verified.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Loads and checks `path`; errors name the file and the field.
pub fn load(path: &Path) -> Result<WebConfig, String> {
    let at = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {at}: {e}"))?;
    let file: File = serde_yaml_ng::from_str(&text)
        .map_err(|e| format!("{at}: {}", e.to_string().replace('\n', " ")))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let tls = file
        .tls_server_config
        .map(|t| tls_config(&t, base).map_err(|e| format!("{at}: tls_server_config: {e}")))
        .transpose()?;
    let users = if file.basic_auth_users.is_empty() {
        None
    } else {
        for (user, hash) in &file.basic_auth_users {
            if hash.parse::<bcrypt::HashParts>().is_err() {
                return Err(format!("{at}: basic_auth_users.{user}: not a bcrypt hash (e.g. made with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`)"));
            }
        }
        Some(BasicAuth::new(file.basic_auth_users))
    };
    Ok(WebConfig { tls, users })
}

fn tls_config(t: &TlsServerConfig, base: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    // exporter-toolkit resolves relative paths against the config file's directory.
    let resolve = |p: &Path| {
        if p.is_absolute() {
            p.to_owned()
        } else {
            base.join(p)
        }
    };
    let certs = read_certs(&resolve(&t.cert_file)).map_err(|e| e.to_string())?;
    let key = read_key(&resolve(&t.key_file)).map_err(|e| e.to_string())?;
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
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn basic_auth_checks_bcrypt_hashes_and_caches_results() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let auth = BasicAuth::new(HashMap::from([("prometheus".to_owned(), hash)]));
        use base64::Engine as _;
        let header = |creds: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(creds)
            )
        };
        assert!(auth.check(Some(&header("prometheus:s3cret"))).await);
        assert!(
            auth.check(Some(&header("prometheus:s3cret"))).await,
            "cached"
        );
        assert!(!auth.check(Some(&header("prometheus:wrong"))).await);
        assert!(!auth.check(Some(&header("other:s3cret"))).await);
        assert!(!auth.check(Some("Bearer x")).await);
        assert!(!auth.check(None).await);
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
