//! Plumbing shared by the examples, not part of remora's API: a minimal hyper HTTP/1.1 server
//! and client over real TCP sockets, so each example shows only what it is about.
#![allow(dead_code)] // each example uses a part of it

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves `handler` on every connection `listener` accepts, until the runtime stops.
pub async fn serve<F>(listener: TcpListener, handler: F) -> std::io::Result<()>
where
    F: Fn(Request<Incoming>) -> Response<Full<Bytes>> + Clone + Send + Sync + 'static,
{
    loop {
        let (stream, _) = listener.accept().await?;
        let handler = handler.clone();
        let service = hyper::service::service_fn(move |req| {
            let rsp = handler(req);
            async move { Ok::<_, Infallible>(rsp) }
        });
        let conn = hyper::server::conn::http1::Builder::new();
        // A connection's error (a client gone mid-request) ends that connection only.
        tokio::spawn(async move { conn.serve_connection(TokioIo::new(stream), service).await });
    }
}

/// A response whose body is `text`.
pub fn text(status: StatusCode, text: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(text.into()));
    *rsp.status_mut() = status;
    rsp
}

/// What a server saw, shared between its handler and the report.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    pub fn push(&self, entry: impl Into<String>) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(entry.into());
    }

    pub fn entries(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// One HTTP/1.1 client connection, kept alive across requests.
pub struct Client(SendRequest<Empty<Bytes>>);

impl Client {
    pub async fn connect(to: SocketAddr) -> Result<Client, BoxError> {
        let io = TokioIo::new(TcpStream::connect(to).await?);
        let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        Ok(Client(sender))
    }

    /// `GET uri` with `headers`; the status and the body. An absolute `uri` (as clients of an
    /// HTTP proxy send) gives the Host header; otherwise pass `host` in `headers`.
    pub async fn get(
        &mut self,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> Result<(StatusCode, String), BoxError> {
        let uri: Uri = uri.parse()?;
        let mut req = Request::get(&uri);
        if let Some(authority) = uri.authority() {
            req = req.header(header::HOST, authority.as_str());
        }
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        self.0.ready().await?;
        let rsp = self.0.send_request(req.body(Empty::new())?).await?;
        let status = rsp.status();
        let body = rsp.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// One request on a connection of its own.
pub async fn get(
    to: SocketAddr,
    uri: &str,
    headers: &[(&str, &str)],
) -> Result<(StatusCode, String), BoxError> {
    Client::connect(to).await?.get(uri, headers).await
}
