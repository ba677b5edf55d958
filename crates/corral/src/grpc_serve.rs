//! Serves gRPC routes from an accept loop of our own: TLS by rustls, HTTP/2 by hyper, each
//! connection in one task whose writes are coalesced (see [`Coalesced`] and [`Unvectored`]).

use std::sync::Arc;

use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tonic::service::Routes;

use crate::coalesce::{Coalesced, Unvectored};

/// Accepts connections on `listener` until `stop` turns true, and serves `routes` on each.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    routes: Routes,
    http: http2::Builder<TokioExecutor>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let routes = routes.prepare();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // Out of descriptors or a connection reset before it was accepted: the
                // listener itself is fine.
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => return Ok(()),
        };
        let _ = tcp.set_nodelay(true);
        let service = TowerToHyperService::new(routes.clone());
        let http = http.clone();
        let acceptor = acceptor.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let result = match acceptor {
                Some(acceptor) => {
                    let Some(tls) = corral_transport::tls::accept(&acceptor, tcp, peer).await else { return };
                    connection(http.serve_connection(TokioIo::new(Unvectored(tls)), service), stop).await
                }
                None => connection(http.serve_connection(TokioIo::new(Unvectored(tcp)), service), stop).await,
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "gRPC connection ended");
            }
        });
    }
}

/// Drives one connection until it ends; once `stop` turns true, it finishes the requests it
/// has and closes.
async fn connection<I, S, B>(
    conn: http2::Connection<I, S, TokioExecutor>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> hyper::Result<()>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B> + Send + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut conn = Coalesced::new(conn);
    tokio::select! {
        done = &mut conn => return done,
        _ = stopped(&mut stop) => {}
    }
    conn.inner().graceful_shutdown();
    conn.await
}

async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}
