//! The tunnel listener's TLS identity, replaced on SIGHUP for the tunnels accepted from then on
//! (a renewed certificate needs no restart), and the checks both TLS listeners' certificates get
//! at start and on every reload: a reload does not put a certificate clients refuse for its dates
//! in place of one they accept.

use std::path::PathBuf;
use std::sync::RwLock;
use std::time::SystemTime;

use crate::config::{GatewayConfig, GatewayTls};
use crate::server::ReloadableTls;
use crate::telemetry::{GatewayMetrics, ListenerLabels};
use crate::tunnel::tls::TlsError;
use crate::tunnel::tls_cert::{CertFiles, LeafInfo};
use crate::tunnel::tls_server::{
    load_identity, self_signed_identity, ServerIdentity, SELF_SIGNED_CERT, SELF_SIGNED_KEY,
};

/// What a reload of the tunnel's TLS files did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TunnelTlsReload {
    /// Nothing to re-read: no TLS, or a self-signed certificate without a client CA file.
    Nothing,
    /// The files were read again; tunnels accepted from now on use them.
    Applied {
        /// `sha256:<hex>` of the certificate now in use.
        fingerprint: String,
        /// Whether that is another certificate than before.
        changed: bool,
    },
}

/// The tunnel listener's TLS configuration and what its certificate is.
pub(crate) struct TunnelTls {
    tls: ReloadableTls,
    in_use: RwLock<InUse>,
}

/// The certificate in use.
struct InUse {
    fingerprint: String,
    leaf: Option<LeafInfo>,
}

impl TunnelTls {
    /// Loads the identity `config` names (generating the self-signed one on first start);
    /// `None` without TLS.
    pub(crate) fn load(
        config: &GatewayConfig,
        metrics: &GatewayMetrics,
    ) -> Result<Option<TunnelTls>, TlsError> {
        let client_ca = config.client_ca_file.as_deref();
        let identity = match &config.tls {
            GatewayTls::Files { cert, key } => load_identity(cert, key, client_ca)?,
            GatewayTls::SelfSigned { data_dir, names } => {
                self_signed_identity(data_dir, names, client_ca)?
            }
            GatewayTls::InsecurePlaintext => return Ok(None),
        };
        check("tunnel", &files(config, &identity), metrics);
        warn_about_client_ca(client_ca);
        Ok(Some(TunnelTls {
            tls: ReloadableTls::new(identity.config),
            in_use: RwLock::new(InUse {
                fingerprint: identity.fingerprint,
                leaf: identity.leaf,
            }),
        }))
    }

    /// The acceptor for a tunnel connecting now.
    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        self.tls.acceptor()
    }

    /// `sha256:<hex>` of the certificate in use.
    pub(crate) fn fingerprint(&self) -> String {
        self.in_use
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .fingerprint
            .clone()
    }

    /// Reads the certificate, key and client CA files again; on error the identity in use
    /// stays, as it does when the new certificate is not valid now and the one in use is. A
    /// self-signed certificate is never generated here: its files are re-read only for a client
    /// CA file, and a data directory that lost them keeps the identity in use.
    pub(crate) fn reload(
        &self,
        config: &GatewayConfig,
        metrics: &GatewayMetrics,
    ) -> Result<TunnelTlsReload, TlsError> {
        let client_ca = config.client_ca_file.as_deref();
        let (cert, key) = match &config.tls {
            GatewayTls::Files { cert, key } => (cert.clone(), key.clone()),
            GatewayTls::SelfSigned { data_dir, .. } if client_ca.is_some() => (
                data_dir.join(SELF_SIGNED_CERT),
                data_dir.join(SELF_SIGNED_KEY),
            ),
            _ => return Ok(TunnelTlsReload::Nothing),
        };
        let identity = load_identity(&cert, &key, client_ca)?;
        let files = files(config, &identity);
        // Held from the check to the swap: two reloads at once cannot both pass the check
        // against the same certificate in use.
        let mut current = self.in_use.write().unwrap_or_else(|p| p.into_inner());
        refuse_invalid_dates(&files, current.leaf, SystemTime::now())
            .map_err(|reason| TlsError::Cert { path: cert, reason })?;
        check("tunnel", &files, metrics);
        warn_about_client_ca(client_ca);
        self.tls.replace(identity.config);
        let changed = current.fingerprint != identity.fingerprint;
        current.fingerprint.clone_from(&identity.fingerprint);
        current.leaf = identity.leaf;
        Ok(TunnelTlsReload::Applied {
            fingerprint: identity.fingerprint,
            changed,
        })
    }
}

fn warn_about_client_ca(client_ca: Option<&std::path::Path>) {
    if let Some(problem) = client_ca.and_then(crate::tunnel::tls_server::client_ca_problem) {
        tracing::warn!("{problem}");
    }
}

/// The files `identity` was loaded from.
fn files(config: &GatewayConfig, identity: &ServerIdentity) -> CertFiles {
    let (cert, key) = match &config.tls {
        GatewayTls::Files { cert, key } => (cert.clone(), key.clone()),
        GatewayTls::SelfSigned { data_dir, .. } => (
            data_dir.join(SELF_SIGNED_CERT),
            data_dir.join(SELF_SIGNED_KEY),
        ),
        GatewayTls::InsecurePlaintext => (PathBuf::new(), PathBuf::new()),
    };
    CertFiles {
        cert,
        key,
        leaf: identity.leaf,
        self_signed: matches!(config.tls, GatewayTls::SelfSigned { .. }),
    }
}

/// Why a reload must not put `new` in place of the certificate in use (`in_use`), if it must
/// not: `new` is not valid at `now` while the one in use is, so every client that checks dates
/// would refuse the listener from then on. At start there is nothing to keep: such a
/// certificate is warned about ([`check`]); so is it on reload when the one in use is no
/// better (unknown dates, or not valid either).
pub(crate) fn refuse_invalid_dates(
    new: &CertFiles,
    in_use: Option<LeafInfo>,
    now: SystemTime,
) -> Result<(), String> {
    let Some(problem) = new.leaf.and_then(|leaf| leaf.date_problem(now)) else {
        return Ok(());
    };
    match in_use {
        Some(leaf) if leaf.date_problem(now).is_none() => Err(format!(
            "{problem}, while the certificate in use is valid until {}: clients would refuse it, so it is not loaded",
            crate::tunnel::tls::utc(u64::try_from(leaf.not_after).unwrap_or(0))
        )),
        _ => Ok(()),
    }
}

/// Warns about a certificate no client accepts and a key anyone can read, and records when the
/// certificate expires: loaded without complaint, such files fail only in every handshake.
pub(crate) fn check(listener: &str, files: &CertFiles, metrics: &GatewayMetrics) {
    for warning in files.warnings(listener, SystemTime::now()) {
        tracing::warn!(listener, "{warning}");
    }
    let labels = ListenerLabels {
        listener: listener.to_owned(),
    };
    match files.leaf {
        Some(leaf) => {
            metrics
                .tls_not_after
                .get_or_create(&labels)
                .set(leaf.not_after);
        }
        None => {
            metrics.tls_not_after.remove(&labels);
        }
    }
}
