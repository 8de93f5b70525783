//! TLS for the HTTP server (rustls): server certificate, client certificate verification,
//! and the verified client certificate handed to each request of a connection.

use std::any::Any;
use std::path::Path;
use std::sync::Arc;

use actix_tls::accept::rustls_0_23::TlsStream;
use actix_web::dev::Extensions;
use actix_web::rt::net::TcpStream;
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{ClientAuth, TlsConfig};
use crate::policy::ClientCertificate;

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("TLS: cannot read {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("TLS: {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("TLS: no certificate in {}", path.display()));
    }
    Ok(certs)
}

/// The rustls server configuration for `config`.
pub fn server_config(config: &TlsConfig) -> Result<rustls::ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certs(&config.cert)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&config.key)
            .map_err(|e| format!("TLS: cannot read {}: {e}", config.key.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(format!(
                "TLS: {} has mode {:o}; the private key must deny group and other (chmod 600)",
                config.key.display(),
                mode & 0o777
            ));
        }
    }
    // The key file's content never reaches an error message.
    let key = PrivateKeyDer::from_pem_file(&config.key)
        .map_err(|_| format!("TLS: no usable private key in {}", config.key.display()))?;
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match (config.client_auth, &config.client_ca) {
        (ClientAuth::Off, _) => builder.with_no_client_auth(),
        (mode, Some(ca)) => {
            let mut roots = RootCertStore::empty();
            for cert in certs(ca)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("TLS: client CA {}: {e}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = match mode {
                ClientAuth::Optional => verifier.allow_unauthenticated(),
                _ => verifier,
            }
            .build()
            .map_err(|e| format!("TLS: client verifier: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        (_, None) => return Err("TLS: client_auth needs client_ca".into()),
    };
    let mut server = builder.with_single_cert(chain, key).map_err(|e| {
        format!(
            "TLS: server certificate {} and key {}: {e}",
            config.cert.display(),
            config.key.display()
        )
    })?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(server)
}

/// `HttpServer::on_connect` hook: keeps the verified client certificate of a TLS connection
/// for the requests on it.
pub fn on_connect(conn: &dyn Any, ext: &mut Extensions) {
    if let Some(tls) = conn.downcast_ref::<TlsStream<TcpStream>>() {
        let (_, session) = tls.get_ref();
        if let Some(cert) = session.peer_certificates().and_then(|c| c.first()) {
            ext.insert(ClientCertificate::from_der(cert.as_ref()));
        }
    }
}
