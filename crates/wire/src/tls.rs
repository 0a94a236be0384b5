//! TLS for the wire protocol (rustls with the ring provider, as tonic uses for gRPC): the same
//! PEM files configure both ports.
//!
//! - [`server_config`]: the node's side, from a certificate chain, its key and, for mTLS, the
//!   CA bundle that must have signed every client's certificate.
//! - [`client_config`]: a client's side, from the CA bundle that signed the node's certificate
//!   and, for mTLS, the client's own certificate chain and key.
//!
//! Both are pure functions of bytes (no I/O); errors name which file's content is wrong. TLS
//! 1.2 and 1.3 are accepted, with rustls's safe defaults for cipher suites.

use std::sync::Arc;

pub use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
pub use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

/// Why TLS material was refused; `what` names the file (a configuration key or a flag).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct TlsError {
    /// The key or flag naming the file, e.g. `tls.cert_file` or `--tls-ca`.
    pub what: String,
    /// What is wrong with it.
    pub reason: String,
}

fn fail(what: &str, reason: impl std::fmt::Display) -> TlsError {
    TlsError {
        what: what.to_owned(),
        reason: reason.to_string(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate of a PEM bundle; at least one.
fn certificates(what: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| fail(what, format!("not a PEM certificate bundle ({error})")))?;
    if certificates.is_empty() {
        return Err(fail(what, "no PEM certificate in it"));
    }
    Ok(certificates)
}

fn private_key(what: &str, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|error| fail(what, format!("no PEM private key in it ({error})")))
}

fn roots(what: &str, pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for certificate in certificates(what, pem)? {
        roots
            .add(certificate)
            .map_err(|error| fail(what, format!("unusable CA certificate ({error})")))?;
    }
    Ok(roots)
}

/// The node's TLS configuration: its certificate chain and key, and with `client_ca_pem`
/// every client must present a certificate that CA signed (mTLS).
pub fn server_config(
    cert_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: Option<&[u8]>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates("tls.cert_file", cert_pem)?;
    let key = private_key("tls.key_file", key_pem)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| fail("tls", error))?;
    let builder = match client_ca_pem {
        Some(pem) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots("tls.client_ca_file", pem)?),
                provider(),
            )
            .build()
            .map_err(|error| fail("tls.client_ca_file", error))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|error| fail("tls.cert_file/tls.key_file", error))?;
    Ok(Arc::new(config))
}

/// A client's TLS configuration: the CA that signed the node's certificate, and the client's
/// own certificate chain and key for a node that requires mTLS.
pub fn client_config(
    ca_pem: &[u8],
    identity_pem: Option<(&[u8], &[u8])>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| fail("tls", error))?
        .with_root_certificates(roots("--tls-ca", ca_pem)?);
    let config = match identity_pem {
        Some((cert_pem, key_pem)) => builder
            .with_client_auth_cert(
                certificates("--tls-cert", cert_pem)?,
                private_key("--tls-key", key_pem)?,
            )
            .map_err(|error| fail("--tls-cert/--tls-key", error))?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_refused_with_the_file_named() {
        let error = server_config(b"not pem", b"", None).unwrap_err();
        assert_eq!(error.what, "tls.cert_file");
        let error = client_config(b"", None).unwrap_err();
        assert_eq!(error.what, "--tls-ca");
        assert!(error.reason.contains("no PEM certificate"), "{error}");
    }
}
