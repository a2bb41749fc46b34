//! Opening a download as Nix's `FileTransfer` does it for `builtin:fetchurl`
//! (`src/libstore/filetransfer.cc`): http and https through ureq, `file://` from the local file
//! system. curl is behind Nix's messages, so failures are named by curl's code and text.

use std::error::Error as _;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use super::fetchurl::FetchError;

/// Nix has curl follow at most 10 redirects (`CURLOPT_MAXREDIRS`).
const MAX_REDIRECTS: u32 = 10;
/// curl's default connect timeout (Nix's `connect-timeout` 0) and Nix's
/// `stalled-download-timeout`, here as the longest wait for one read.
const STALL_TIMEOUT: Duration = Duration::from_secs(300);
/// The statuses Nix accepts; any other one is an `HTTP error`.
const SUCCESS: [u16; 5] = [200, 201, 204, 206, 304];
/// Nix shows the body of an error response shorter than this.
const MAX_SHOWN_BODY: usize = 1024;
const USER_AGENT: &str = concat!(
    "stockade/",
    env!("CARGO_PKG_VERSION"),
    " (builtin:fetchurl)"
);

/// A curl error: its number and `curl_easy_strerror` text, which Nix prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CurlCode(pub u32, pub &'static str);

pub const UNSUPPORTED_PROTOCOL: CurlCode = CurlCode(1, "Unsupported protocol");
pub const URL_MALFORMAT: CurlCode = CurlCode(3, "URL using bad/illegal format or missing URL");
pub const COULDNT_RESOLVE_HOST: CurlCode = CurlCode(6, "Couldn't resolve host name");
pub const COULDNT_CONNECT: CurlCode = CurlCode(7, "Couldn't connect to server");
pub const WEIRD_SERVER_REPLY: CurlCode = CurlCode(8, "Weird server reply");
pub const PARTIAL_FILE: CurlCode = CurlCode(18, "Transferred a partial file");
pub const OPERATION_TIMEDOUT: CurlCode = CurlCode(28, "Timeout was reached");
pub const SSL_CONNECT_ERROR: CurlCode = CurlCode(35, "SSL connect error");
pub const FILE_COULDNT_READ_FILE: CurlCode = CurlCode(37, "Couldn't read a file:// file");
pub const TOO_MANY_REDIRECTS: CurlCode = CurlCode(47, "Number of redirects hit maximum amount");
pub const RECV_ERROR: CurlCode = CurlCode(56, "Failure when receiving data from the peer");
pub const PEER_FAILED_VERIFICATION: CurlCode =
    CurlCode(60, "SSL peer certificate or SSH remote key was not OK");

/// Opens downloads; one per fetch, shared by the hashed mirrors and the main URL.
pub(super) struct Transfer {
    agent: ureq::Agent,
}

/// A download whose response was accepted: its body, not yet read.
pub(super) struct Download {
    pub reader: Box<dyn Read + Send + Sync>,
    /// A `file://` download (its read errors are curl's `FILE_COULDNT_READ_FILE`).
    pub file: bool,
}

impl Transfer {
    /// Certificates are checked against `ca_file` when it is readable and holds at least one
    /// certificate (Nix 2.26 hands the daemon's `ssl-cert-file` in), else against the bundled
    /// Mozilla roots. Content-Encoding is never undone (Nix's `decompress = false`): ureq is
    /// built without its gzip and brotli features.
    pub fn new(ca_file: Option<&Path>) -> Result<Self, FetchError> {
        let mut builder = ureq::AgentBuilder::new()
            // ureq counts the final response among its redirects.
            .redirects(MAX_REDIRECTS + 1)
            .timeout_connect(STALL_TIMEOUT)
            .timeout_read(STALL_TIMEOUT)
            .timeout_write(STALL_TIMEOUT)
            .user_agent(USER_AGENT);
        if let Some(path) = ca_file {
            if let Some(config) = tls_config(path)? {
                builder = builder.tls_config(Arc::new(config));
            }
        }
        Ok(Transfer {
            agent: builder.build(),
        })
    }

    /// Starts downloading `url`: for http(s), follows redirects and accepts only Nix's
    /// successful statuses.
    pub fn open(&self, url: &str) -> Result<Download, FetchError> {
        let parsed = url::Url::parse(url)
            .map_err(|e| FetchError::transfer(url, URL_MALFORMAT, e.to_string()))?;
        match parsed.scheme() {
            "file" => {
                let path = parsed.to_file_path().map_err(|()| {
                    FetchError::transfer(url, URL_MALFORMAT, "Bad file:// URL".to_string())
                })?;
                let file = File::open(&path).map_err(|e| {
                    FetchError::transfer(
                        url,
                        FILE_COULDNT_READ_FILE,
                        format!("Couldn't open file {}: {e}", path.display()),
                    )
                })?;
                Ok(Download {
                    reader: Box::new(file),
                    file: true,
                })
            }
            "http" | "https" => {
                let response = match self.agent.get(url).call() {
                    Ok(response) => response,
                    Err(ureq::Error::Status(status, response)) => {
                        return Err(http_error(url, status, response))
                    }
                    Err(ureq::Error::Transport(t)) => return Err(transport_error(url, &t)),
                };
                let status = response.status();
                if !SUCCESS.contains(&status) {
                    return Err(http_error(url, status, response));
                }
                Ok(Download {
                    reader: response.into_reader(),
                    file: false,
                })
            }
            other => Err(FetchError::transfer(
                url,
                UNSUPPORTED_PROTOCOL,
                format!("Protocol \"{other}\" not supported"),
            )),
        }
    }
}

