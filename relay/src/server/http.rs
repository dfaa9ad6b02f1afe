//! The admin HTTP listener (`--admin-http ADDR`, off by default): `GET /metrics` (the
//! [`Metrics`] in the OpenMetrics text format, which Prometheus scrapes), `GET /healthz` (200
//! while the process serves HTTP at all) and `GET /readyz` (200 when [`Health::ready`], else
//! 503 with what it waits for).
//!
//! It has no authentication: the settings refuse an address other hosts can reach unless the
//! operator allows it (`admin_http_allow_remote`). Bounds: at most [`MAX_CLIENTS`] connections at
//! once (more are closed unanswered), one request per connection (no keep-alive), each
//! connection closed after [`CONNECTION_TIMEOUT`]; request bodies are never read.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::metrics::{Health, Metrics};

/// Most admin HTTP connections served at once.
pub const MAX_CLIENTS: usize = 16;
/// Longest an admin HTTP connection lasts, from accept to close.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// The content type of `/metrics`.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds the listener (before the store opens, so that `/healthz` answers while it does).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves requests until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, health: Arc<Health>) {
    let busy = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, most likely: wait rather than spin.
                tracing::warn!(error = %e, "admin http: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if busy.load(Ordering::Relaxed) >= MAX_CLIENTS {
            continue;
        }
        busy.fetch_add(1, Ordering::Relaxed);
        let (metrics, health, busy) = (metrics.clone(), health.clone(), busy.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let response = respond(req.method(), req.uri().path(), &metrics, &health);
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .timer(TokioTimer::new())
                .header_read_timeout(CONNECTION_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            busy.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

fn respond(method: &Method, path: &str, metrics: &Metrics, health: &Health) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into());
    }
    match path {
        "/metrics" => {
            let mut r = Response::new(Full::new(Bytes::from(metrics.encode())));
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(OPENMETRICS));
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match health.ready() {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
        },
        _ => text(StatusCode::NOT_FOUND, "not found; this listener serves /metrics, /healthz and /readyz\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}
