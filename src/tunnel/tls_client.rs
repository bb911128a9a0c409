//! Client-side TLS: how the agent verifies the gateway (system roots, a CA file, or a pinned
//! certificate fingerprint) and how it talks TLS to its own https targets.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

use super::tls::{crypto_provider, identity_error, read_certs, read_key, rustls_reason, TlsError};

/// How a TLS client decides to trust the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerVerify {
    /// The operating system's trust store.
    SystemRoots,
    /// Only CAs from this PEM file.
    CaFile(PathBuf),
    /// Exactly the certificates with these SHA-256 digests, any of them (for the gateway's
    /// self-signed certificate; several while a gateway's certificate is being replaced).
    Fingerprints(Vec<[u8; 32]>),
    /// No verification at all. Only for targets, only when asked for by name.
    InsecureSkipVerify,
}

/// Everything needed to build a client TLS configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    /// How to trust the server.
    pub verify: ServerVerify,
    /// Certificate and key files to present (mTLS).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// Which protocol versions and ALPN a client configuration is for.
#[derive(Debug, Clone, Copy)]
pub enum Purpose {
    /// The tunnel: TLS 1.3 only, ALPN `http/1.1` (the upgrade request).
    Tunnel,
    /// An https target: TLS 1.2 or 1.3, ALPN `http/1.1`.
    Target,
}

/// Builds a rustls client configuration for `tls`.
pub fn client_config(tls: &ClientTls, purpose: Purpose) -> Result<rustls::ClientConfig, TlsError> {
    let provider = crypto_provider();
    let versions: &[&rustls::SupportedProtocolVersion] = match purpose {
        Purpose::Tunnel => &[&rustls::version::TLS13],
        Purpose::Target => rustls::ALL_VERSIONS,
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| config_error(e.to_string()))?;
    let verifier = verifier(&tls.verify, provider)?;
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match &tls.client_cert {
        Some((cert, key)) => builder
            .with_client_auth_cert(read_certs(cert)?, read_key(key)?)
            .map_err(|e| identity_error(cert, key, &e))?,
        None => builder.with_no_client_auth(),
    };
    // The tunnel's first request is HTTP/1.1 (the upgrade). For targets, hyper-rustls sets ALPN
    // itself from the protocols enabled on the connector (and refuses a preset one).
    if let Purpose::Tunnel = purpose {
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
    }
    Ok(config)
}

fn config_error(reason: String) -> TlsError {
    TlsError::Config(reason)
}

fn verifier(
    verify: &ServerVerify,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn ServerCertVerifier>, TlsError> {
    let roots = match verify {
        ServerVerify::Fingerprints(digests) => {
            return Ok(Arc::new(PinnedVerifier {
                digests: digests.clone(),
                provider,
            }))
        }
        ServerVerify::InsecureSkipVerify => {
            return Ok(Arc::new(
                PinnedVerifier {
                    digests: Vec::new(),
                    provider,
                }
                .accept_any(),
            ))
        }
        ServerVerify::SystemRoots => system_roots(),
        ServerVerify::CaFile(path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(path)? {
                roots.add(cert).map_err(|e| TlsError::Cert {
                    path: path.clone(),
                    reason: format!("not a usable CA certificate: {}", rustls_reason(&e)),
                })?;
            }
            roots
        }
    };
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map(|v| Arc::new(ChainHint(v)) as Arc<dyn ServerCertVerifier>)
        .map_err(|e| config_error(format!("no usable trust anchors: {e}")))
}

/// Why a server's certificate was refused when the server sent it alone, although a CA other
/// than itself issued it, and no trusted CA did: the server's certificate file most likely
/// lacks the intermediate CA certificates (the chain) that lead to a trusted one.
#[derive(Debug, thiserror::Error)]
#[error("the certificate's issuer is not trusted, and the server sent no intermediate certificate: its certificate file may lack the chain")]
pub struct NoIntermediate;

/// Whether `e` is the refusal of a certificate sent without its chain ([`NoIntermediate`]).
pub fn sent_no_chain(e: &rustls::Error) -> bool {
    matches!(e, rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))
        if other.0.downcast_ref::<NoIntermediate>().is_some())
}

/// webpki's verification, with an unknown issuer told apart when the server sent no chain.
#[derive(Debug)]
struct ChainHint(Arc<WebPkiServerVerifier>);

impl ChainHint {
    /// Whether `cert` says another certificate issued it; `true` if it cannot be parsed.
    fn issued_by_another(cert: &CertificateDer<'_>) -> bool {
        webpki::EndEntityCert::try_from(cert).map_or(true, |c| c.issuer() != c.subject())
    }
}

impl ServerCertVerifier for ChainHint {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::CertificateError as C;
        self.0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            .map_err(|e| match e {
                rustls::Error::InvalidCertificate(C::UnknownIssuer)
                    if intermediates.is_empty() && Self::issued_by_another(end_entity) =>
                {
                    rustls::Error::InvalidCertificate(C::Other(rustls::OtherError(Arc::new(
                        NoIntermediate,
                    ))))
                }
                e => e,
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.0.requires_raw_public_keys()
    }

    fn root_hint_subjects(&self) -> Option<&[rustls::DistinguishedName]> {
        self.0.root_hint_subjects()
    }
}

fn system_roots() -> RootCertStore {
    let found = rustls_native_certs::load_native_certs();
    for err in &found.errors {
        tracing::warn!(error = %err, "could not load some system CA certificates");
    }
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    tracing::debug!(added, ignored, "loaded system CA certificates");
    roots
}

/// Trusts exactly the certificates named by their SHA-256 digests; still checks the handshake
/// signatures, so the peer must hold the matching private key.
#[derive(Debug)]
struct PinnedVerifier {
    digests: Vec<[u8; 32]>,
    provider: Arc<CryptoProvider>,
}

impl PinnedVerifier {
    fn accept_any(self) -> AnyCertVerifier {
        AnyCertVerifier(self)
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if self.digests.contains(&got) {
            return Ok(ServerCertVerified::assertion());
        }
        let expected: Vec<String> = self
            .digests
            .iter()
            .map(|d| format!("sha256:{}", hex::encode(d)))
            .collect();
        Err(rustls::Error::General(format!(
            "server certificate fingerprint is sha256:{}, expected {}",
            hex::encode(got),
            expected.join(" or ")
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Accepts any certificate (targets with `insecure_skip_verify`), still checking signatures.
#[derive(Debug)]
struct AnyCertVerifier(PinnedVerifier);

impl ServerCertVerifier for AnyCertVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
