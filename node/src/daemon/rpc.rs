//! The daemon protocol's messages: newline-delimited JSON-RPC 2.0 (docs/daemon.md). Used by the
//! daemon to read requests and write answers, and by the CLI to do the reverse.

use serde_json::{json, Map, Value};
use stratus_engine::Error;

/// A typed error, as the `error` member of an answer: `code` (JSON-RPC's numbers, and ours
/// from -32001 down), `message` for people, `data.kind` for programs.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RpcError {
    pub code: i64,
    pub kind: String,
    pub message: String,
    /// More members of `data` besides `kind` (e.g. the relay's error code).
    pub data: Map<String, Value>,
}

impl RpcError {
    pub(crate) fn new(code: i64, kind: &str, message: impl Into<String>) -> Self {
        RpcError { code, kind: kind.into(), message: message.into(), data: Map::new() }
    }

    /// With one more member of `data`.
    pub(crate) fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.data.insert(key.into(), value.into());
        self
    }

    pub(crate) fn parse_error(why: impl std::fmt::Display) -> Self {
        Self::new(-32700, "parse_error", format!("not a JSON request: {why}"))
    }

    pub(crate) fn invalid_request(why: &str) -> Self {
        Self::new(-32600, "invalid_request", format!("not a JSON-RPC 2.0 request: {why}"))
    }

    pub(crate) fn unknown_method(method: &str) -> Self {
        Self::new(-32601, "unknown_method", format!("no method {method:?} (docs/daemon.md lists them)"))
    }

    pub(crate) fn bad_params(why: impl std::fmt::Display) -> Self {
        Self::new(-32602, "bad_params", format!("bad params: {why}"))
    }

    pub(crate) fn request_too_large(limit: usize) -> Self {
        Self::new(-32001, "request_too_large", format!("a request line is at most {limit} bytes; closing"))
            .with("limit_bytes", limit)
    }

    pub(crate) fn too_many_clients(limit: usize) -> Self {
        Self::new(-32002, "too_many_clients", format!("the daemon serves at most {limit} clients at once; try again"))
            .with("limit", limit)
    }

    pub(crate) fn wrong_user(uid: u32) -> Self {
        Self::new(-32003, "wrong_user", format!("the daemon serves only its own user; uid {uid} is not it"))
    }

    pub(crate) fn not_available(method: &str) -> Self {
        Self::new(
            -32004,
            "not_available_in_daemon",
            format!(
                "`{method}` is not available through the daemon yet: stop the daemon (or `watch`) running on \
                 this home, then run the command again"
            ),
        )
    }

    pub(crate) fn timeout(secs: u64) -> Self {
        Self::new(-32005, "timeout", format!("no answer within {secs} s; what was asked may still happen"))
    }

    /// The error as the `error` member of an answer.
    pub(crate) fn to_value(&self) -> Value {
        let mut data = self.data.clone();
        data.insert("kind".into(), self.kind.clone().into());
        json!({ "code": self.code, "message": self.message, "data": data })
    }

    /// Reads the `error` member of an answer (the CLI's side).
    pub(crate) fn from_value(v: &Value) -> RpcError {
        let mut data = v.get("data").and_then(Value::as_object).cloned().unwrap_or_default();
        let kind = match data.remove("kind") {
            Some(Value::String(k)) => k,
            _ => "unknown".into(),
        };
        RpcError {
            code: v.get("code").and_then(Value::as_i64).unwrap_or(-32603),
            kind,
            message: v.get("message").and_then(Value::as_str).unwrap_or("(no message)").into(),
            data,
        }
    }
}

/// What the device said went wrong; `kind` names the engine's error so that programs need not
/// read the message.
impl From<Error> for RpcError {
    fn from(e: Error) -> Self {
        let kind = match &e {
            Error::NotLoggedIn => "not_logged_in",
            Error::UnknownChat(_) => "unknown_chat",
            Error::UnknownSecret(_) => "unknown_secret",
            Error::Relay { .. } => "relay_refused",
            Error::TooLong(..) => "too_long",
            Error::NotYours(_) => "not_yours",
            Error::NotMember(_) => "not_member",
            Error::SecretNotAccepted(_) => "secret_not_accepted",
            Error::SecretChatsOff => "secret_chats_off",
            Error::NotAccepted(_) => "not_accepted",
            Error::Offline => "offline",
            Error::Net(_) => "unreachable",
            Error::SessionRevoked => "session_revoked",
            Error::SessionRefused => "session_refused",
            Error::Stopped => "stopped",
            Error::Doc(_) => "message_refused",
            Error::Store(_) => "store",
            _ => "device",
        };
        let error = RpcError::new(-32010, kind, e.to_string());
        match e {
            Error::Relay { code, .. } => error.with("relay_code", format!("{code:?}")),
            _ => error,
        }
    }
}

