//! TLS settings shared by the server, the client and the outbound connections: PEM loading,
//! rustls configurations, and the client certificate's common name.
//!
//! One TLS library (rustls, ring provider) serves every connection: the client port, the
//! Rust client, RabbitMQ (amqprs) and etcd (tonic). rustls is sans-IO, so the server drives
//! it from its own io_uring path (src/server/connection.rs) without a second runtime.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Certificates of a PEM file; an error when it holds none.
pub fn load_certs(setting: &str, path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{setting}: cannot read certificates from {path}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{setting}: {path} holds no PEM certificate"));
    }
    Ok(certs)
}

pub fn load_key(setting: &str, path: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{setting}: cannot read a private key from {path}: {e}"))
}

fn roots(setting: &str, path: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(setting, path)? {
        roots
            .add(cert)
            .map_err(|e| format!("{setting}: {path}: not a usable CA certificate: {e}"))?;
    }
    Ok(roots)
}

/// The client port's configuration: its certificate, and with `client_ca_file` the CA that
/// client certificates must chain to (mutual TLS).
pub fn server_config(tls: &crate::config::Tls) -> Result<Arc<ServerConfig>, String> {
    let certs = load_certs("tls.cert_file", &tls.cert_file)?;
    let key = load_key("tls.key_file", &tls.key_file)?;
    let builder = ServerConfig::builder();
    let builder = if tls.client_ca_file.is_empty() {
        builder.with_no_client_auth()
    } else {
        let roots = roots("tls.client_ca_file", &tls.client_ca_file)?;
        let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
            .build()
            .map_err(|e| format!("tls.client_ca_file: {e}"))?;
        builder.with_client_cert_verifier(verifier)
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("tls.cert_file/tls.key_file: {e}"))?;
    Ok(Arc::new(config))
}

/// The common name of a verified peer certificate (the end-entity one), if it has one.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// TLS settings of an outgoing connection (to a Flux-KV node, RabbitMQ or etcd): the CA
/// that signed the server's certificate (empty = the public web PKI roots) and an optional
/// client certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientFiles {
    pub ca_file: String,
    pub cert_file: String,
    pub key_file: String,
}

impl ClientFiles {
    pub fn new(ca_file: &str, cert_file: &str, key_file: &str) -> ClientFiles {
        ClientFiles {
            ca_file: ca_file.into(),
            cert_file: cert_file.into(),
            key_file: key_file.into(),
        }
    }

    /// From optional command-line flags (absent = empty).
    pub fn from_flags(ca: &Option<String>, cert: &Option<String>, key: &Option<String>) -> ClientFiles {
        fn s(o: &Option<String>) -> &str {
            o.as_deref().unwrap_or_default()
        }
        ClientFiles::new(s(ca), s(cert), s(key))
    }

    pub fn is_empty(&self) -> bool {
        self.ca_file.is_empty() && self.cert_file.is_empty()
    }

    /// A rustls client configuration; `what` names the settings in errors.
    pub fn client_config(&self, what: &str) -> Result<Arc<ClientConfig>, String> {
        let roots = if self.ca_file.is_empty() {
            RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            }
        } else {
            roots(&format!("{what} CA"), &self.ca_file)?
        };
        let builder = ClientConfig::builder().with_root_certificates(roots);
        let config = if self.cert_file.is_empty() {
            builder.with_no_client_auth()
        } else {
            let certs = load_certs(&format!("{what} certificate"), &self.cert_file)?;
            let key = load_key(&format!("{what} key"), &self.key_file)?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("{what} certificate/key: {e}"))?
        };
        Ok(Arc::new(config))
    }
}

/// The name a client checks the server's certificate against: the host of `addr`
/// (`host:port`, `[v6]:port` or `https://host:port`).
pub fn server_name(addr: &str) -> Result<ServerName<'static>, String> {
    let rest = addr.split_once("://").map_or(addr, |(_, r)| r);
    let host = match rest.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => rest.rsplit_once(':').map_or(rest, |(h, _)| h),
    };
    let host = host.split('/').next().unwrap_or(host);
    ServerName::try_from(host.to_string()).map_err(|e| format!("{host:?} is not a valid TLS server name: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the name checked against the certificate is the host, however the address is written.
    #[test]
    fn server_name_is_the_host() {
        for (addr, host) in [
            ("localhost:7379", "localhost"),
            ("https://etcd.example:2379", "etcd.example"),
            ("127.0.0.1:1", "127.0.0.1"),
            ("[::1]:7379", "::1"),
        ] {
            assert_eq!(server_name(addr).unwrap().to_str(), host, "{addr}");
        }
    }
}
