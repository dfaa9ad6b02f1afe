//! The admin socket's client: what `stratus-relay admin …` and `stratus-relay backup` send to
//! the running relay (see `crate::admin` for the protocol), and the lines they print. Every
//! failure is one line saying what to do.

use std::path::Path;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Longest answer read (a listing of every account is one line).
const MAX_ANSWER_BYTES: u64 = 256 * 1024 * 1024;

/// Sends `request` to the relay whose admin socket is `socket` and returns its `result`, or
/// the one-line error to print.
pub async fn request(socket: &Path, request: &Value) -> Result<Value, String> {
    let at = socket.display();
    let mut stream = UnixStream::connect(socket).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!(
            "no relay answers on {at} (there is no such socket): start the relay, or give the --data-dir (or \
             --admin-socket, --config) it runs with"
        ),
        std::io::ErrorKind::ConnectionRefused => {
            format!("no relay answers on {at}: it is not running (a relay that was killed leaves its socket behind)")
        }
        std::io::ErrorKind::PermissionDenied => format!(
            "permission denied on {at}: only the user the relay runs as may use its admin socket (run this as that \
             user)"
        ),
        _ => format!("cannot reach the relay's admin socket {at}: {e}"),
    })?;
    let line = format!("{request}\n");
    // A relay that refuses the connection (another user's) answers without reading the
    // request and closes: the answer is read even when the request could not be written.
    let wrote = stream.write_all(line.as_bytes()).await;
    let mut answer = String::new();
    let read = BufReader::new(stream).take(MAX_ANSWER_BYTES).read_line(&mut answer).await;
    if answer.is_empty() {
        return Err(match (wrote, read) {
            (Err(e), _) => format!("asking the relay: {e}"),
            (_, Err(e)) => format!("reading the relay's answer: {e}"),
            _ => "the relay closed the admin connection without an answer".into(),
        });
    }
    let answer: Value =
        serde_json::from_str(&answer).map_err(|e| format!("the relay's answer is not JSON ({e}): {answer:?}"))?;
    match (answer.get("ok").and_then(Value::as_bool), answer.get("result"), answer.get("error")) {
        (Some(true), Some(result), _) => Ok(result.clone()),
        (Some(false), _, Some(error)) => {
            let text = |k: &str| error.get(k).and_then(Value::as_str).unwrap_or("?").replace('\n', " ");
            Err(format!("{} ({})", text("message"), text("code")))
        }
        _ => Err(format!("the relay answered {answer}")),
    }
}

/// Asks the relay for a backup into `to` (`stratus-relay backup`): `(store id, generation)`.
pub async fn backup(socket: &Path, to: &Path) -> Result<(String, u64), String> {
    let to = std::path::absolute(to).map_err(|e| format!("{}: {e}", to.display()))?;
    let result = request(socket, &serde_json::json!({ "command": "backup", "to": to })).await?;
    let store = result.get("store").and_then(Value::as_str).unwrap_or("?").to_string();
    Ok((store, result.get("generation").and_then(Value::as_u64).unwrap_or(0)))
}

fn str_of<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

