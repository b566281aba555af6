//! TLS for the server: certificate, key and optional client CA from PEM
//! files, reloadable while serving.
//!
//! tonic's built-in `ServerTlsConfig` fixes its certificate when the server
//! starts. Here every accepted connection takes the *current* rustls
//! configuration from [`TlsReloader`]; [`TlsReloader::reload`] builds a new
//! one from the files and swaps it in. Connections already established keep
//! the session they negotiated (nothing is dropped), new ones see the new
//! certificate. A reload that fails keeps the old configuration. Swapping the
//! whole configuration, rather than only the certified key behind a
//! `ResolvesServerCert`, also reloads the client CA of mutual TLS.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

/// The ALPN protocol the server speaks: gRPC runs on HTTP/2 only, and stock
/// gRPC clients (grpcio, grpcurl) refuse a TLS server that does not select it.
pub const ALPN_H2: &[u8] = b"h2";

/// Where the server's TLS material lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, PEM, leaf first.
    pub cert: PathBuf,
    /// The private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates, PEM, that client certificates must chain to; with
    /// this, every client must present a certificate (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

/// Loading TLS material failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no valid PEM of that kind.
    #[error("cannot read the {what} from {}: {source}", path.display())]
    Read {
        /// Which file: "certificate", "private key", "client CA".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: rustls::pki_types::pem::Error,
    },
    /// A file has no PEM block of the expected kind.
    #[error("{} holds no {what} (expected a PEM \"-----BEGIN {pem}-----\" block)", path.display())]
    Empty {
        /// What was expected.
        what: &'static str,
        /// The PEM label expected.
        pem: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// A client CA certificate is not usable as a trust anchor.
    #[error("the client CA in {} is not usable: {source}", path.display())]
    BadClientCa {
        /// The file.
        path: PathBuf,
        /// Why.
        source: rustls::Error,
    },
    /// The client-certificate verifier could not be built.
    #[error("cannot verify client certificates with the CA in {}: {source}", path.display())]
    Verifier {
        /// The file.
        path: PathBuf,
        /// Why.
        source: rustls::server::VerifierBuilderError,
    },
    /// The key does not belong to the certificate, or is of a kind rustls
    /// does not support.
    #[error(
        "the certificate {} and the key {} do not make a usable pair: {source}",
        cert.display(),
        key.display()
    )]
    Pair {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// Why.
        source: rustls::Error,
    },
}

/// The crypto provider: ring (no C toolchain beyond `cc`, no cmake).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Read {
            what,
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            pem: "CERTIFICATE",
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| match source {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::Empty {
            what: "private key",
            pem: "PRIVATE KEY",
            path: path.to_owned(),
        },
        source => TlsError::Read {
            what: "private key",
            path: path.to_owned(),
            source,
        },
    })
}

impl TlsFiles {
    /// Reads the files into a rustls server configuration.
    pub fn load(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let certs = read_certs("certificate", &self.cert)?;
        let key = read_key(&self.key)?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions");
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in read_certs("client CA", ca)? {
                    roots.add(cert).map_err(|source| TlsError::BadClientCa {
                        path: ca.clone(),
                        source,
                    })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .build()
                        .map_err(|source| TlsError::Verifier {
                            path: ca.clone(),
                            source,
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|source| TlsError::Pair {
                cert: self.cert.clone(),
                key: self.key.clone(),
                source,
            })?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(config))
    }
}

/// The configuration new connections are accepted with, and how to renew it.
#[derive(Debug)]
pub struct TlsReloader {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
}

impl TlsReloader {
    /// Loads `files`; fails if they are not usable, so a server never starts
    /// without a certificate it was asked to use.
    pub fn new(files: TlsFiles) -> Result<Self, TlsError> {
        let current = RwLock::new(files.load()?);
        Ok(Self { files, current })
    }

    /// The files it reads.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The acceptor for the next connection.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        tokio_rustls::TlsAcceptor::from(config)
    }

    /// Reads the files again and, if they are usable, accepts new
    /// connections with them; on an error the old configuration stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = self.files.load()?;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = config;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A missing or empty file is refused with the file's name in the message.
    #[test]
    fn bad_files_name_themselves() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let files = TlsFiles {
            cert: empty.clone(),
            key: dir.path().join("missing.key"),
            client_ca: None,
        };
        let e = files.load().unwrap_err().to_string();
        assert!(e.contains("empty.pem") && e.contains("CERTIFICATE"), "{e}");
    }
}
