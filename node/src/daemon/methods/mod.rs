//! The daemon's methods: one small function each, in a table per area (`chats.rs`,
//! `secret.rs`, `account.rs`). A method reads its params into a struct (unknown members refused), calls the
//! running [`Session`], and returns its result as JSON. Adding one is adding a function and a
//! table row; docs/daemon.md lists them all, and a test keeps that list and these tables equal.
//!
//! `subscribe` and `unsubscribe` change the connection, not the device: the connection handles
//! them itself (`conn.rs`).

mod account;
mod chats;
mod secret;

use std::fmt::Display;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use stratus_engine::{Event, Session};
use tokio::sync::broadcast;

use super::rpc::RpcError;

/// What a method returns: its result, later.
pub(crate) type Reply = Pin<Box<dyn Future<Output = Result<Value, RpcError>> + Send>>;
/// A method: the context and the request's params (always an object).
pub(crate) type Handler = fn(Ctx, Value) -> Reply;

/// Operations the CLI has that the running session does not offer yet (they open the store
/// or their own relay connection today). The daemon answers them with
/// `not_available_in_daemon` instead of `unknown_method`, so that the CLI can tell the user
/// to stop the daemon for that command. Each moves to a table once `Session` offers it.
pub(crate) const NOT_YET: &[&str] = &["create_account", "link", "recover", "secret_auto_accept"];

/// What a method name is.
pub(crate) enum Found {
    Method(Handler),
    NotYet,
    Unknown,
}

pub(crate) fn find(name: &str) -> Found {
    let tables = [chats::METHODS, secret::METHODS, account::METHODS];
    if let Some((_, h)) = tables.iter().flat_map(|t| t.iter()).find(|(n, _)| *n == name) {
        return Found::Method(*h);
    }
    match NOT_YET.contains(&name) {
        true => Found::NotYet,
        false => Found::Unknown,
    }
}

/// Every method the daemon answers, those of the connection (`conn.rs`) first.
#[cfg(test)]
pub(crate) fn names() -> Vec<&'static str> {
    let tables = [chats::METHODS, secret::METHODS, account::METHODS];
    ["subscribe", "unsubscribe"].into_iter().chain(tables.iter().flat_map(|t| t.iter().map(|(n, _)| *n))).collect()
}

/// What every method gets: the running session. Cheap to clone (one per request).
#[derive(Clone)]
pub(crate) struct Ctx(Arc<Shared>);

struct Shared {
    session: Session,
    /// Never read: new subscriptions are made from it ([`Ctx::subscribe`]). Unread, it holds
    /// no more than the session's event queue (4,096 events), which exists anyway.
    template: broadcast::Receiver<Event>,
}

impl Ctx {
    /// The context for `session`; `events` is a receiver of its events to make subscriptions
    /// from.
    pub(crate) fn new(session: Session, events: broadcast::Receiver<Event>) -> Ctx {
        Ctx(Arc::new(Shared { session, template: events }))
    }

    pub(crate) fn session(&self) -> &Session {
        &self.0.session
    }

    /// A receiver of the session's events from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.0.template.resubscribe()
    }

    /// The session back, once no request holds the context any more (`None` if one does).
    pub(crate) fn into_session(self) -> Option<Session> {
        Arc::into_inner(self.0).map(|s| s.session)
    }
}

/// Runs `f` with the params read into `P`, or answers `bad_params`.
fn with<P, F, Fut>(cx: Ctx, params: Value, f: F) -> Reply
where
    P: DeserializeOwned,
    F: FnOnce(Ctx, P) -> Fut,
    Fut: Future<Output = Result<Value, RpcError>> + Send + 'static,
{
    match serde_json::from_value::<P>(params) {
        Ok(p) => Box::pin(f(cx, p)),
        Err(e) => Box::pin(std::future::ready(Err(RpcError::bad_params(e)))),
    }
}

/// No params.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

/// An id in its text form (`chat`, `secret`, `account`), parsed as the CLI parses it.
struct Id<T>(T);

impl<'de, T> Deserialize<'de> for Id<T>
where
    T: FromStr,
    T::Err: Display,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(Id).map_err(serde::de::Error::custom)
    }
}

/// An empty result, for methods that only do something.
fn done() -> Result<Value, RpcError> {
    Ok(Value::Object(serde_json::Map::new()))
}

fn to_json(v: impl serde::Serialize) -> Result<Value, RpcError> {
    serde_json::to_value(v).map_err(|e| RpcError::new(-32603, "internal", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCS: &str = include_str!("../../../../docs/daemon.md");

    /// The method tables of docs/daemon.md (rows `| `name` | …` between "## Methods" and
    /// "### Events").
    fn documented() -> Vec<&'static str> {
        let start = DOCS.find("## Methods").expect("a Methods section");
        let end = DOCS.find("### Events").expect("an Events section");
        DOCS[start..end].lines().filter_map(|l| l.strip_prefix("| `")).filter_map(|l| l.split('`').next()).collect()
    }

    #[test]
    fn docs_list_exactly_the_methods_the_daemon_answers() {
        assert_eq!(documented(), names());
        let section = &DOCS[DOCS.find("### Not available").expect("the not-yet section")..];
        for name in NOT_YET {
            assert!(section.contains(&format!("`{name}`")), "docs/daemon.md does not list {name} as not yet available");
            assert!(matches!(find(name), Found::NotYet));
        }
        assert!(matches!(find("send"), Found::Method(_)));
        assert!(matches!(find("sned"), Found::Unknown));
    }
}
