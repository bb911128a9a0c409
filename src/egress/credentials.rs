//! Proxy credentials: `Proxy-Authorization` checked against the credentials file, the file's
//! reload (SIGHUP), and how an open CONNECT tunnel learns that a reload revoked the credential it
//! was admitted with. A plain request is checked again on each request; a tunnel is checked once
//! when it opens and may then carry an agent's traffic for days, so each reload wakes it.

use std::path::Path;
use std::sync::Arc;

use http::{header, Request};
use tokio::sync::watch;

use super::refusal::Refusal;
use crate::auth::{token_digest, TokensFile, TokensFileError, CREDENTIALS_FILE};

/// The credentials file in force, `None` without one (nothing to check). A reload replaces it
/// and wakes every tunnel that was admitted with a credential.
pub(crate) struct Credentials(watch::Sender<Option<Arc<TokensFile>>>);

/// The credential a request was admitted with: the name for the access log, and what a tunnel
/// needs to check it again after a reload (the secret's digest, never the secret).
pub(crate) struct Admitted {
    /// The name the client authenticated as (`bearer` for a bearer token).
    pub(crate) name: String,
    digest: [u8; 32],
    /// Marked as seen at the credentials the request was checked against: a reload between the
    /// check and the tunnel's start still wakes the tunnel.
    reloads: watch::Receiver<Option<Arc<TokensFile>>>,
}

impl Credentials {
    /// Reads the credentials file at `path`, if there is one.
    pub(crate) fn load(path: Option<&Path>) -> Result<Credentials, TokensFileError> {
        let file = match path {
            Some(path) => Some(Arc::new(TokensFile::load_as(path, CREDENTIALS_FILE)?)),
            None => None,
        };
        Ok(Credentials(watch::Sender::new(file)))
    }

    /// Reads `path` again and puts it in force; says how many credentials it holds. On error the
    /// previous credentials stay, and no tunnel is woken.
    pub(crate) fn reload(&self, path: &Path) -> Result<usize, TokensFileError> {
        let current = self.0.borrow().clone().unwrap_or_default();
        let file = TokensFile::reload_as(path, CREDENTIALS_FILE, &current)?;
        let n = file.len();
        self.0.send_replace(Some(Arc::new(file)));
        Ok(n)
    }

    /// `Proxy-Authorization: Basic name:secret` or `Bearer secret`, checked against the
    /// credentials in force. `None` when there is no credentials file.
    pub(crate) fn check<B>(&self, req: &Request<B>) -> Result<Option<Admitted>, Refusal> {
        let mut reloads = self.0.subscribe();
        let Some(creds) = reloads.borrow_and_update().clone() else {
            return Ok(None);
        };
        let value = req
            .headers()
            .get(header::PROXY_AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Refusal::credentials("proxy credentials required"))?;
        let (name, secret) = parse_authorization(value)?;
        let digest = token_digest(&secret);
        creds
            .authorize_digest(&digest, &name)
            .map_err(|_| Refusal::credentials("invalid proxy credentials"))?;
        Ok(Some(Admitted {
            name,
            digest,
            reloads,
        }))
    }
}

/// The name and secret of a `Proxy-Authorization` value.
fn parse_authorization(value: &str) -> Result<(String, String), Refusal> {
    use crate::auth_header::{basic_user_password, credentials};
    if let Some(basic) = credentials(value, "basic") {
        basic_user_password(basic)
            .ok_or_else(|| Refusal::credentials("malformed Basic credentials"))
    } else if let Some(token) = credentials(value, "bearer") {
        Ok(("bearer".to_owned(), token.to_owned()))
    } else {
        Err(Refusal::credentials(
            "unsupported Proxy-Authorization scheme (Basic or Bearer)",
        ))
    }
}

impl Admitted {
    /// Resolves once a reload puts in force a credentials file that no longer accepts this
    /// credential; pending for as long as every reload still does. Cancel-safe: a reload seen
    /// is marked seen, one not yet seen wakes the next call.
    pub(crate) async fn revoked(&mut self) {
        loop {
            if self.reloads.changed().await.is_err() {
                // The proxy is gone: no reload will come.
                return std::future::pending().await;
            }
            let accepted = match &*self.reloads.borrow_and_update() {
                Some(file) => file.authorize_digest(&self.digest, &self.name).is_ok(),
                None => true,
            };
            if !accepted {
                return;
            }
        }
    }
}

/// [`Admitted::revoked`] of a tunnel's credential; pending forever for a tunnel admitted without
/// one (no credentials file).
pub(crate) async fn revoked(admitted: Option<&mut Admitted>) {
    match admitted {
        Some(admitted) => admitted.revoked().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::hash_token;

    fn file_with(dir: &Path, lines: &[(&str, &str)]) -> std::path::PathBuf {
        let path = dir.join("creds");
        let text: String = lines
            .iter()
            .map(|(name, secret)| format!("{name} {}\n", hash_token(secret)))
            .collect();
        std::fs::write(&path, text).unwrap();
        path
    }

    fn request(user: &str, secret: &str) -> Request<()> {
        use base64::Engine as _;
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}"));
        Request::builder()
            .header(header::PROXY_AUTHORIZATION, format!("Basic {basic}"))
            .body(())
            .unwrap()
    }

    /// A reload that keeps a credential leaves its tunnel alone; one that drops it wakes it, also
    /// when the reload came between the check and the first wait.
    #[tokio::test]
    async fn a_reload_revokes_only_credentials_it_no_longer_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let path = file_with(dir.path(), &[("alice", "a-secret"), ("bob", "b-secret")]);
        let creds = Credentials::load(Some(&path)).unwrap();
        let mut alice = creds.check(&request("alice", "a-secret")).unwrap().unwrap();
        let mut bob = creds.check(&request("bob", "b-secret")).unwrap().unwrap();
        assert_eq!(alice.name, "alice");

        file_with(dir.path(), &[("alice", "a-secret")]);
        assert_eq!(creds.reload(&path).unwrap(), 1);
        let wait = std::time::Duration::from_millis(100);
        tokio::time::timeout(wait, bob.revoked())
            .await
            .expect("bob's credential is revoked");
        assert!(
            tokio::time::timeout(wait, alice.revoked()).await.is_err(),
            "alice's credential is still accepted"
        );
        assert!(creds.check(&request("bob", "b-secret")).is_err());
    }

    #[tokio::test]
    async fn a_failed_reload_revokes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = file_with(dir.path(), &[("alice", "a-secret")]);
        let creds = Credentials::load(Some(&path)).unwrap();
        let mut alice = creds.check(&request("alice", "a-secret")).unwrap().unwrap();
        std::fs::write(&path, "alice not-a-hash\n").unwrap();
        assert!(creds.reload(&path).is_err());
        let wait = std::time::Duration::from_millis(100);
        assert!(tokio::time::timeout(wait, alice.revoked()).await.is_err());
    }
}