/// The error for a read of a download's body that failed.
pub(super) fn read_error(url: &str, file: bool, e: &io::Error) -> FetchError {
    let code = if file {
        FILE_COULDNT_READ_FILE
    } else {
        match e.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => OPERATION_TIMEDOUT,
            io::ErrorKind::UnexpectedEof => PARTIAL_FILE,
            _ => tls_code(e).unwrap_or(RECV_ERROR),
        }
    };
    FetchError::transfer(url, code, e.to_string())
}

/// `HTTP error N`, with the body of the response when it is short (as Nix shows it).
fn http_error(url: &str, status: u16, response: ureq::Response) -> FetchError {
    let mut body = Vec::new();
    // The body only decorates the message: a failure to read it is not worth reporting.
    let _ = response
        .into_reader()
        .take(MAX_SHOWN_BODY as u64)
        .read_to_end(&mut body);
    let body = (!body.is_empty() && body.len() < MAX_SHOWN_BODY)
        .then(|| String::from_utf8_lossy(&body).trim_end().to_string());
    FetchError::Http {
        url: url.to_string(),
        status,
        body,
    }
}

fn transport_error(url: &str, t: &ureq::Transport) -> FetchError {
    use ureq::ErrorKind as K;
    let code = match t.kind() {
        K::InvalidUrl => URL_MALFORMAT,
        K::UnknownScheme => UNSUPPORTED_PROTOCOL,
        K::Dns => COULDNT_RESOLVE_HOST,
        K::TooManyRedirects => TOO_MANY_REDIRECTS,
        K::BadStatus | K::BadHeader => WEIRD_SERVER_REPLY,
        K::ConnectionFailed | K::ProxyConnect | K::InvalidProxyUrl | K::ProxyUnauthorized => {
            tls_code_of(t).unwrap_or(COULDNT_CONNECT)
        }
        K::Io | K::InsecureRequestHttpsOnly | K::HTTP => tls_code_of(t).unwrap_or(RECV_ERROR),
    };
    let mut detail: Vec<String> = t.message().map(str::to_string).into_iter().collect();
    if let Some(source) = t.source() {
        detail.push(source.to_string());
    }
    if detail.is_empty() {
        detail.push(t.kind().to_string());
    }
    FetchError::transfer(url, code, detail.join(": "))
}

/// The curl code of a TLS failure somewhere in `t`'s sources.
fn tls_code_of(t: &ureq::Transport) -> Option<CurlCode> {
    let mut source = t.source();
    while let Some(e) = source {
        if let Some(code) = e
            .downcast_ref::<rustls::Error>()
            .map(tls_code_of_rustls)
            .or_else(|| e.downcast_ref::<io::Error>().and_then(tls_code))
        {
            return Some(code);
        }
        source = e.source();
    }
    None
}

fn tls_code(e: &io::Error) -> Option<CurlCode> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .map(tls_code_of_rustls)
}

fn tls_code_of_rustls(e: &rustls::Error) -> CurlCode {
    match e {
        rustls::Error::InvalidCertificate(_) => PEER_FAILED_VERIFICATION,
        _ => SSL_CONNECT_ERROR,
    }
}

/// A TLS configuration trusting the certificates of the PEM file `path`; `None` when it cannot
/// be read or holds no usable certificate (the bundled roots are used then).
fn tls_config(path: &Path) -> Result<Option<rustls::ClientConfig>, FetchError> {
    let Ok(pem) = std::fs::read(path) else {
        log::debug!("CA file '{}' is not readable", path.display());
        return Ok(None);
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| FetchError::CaFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    let mut roots = rustls::RootCertStore::empty();
    // Bundles carry certificates webpki cannot use (old encodings); like curl, skip them.
    let (added, ignored) = roots.add_parsable_certificates(certs);
    if ignored > 0 {
        log::debug!(
            "CA file '{}': {ignored} certificates ignored",
            path.display()
        );
    }
    if added == 0 {
        log::debug!("CA file '{}' holds no certificate", path.display());
        return Ok(None);
    }
    // The provider ureq 2 itself is built with (the post-quantum ones need aws-lc-rs, a C and
    // cmake build this crate does without).
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| FetchError::CaFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(config))
}
