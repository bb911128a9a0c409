//! The tunnel listener's TLS identity, replaced on SIGHUP for the tunnels accepted from then on
//! (a renewed certificate needs no restart), and the checks both TLS listeners' certificates get
//! at start and on every reload.

use std::path::PathBuf;
use std::sync::RwLock;
use std::time::SystemTime;

use crate::config::{GatewayConfig, GatewayTls};
use crate::server::ReloadableTls;
use crate::telemetry::{GatewayMetrics, ListenerLabels};
use crate::tunnel::tls::TlsError;
use crate::tunnel::tls_cert::CertFiles;
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

/// The tunnel listener's TLS configuration and the fingerprint of its certificate.
pub(crate) struct TunnelTls {
    tls: ReloadableTls,
    fingerprint: RwLock<String>,
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
        Ok(Some(TunnelTls {
            tls: ReloadableTls::new(identity.config),
            fingerprint: RwLock::new(identity.fingerprint),
        }))
    }

    /// The acceptor for a tunnel connecting now.
    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        self.tls.acceptor()
    }

    /// `sha256:<hex>` of the certificate in use.
    pub(crate) fn fingerprint(&self) -> String {
        self.fingerprint
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reads the certificate, key and client CA files again; on error the identity in use
    /// stays. A self-signed certificate is never generated here: its files are re-read only
    /// for a client CA file, and a data directory that lost them keeps the identity in use.
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
        check("tunnel", &files(config, &identity), metrics);
        self.tls.replace(identity.config);
        let mut current = self.fingerprint.write().unwrap_or_else(|p| p.into_inner());
        let changed = *current != identity.fingerprint;
        current.clone_from(&identity.fingerprint);
        Ok(TunnelTlsReload::Applied {
            fingerprint: identity.fingerprint,
            changed,
        })
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
