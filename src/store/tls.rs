//! TLS to PostgreSQL with libpq's `sslmode` semantics (CONTRACT §9), on rustls.
//!
//! tokio-postgres itself knows only `disable`, `prefer` and `require`, and
//! verifies nothing; libpq users expect more:
//!
//! | sslmode       | TLS                  | certificate checked against `sslrootcert` | host name checked |
//! |---------------|----------------------|-------------------------------------------|-------------------|
//! | `disable`     | never                | –                                         | –                 |
//! | `prefer` (default) | if the server offers it | no                               | no                |
//! | `require`     | always               | only when a root certificate is configured (as libpq) | no     |
//! | `verify-ca`   | always               | yes                                       | no                |
//! | `verify-full` | always               | yes                                       | yes               |
//!
//! `sslrootcert` is a PEM file, or `system` for the machine's trust store; as in
//! libpq, it defaults to `~/.postgresql/root.crt` when that file exists.

pub use crate::config::{RootCert, SslMode, TlsSettings};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("sslmode=verify-ca and verify-full need sslrootcert (a PEM file, or \"system\"); none is set and ~/.postgresql/root.crt does not exist")]
    NoRootCert,
    #[error("sslrootcert {}: {source}", path.display())]
    RootCertFile {
        path: std::path::PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("sslrootcert: no usable certificate in {0:?}")]
    NoCertificate(RootCert),
    #[error("sslrootcert: {0}")]
    Verifier(#[from] rustls::client::VerifierBuilderError),
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Builds the rustls configuration for `settings`; `None` for `disable`.
pub fn client_config(settings: &TlsSettings) -> Result<Option<ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let verify_chain = match settings.mode {
        SslMode::Disable => return Ok(None),
        SslMode::Prefer => false,
        // libpq: with a root certificate, `require` verifies like `verify-ca`.
        SslMode::Require => settings.root_cert != RootCert::None,
        SslMode::VerifyCa | SslMode::VerifyFull => true,
    };
    let config = if !verify_chain {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
            .with_no_client_auth()
    } else {
        let roots = Arc::new(roots(&settings.root_cert)?);
        let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider).build()?;
        if settings.mode == SslMode::VerifyFull {
            builder.with_webpki_verifier(webpki).with_no_client_auth()
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
                .with_no_client_auth()
        }
    };
    Ok(Some(config))
}

fn roots(root: &RootCert) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    match root {
        RootCert::None => return Err(TlsError::NoRootCert),
        RootCert::System => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = store.add(cert);
            }
        }
        RootCert::File(path) => {
            let file_error = |source| TlsError::RootCertFile {
                path: path.clone(),
                source,
            };
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|i| i.collect())
                .map_err(file_error)?;
            for cert in certs {
                store.add(cert)?;
            }
        }
    }
    if store.is_empty() {
        return Err(TlsError::NoCertificate(root.clone()));
    }
    Ok(store)
}

/// `prefer` and `require` without a root certificate: encrypted, with the
/// handshake's signatures checked, but whoever the server is (libpq's behaviour).
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
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
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
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
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the name in the
/// certificate is not compared with the host connected to.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifying_modes_need_a_root_certificate() {
        let none = |mode| TlsSettings {
            mode,
            root_cert: RootCert::None,
        };
        assert!(client_config(&none(SslMode::Disable)).unwrap().is_none());
        assert!(client_config(&none(SslMode::Prefer)).unwrap().is_some());
        assert!(client_config(&none(SslMode::Require)).unwrap().is_some());
        let e = client_config(&none(SslMode::VerifyFull)).unwrap_err();
        assert!(e.to_string().contains("sslrootcert"), "{e}");
        let missing = TlsSettings {
            mode: SslMode::VerifyCa,
            root_cert: RootCert::File("/nonexistent/root.crt".into()),
        };
        assert!(client_config(&missing)
            .unwrap_err()
            .to_string()
            .contains("/nonexistent/root.crt"));
    }
}
