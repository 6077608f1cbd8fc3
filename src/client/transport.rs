//! Opening a connection to a node: TCP, then TLS when configured, then an Auth request
//! when the client has credentials. Shared by the pipelined [`super::Connection`] and the
//! load generator, so both speak to a secured node the same way.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use prost::Message;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Error;
use crate::auth::Credentials;
use crate::proto::{self, request::Op, response::Result as R, ErrorCode, Request, Response};
use crate::tls::ClientFiles;
use crate::wire;

/// A byte stream to a node: plain TCP or TLS over it.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
pub type Stream = Box<dyn Io>;

/// How a client proves who it is and protects its traffic.
#[derive(Clone, Debug, Default)]
pub struct Security {
    /// TLS to the node; None = plaintext.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The name the node's certificate must carry; None = the host the client was given
    /// (`Client::connect`) or the node's IP address.
    pub server_name: Option<String>,
    /// Sent in an Auth request on every new connection.
    pub credentials: Option<Credentials>,
}

impl Security {
    /// From the tools' flags: `--token-file`, and TLS when `tls` is set or any TLS file is
    /// given (`--tls-ca`, `--tls-cert`, `--tls-key`).
    pub fn from_files(token_file: Option<&str>, tls: bool, files: &ClientFiles) -> Result<Security, String> {
        let credentials = token_file.map(Credentials::from_file).transpose()?;
        let tls = (tls || !files.is_empty())
            .then(|| files.client_config("--tls"))
            .transpose()?;
        Ok(Security {
            tls,
            server_name: None,
            credentials,
        })
    }
}

/// Connects, completes TLS and authenticates, each within `timeout`.
pub async fn open(addr: SocketAddr, security: &Security, timeout: Duration) -> Result<Stream, Error> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| Error::Timeout(format!("connecting to {addr}")))?
        .map_err(|e| Error::Connect(addr, e))?;
    tcp.set_nodelay(true).map_err(Error::Io)?;
    let mut stream: Stream = match &security.tls {
        None => Box::new(tcp),
        Some(config) => {
            let name = match &security.server_name {
                Some(host) => crate::tls::server_name(host).map_err(Error::Tls)?,
                None => ServerName::IpAddress(addr.ip().into()),
            };
            let connector = tokio_rustls::TlsConnector::from(config.clone());
            let tls = tokio::time::timeout(timeout, connector.connect(name, tcp))
                .await
                .map_err(|_| Error::Timeout(format!("TLS handshake with {addr}")))?
                .map_err(|e| Error::Tls(format!("TLS handshake with {addr}: {e}")))?;
            Box::new(tls)
        }
    };
    if let Some(credentials) = &security.credentials {
        tokio::time::timeout(timeout, authenticate(&mut stream, credentials))
            .await
            .map_err(|_| Error::Timeout(format!("authenticating to {addr}")))??;
    }
    Ok(stream)
}

/// One Auth request and its reply, before the connection carries anything else.
async fn authenticate(stream: &mut Stream, credentials: &Credentials) -> Result<(), Error> {
    let request = Request {
        id: 0,
        op: Some(Op::Auth(proto::AuthRequest {
            user: credentials.user.clone(),
            token: credentials.token.clone(),
        })),
    };
    let mut out = Vec::new();
    wire::put_frame(&request, &mut out);
    stream.write_all(&out).await.map_err(Error::Io)?;
    let mut input = BytesMut::with_capacity(1024);
    let payload = loop {
        match wire::take_frame(&mut input, 1 << 20) {
            Ok(Some(p)) => break p,
            Ok(None) => {}
            Err(e) => return Err(Error::Protocol(e.to_string())),
        }
        if stream.read_buf(&mut input).await.map_err(Error::Io)? == 0 {
            return Err(Error::Disconnected("the node closed the connection during Auth".into()));
        }
    };
    let response = Response::decode(payload).map_err(|e| Error::Protocol(format!("Auth reply: {e}")))?;
    match (response.error, response.result) {
        (Some(e), _) => Err(Error::Server {
            code: ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unknown),
            message: e.message,
        }),
        (None, Some(R::Auth(_))) => Ok(()),
        (None, other) => Err(Error::Protocol(format!("unexpected reply to Auth: {other:?}"))),
    }
}
