//! Certificates for the TLS tests, made with rcgen: a CA, certificates it signs (valid or
//! expired), written as PEM files into a directory.

use std::path::{Path, PathBuf};

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};

/// A certificate authority that signs test certificates.
pub struct Ca {
    pub cert: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    dir: PathBuf,
}

/// A certificate and its key, as PEM files.
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pair {
    pub fn cert(&self) -> &str {
        self.cert.to_str().unwrap()
    }
    pub fn key(&self) -> &str {
        self.key.to_str().unwrap()
    }
}

impl Ca {
    pub fn new(dir: &Path, name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        let cert = params.self_signed(&key).unwrap();
        let path = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&path, cert.pem()).unwrap();
        Ca {
            cert: path,
            issuer: Issuer::new(params, key),
            dir: dir.to_path_buf(),
        }
    }

    pub fn cert(&self) -> &str {
        self.cert.to_str().unwrap()
    }

    /// A server certificate for localhost and 127.0.0.1 (also usable as a client one).
    pub fn server(&self, name: &str) -> Pair {
        self.sign(name, "localhost", &["localhost", "127.0.0.1"], false)
    }

    /// A client certificate with common name `cn`.
    pub fn client(&self, name: &str, cn: &str) -> Pair {
        self.sign(name, cn, &[], false)
    }

    /// A client certificate that expired in 2021.
    pub fn expired_client(&self, name: &str, cn: &str) -> Pair {
        self.sign(name, cn, &[], true)
    }

    fn sign(&self, name: &str, cn: &str, sans: &[&str], expired: bool) -> Pair {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        if expired {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let pair = Pair {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}.key")),
        };
        std::fs::write(&pair.cert, cert.pem()).unwrap();
        std::fs::write(&pair.key, key.serialize_pem()).unwrap();
        pair
    }
}
