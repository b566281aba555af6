//! TLS certificates for tests, generated when a test runs (no private key
//! is ever committed): a CA, server and client certificates it signs,
//! expired ones, and a second, unrelated CA.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A certificate and its key, PEM.
#[derive(Clone, Debug)]
pub struct CertPem {
    /// The certificate.
    pub cert: String,
    /// Its private key (PKCS#8).
    pub key: String,
}

impl CertPem {
    /// Writes `NAME.crt` and `NAME.key` into `dir`; returns their paths.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, &self.cert).expect("write test certificate");
        std::fs::write(&key, &self.key).expect("write test key");
        (cert, key)
    }
}

/// A certificate authority for tests.
#[derive(Debug)]
pub struct TestCa {
    params: CertificateParams,
    key: KeyPair,
    /// Its own certificate.
    pub pem: CertPem,
}

/// What a leaf certificate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// A server certificate for `localhost` and 127.0.0.1.
    Server,
    /// A client certificate.
    Client,
}

impl TestCa {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("self-signed CA");
        let pem = CertPem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        };
        Self { params, key, pem }
    }

    /// Writes the CA certificate as `NAME.crt` into `dir`.
    pub fn write_cert(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(format!("{name}.crt"));
        std::fs::write(&path, &self.pem.cert).expect("write test CA");
        path
    }

    /// A leaf certificate for `usage`, signed by this CA, valid now.
    pub fn issue(&self, usage: Usage, common_name: &str) -> CertPem {
        self.issue_with(usage, common_name, false)
    }

    /// A leaf certificate that expired in 2020.
    pub fn issue_expired(&self, usage: Usage, common_name: &str) -> CertPem {
        self.issue_with(usage, common_name, true)
    }

    fn issue_with(&self, usage: Usage, common_name: &str, expired: bool) -> CertPem {
        let names = match usage {
            Usage::Server => vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
            Usage::Client => Vec::new(),
        };
        let mut params = CertificateParams::new(names).expect("leaf params");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        if expired {
            params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        }
        let key = KeyPair::generate().expect("leaf key");
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("signed leaf");
        CertPem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}
