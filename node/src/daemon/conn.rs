//! One client connection: read a request line, run its method, write the answer; meanwhile,
//! once subscribed, write the session's events as they come.

use std::io;

use futures::StreamExt;
use serde_json::{json, Value};
use stratus_engine::Event;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, OwnedSemaphorePermit};
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};

use super::methods::{self, Ctx, Found, Reply};
use super::rpc::{self, RpcError};
use super::{MAX_REQUEST_BYTES, REQUEST_TIMEOUT, WRITE_TIMEOUT};
use crate::view::EventView;

/// Serves one connection until it closes, breaks a bound, or the session stops. `_slot` is
/// its place among the daemon's clients, given back when this returns.
pub(super) async fn serve(cx: Ctx, stream: UnixStream, _slot: OwnedSemaphorePermit) {
    let (read, mut write) = stream.into_split();
    let mut lines = FramedRead::new(read, LinesCodec::new_with_max_length(MAX_REQUEST_BYTES));
    let mut events: Option<broadcast::Receiver<Event>> = None;
    // The request being run: the id to answer under (none for a notification) and its reply.
    let mut running: Option<(Option<Value>, Reply)> = None;
    loop {
        let line = tokio::select! {
            read = lines.next(), if running.is_none() => match read {
                None => return,
                Some(Ok(line)) => {
                    let (line, run) = request(&cx, &mut events, &line);
                    running = run;
                    line
                }
                Some(Err(e)) => {
                    let e = match e {
                        LinesCodecError::MaxLineLengthExceeded => RpcError::request_too_large(MAX_REQUEST_BYTES),
                        LinesCodecError::Io(e) if e.kind() == io::ErrorKind::InvalidData => {
                            RpcError::parse_error("the line is not UTF-8")
                        }
                        LinesCodecError::Io(_) => return,
                    };
                    // The rest of the line is not read: the connection ends here.
                    let _ = send(&mut write, rpc::error(Value::Null, &e)).await;
                    return;
                }
            },
            result = run(&mut running) => {
                let id = running.take().and_then(|(id, _)| id);
                id.map(|id| answer(id, result))
            }
            event = next(&mut events) => match event {
                Ok(e) => EventView::of(&e).map(|v| rpc::notification("event", json!(v))),
                Err(broadcast::error::RecvError::Lagged(n)) => Some(rpc::notification("lagged", json!({ "skipped": n }))),
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        if let Some(line) = line {
            if send(&mut write, line).await.is_err() {
                return;
            }
        }
    }
}

/// Reads one request line: answers it at once (a bad request, a connection method, a method
/// not offered) or returns the method's reply to wait for.
fn request(
    cx: &Ctx,
    events: &mut Option<broadcast::Receiver<Event>>,
    line: &str,
) -> (Option<String>, Option<(Option<Value>, Reply)>) {
    let req = match rpc::parse(line) {
        Ok(req) => req,
        Err((id, e)) => return (Some(rpc::error(id, &e)), None),
    };
    let now = |r: Result<Value, RpcError>| (req.id.clone().map(|id| answer(id, r)), None);
    match req.method.as_str() {
        "subscribe" => {
            *events = Some(cx.subscribe());
            now(Ok(json!({ "subscribed": true })))
        }
        "unsubscribe" => {
            *events = None;
            now(Ok(json!({ "subscribed": false })))
        }
        name => match methods::find(name) {
            Found::Method(handler) => {
                let reply = handler(cx.clone(), req.params);
                let timed: Reply = Box::pin(async move {
                    tokio::time::timeout(REQUEST_TIMEOUT, reply)
                        .await
                        .unwrap_or_else(|_| Err(RpcError::timeout(REQUEST_TIMEOUT.as_secs())))
                });
                (None, Some((req.id, timed)))
            }
            Found::NotYet => now(Err(RpcError::not_available(name))),
            Found::Unknown => now(Err(RpcError::unknown_method(name))),
        },
    }
}

fn answer(id: Value, r: Result<Value, RpcError>) -> String {
    match r {
        Ok(v) => rpc::result(id, v),
        Err(e) => rpc::error(id, &e),
    }
}

/// The running request's result (never, when none runs).
async fn run(running: &mut Option<(Option<Value>, Reply)>) -> Result<Value, RpcError> {
    match running {
        Some((_, reply)) => reply.await,
        None => std::future::pending().await,
    }
}

/// The subscription's next event (never, when not subscribed).
async fn next(events: &mut Option<broadcast::Receiver<Event>>) -> Result<Event, broadcast::error::RecvError> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Writes one line, or fails if the client does not take it within [`WRITE_TIMEOUT`].
async fn send(write: &mut OwnedWriteHalf, mut line: String) -> io::Result<()> {
    line.push('\n');
    match tokio::time::timeout(WRITE_TIMEOUT, write.write_all(line.as_bytes())).await {
        Ok(r) => r,
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}
