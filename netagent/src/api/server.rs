//! Serves the API router with hyper's HTTP/1.1 server on the Unix socket and,
//! when configured, a loopback TCP address: a header read timeout per
//! connection, and a graceful shutdown that lets in-flight requests finish
//! (bounded by [`DRAIN_TIMEOUT`]).

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};

/// Default time a client has to send its request headers (`api.header_timeout`).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// At shutdown, in-flight requests get this long to finish.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the API is served.
#[derive(Debug)]
pub struct Listeners {
    /// The Unix socket (always).
    pub unix: UnixListener,
    /// A loopback TCP address (only when `api_tcp` is configured).
    pub tcp: Option<TcpListener>,
}

impl From<UnixListener> for Listeners {
    fn from(unix: UnixListener) -> Listeners {
        Listeners { unix, tcp: None }
    }
}

/// Accepts connections on every listener until `shutdown` resolves, then stops
/// accepting and waits for open connections to finish their requests. A client
/// that has not sent its request headers within `header_timeout` is
/// disconnected.
pub async fn serve(
    listeners: impl Into<Listeners>,
    router: Router,
    header_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let Listeners { unix, tcp } = listeners.into();
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let spawn = |stream: Box<dyn Io>| {
        let service = TowerToHyperService::new(router.clone());
        let conn = http.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "API connection ended with an error");
            }
        });
    };
    tokio::pin!(shutdown);
    loop {
        let accepted: std::io::Result<Box<dyn Io>> = tokio::select! {
            a = unix.accept() => a.map(|(s, _)| Box::new(s) as Box<dyn Io>),
            a = accept_tcp(tcp.as_ref()) => a.map(|s| Box::new(s) as Box<dyn Io>),
            () = &mut shutdown => break,
        };
        match accepted {
            Ok(stream) => spawn(stream),
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accepting an API connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(unix);
    drop(tcp);
    tokio::select! {
        () = graceful.shutdown() => tracing::debug!("API connections drained"),
        () = tokio::time::sleep(DRAIN_TIMEOUT) => {
            tracing::warn!(timeout = ?DRAIN_TIMEOUT, "API connections still open at shutdown; closing them");
        }
    }
}

/// A connection of either listener.
trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// The next TCP connection, or never when there is no TCP listener.
async fn accept_tcp(tcp: Option<&TcpListener>) -> std::io::Result<tokio::net::TcpStream> {
    match tcp {
        Some(l) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}