fn u64_of(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

/// Bytes for people: `1.5 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// A time in ms since the Unix epoch as `2026-12-07 18:20:05 UTC`; `never`/`unknown` for 0.
pub fn utc(ms: u64) -> String {
    if ms == 0 {
        return "unknown".into();
    }
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC", rest / 3600, rest % 3600 / 60, rest % 60)
}

/// One account of a listing, on its own line, its devices on the lines after it.
pub fn account_lines(a: &Value) -> String {
    let devices = a.get("devices").and_then(Value::as_array).cloned().unwrap_or_default();
    let online = devices.iter().filter(|d| d.get("online").and_then(Value::as_bool) == Some(true)).count();
    let name = a.get("username").and_then(Value::as_str).map(|n| format!(" ({n})")).unwrap_or_default();
    let mut status = str_of(a, "status").to_string();
    if a.get("deleted").and_then(Value::as_bool) == Some(true) {
        status = if status == "banned" { "deleted, banned".into() } else { "deleted".into() };
    }
    let quota = match (u64_of(a, "quota_bytes"), a.get("own_quota").and_then(Value::as_bool) == Some(true)) {
        (0, own) => format!("no quota{}", if own { " (its own)" } else { "" }),
        (q, true) => format!("of {} (its own quota)", bytes(q)),
        (q, false) => format!("of {}", bytes(q)),
    };
    let mut out = format!(
        "{}{name}: {status}, {} device{} ({online} online), {} chat{}, {} stored {quota}, last active {}",
        str_of(a, "account"),
        devices.len(),
        if devices.len() == 1 { "" } else { "s" },
        u64_of(a, "chats"),
        if u64_of(a, "chats") == 1 { "" } else { "s" },
        bytes(u64_of(a, "stored_bytes")),
        utc(u64_of(a, "last_active_ms")),
    );
    for d in &devices {
        let state = match (d.get("revoked").and_then(Value::as_bool), d.get("online").and_then(Value::as_bool)) {
            (Some(true), _) => "session ended".to_string(),
            (_, Some(true)) => "online".to_string(),
            _ => format!("last active {}", utc(u64_of(d, "last_active_ms"))),
        };
        out.push_str(&format!(
            "\n  device {} {:?}: registered {}, {state}",
            str_of(d, "device"),
            str_of(d, "name"),
            utc(u64_of(d, "registered_ms"))
        ));
    }
    out
}

/// What `admin accounts` prints.
pub fn accounts_text(result: &Value) -> String {
    let all = result.get("accounts").and_then(Value::as_array).cloned().unwrap_or_default();
    if all.is_empty() {
        return "no accounts".into();
    }
    all.iter().map(account_lines).collect::<Vec<_>>().join("\n")
}

/// What a command that changed an account prints, `done` saying what it did.
pub fn account_text(result: &Value, done: &str) -> String {
    let a = result.get("account").cloned().unwrap_or_default();
    format!("{done}\n{}", account_lines(&a))
}

/// What `admin delete` prints.
pub fn deleted_text(result: &Value) -> String {
    let d = result.get("deleted").cloned().unwrap_or_default();
    format!(
        "account {} deleted: its {} device(s), account log and records, and {} chat(s) only it was in ({} message \
         deltas) are gone; {} chat(s) shared with other accounts are kept for them",
        str_of(&d, "account"),
        u64_of(&d, "devices"),
        u64_of(&d, "chats_deleted"),
        u64_of(&d, "deltas_deleted"),
        u64_of(&d, "chats_kept"),
    )
}

/// What `admin registration` prints.
pub fn registration_text(result: &Value) -> String {
    let mode = str_of(result, "registration");
    let invites = u64_of(result, "invites");
    match mode {
        "open" => format!("registration: open (anyone may make an account; {invites} unused invite token(s))"),
        "invite" => format!("registration: invite (a new account needs an invite token; {invites} unused)"),
        "closed" => format!("registration: closed (no new accounts; {invites} unused invite token(s))"),
        other => format!("registration: {other}"),
    }
}

/// The unused invite tokens, one a line (`ID  made TIME`), after a line saying how many.
pub fn invites_text(result: &Value) -> String {
    let invites = result.get("invites").and_then(Value::as_array).cloned().unwrap_or_default();
    let mut out =
        format!("{} unused invite token(s); registration is {}", invites.len(), str_of(result, "registration"));
    for i in &invites {
        out.push_str(&format!("\n{}  made {}", str_of(i, "id"), utc(u64_of(i, "created_ms"))));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_sizes_read_well() {
        assert_eq!(utc(0), "unknown");
        assert_eq!(utc(1), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_796_668_805_000), "2026-12-07 18:40:05 UTC");
        assert_eq!(bytes(1000), "1000 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(1 << 30), "1.0 GiB");
    }

    #[tokio::test]
    async fn a_missing_socket_is_one_clear_line() {
        let dir = tempfile::tempdir().unwrap();
        let e = request(&dir.path().join("admin.sock"), &serde_json::json!({"command": "accounts"})).await;
        let e = e.unwrap_err();
        assert!(e.contains("no relay answers") && e.contains("no such socket") && !e.contains('\n'), "{e}");
    }
}