/// A request read from a line.
#[derive(Debug)]
pub(crate) struct Request {
    /// `None`: a notification (JSON-RPC), answered with nothing.
    pub id: Option<Value>,
    pub method: String,
    /// Always an object (`{}` when the request had none).
    pub params: Value,
}

/// Reads one request line. The error comes with the id to answer it under (`null` when the
/// line did not say).
pub(crate) fn parse(line: &str) -> Result<Request, (Value, RpcError)> {
    let v: Value = serde_json::from_str(line).map_err(|e| (Value::Null, RpcError::parse_error(e)))?;
    let Value::Object(mut o) = v else {
        let why = if v.is_array() { "batches are not supported" } else { "a request is a JSON object" };
        return Err((Value::Null, RpcError::invalid_request(why)));
    };
    let id = match o.remove("id") {
        None => None,
        Some(id @ (Value::Null | Value::Number(_) | Value::String(_))) => Some(id),
        Some(_) => return Err((Value::Null, RpcError::invalid_request("id is a number, a string or null"))),
    };
    let answer_to = id.clone().unwrap_or(Value::Null);
    if o.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err((answer_to, RpcError::invalid_request("\"jsonrpc\" must be \"2.0\"")));
    }
    let method = match o.remove("method") {
        Some(Value::String(m)) => m,
        _ => return Err((answer_to, RpcError::invalid_request("\"method\" must be a string"))),
    };
    let params = match o.remove("params") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(p @ Value::Object(_)) => p,
        Some(_) => return Err((answer_to, RpcError::bad_params("params must be an object"))),
    };
    Ok(Request { id, method, params })
}

/// A request line (the CLI's side).
pub(crate) fn request(id: u64, method: &str, params: Value) -> String {
    json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params }).to_string()
}

/// An answer line carrying a result.
pub(crate) fn result(id: Value, result: Value) -> String {
    json!({ "jsonrpc": "2.0", "id": id, "result": result }).to_string()
}

/// An answer line carrying an error.
pub(crate) fn error(id: Value, e: &RpcError) -> String {
    json!({ "jsonrpc": "2.0", "id": id, "error": e.to_value() }).to_string()
}

/// A notification line (no id: nothing answers it).
pub(crate) fn notification(method: &str, params: Value) -> String {
    json!({ "jsonrpc": "2.0", "method": method, "params": params }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(line: &str) -> (Value, String) {
        let (id, e) = parse(line).expect_err("refused");
        (id, e.kind)
    }

    #[test]
    fn requests_parse_and_bad_ones_get_their_kind_of_error_with_the_id_when_known() {
        let r = parse(r#"{"jsonrpc":"2.0","id":7,"method":"status"}"#).unwrap();
        assert_eq!((r.id, r.method.as_str(), r.params), (Some(json!(7)), "status", json!({})));
        let r = parse(r#"{"jsonrpc":"2.0","method":"send","params":{"chat":"x"}}"#).unwrap();
        assert_eq!(r.id, None, "a notification");
        assert_eq!(refused("{nope"), (Value::Null, "parse_error".into()));
        assert_eq!(refused("[1,2]"), (Value::Null, "invalid_request".into()));
        assert_eq!(refused(r#"{"id":3,"method":"status"}"#), (json!(3), "invalid_request".into()));
        assert_eq!(refused(r#"{"jsonrpc":"2.0","id":"a","method":5}"#), (json!("a"), "invalid_request".into()));
        assert_eq!(refused(r#"{"jsonrpc":"2.0","id":{},"method":"status"}"#).1, "invalid_request");
        assert_eq!(
            refused(r#"{"jsonrpc":"2.0","id":4,"method":"status","params":[1]}"#),
            (json!(4), "bad_params".into())
        );
    }

    #[test]
    fn an_error_reads_back_as_it_was_written() {
        let e = RpcError::from(Error::Relay {
            code: stratus_engine::proto::wire::ErrorCode::RateLimited,
            message: "slow".into(),
        });
        let line = error(json!(1), &e);
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["error"]["data"]["kind"], "relay_refused");
        assert_eq!(RpcError::from_value(&v["error"]), e);
    }
}
