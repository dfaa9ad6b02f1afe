//! The relay's settings, from four layers: the defaults, a TOML file (`--config PATH`),
//! `STRATUS_RELAY_*` environment variables and command-line flags, each overriding the one
//! before.
//!
//! Every setting has one name in all four: `max_connections` in the file,
//! `STRATUS_RELAY_MAX_CONNECTIONS` in the environment, `--max-connections` on the command line.
//! The settings are flat (no tables), so that the names map one to one. A value that does not
//! parse, an unknown setting in the file or the environment, and a value the relay cannot use
//! are refused before anything starts, with a [`ConfigError`] naming the setting and where its
//! value came from.
//!
//! [`Settings::print`] writes the effective settings as TOML (`--print-config`): a file that
//! gives the same relay.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};

use crate::limits::{Limits, MAX_FRAME_BYTES, MAX_QUEUED_BYTES, MIN_APPEND_BYTES_BURST, MIN_FRAME_BYTES};
use crate::server::Config;

/// The prefix of the environment variables that set the relay's settings.
pub const ENV_PREFIX: &str = "STRATUS_RELAY_";

/// The default of [`Settings::shutdown_grace_secs`]: below Docker's 10 s before it kills a
/// container it stopped (`docker stop -t`, `stop_grace_period`) and systemd's 90 s
/// (`TimeoutStopSec`), far above the milliseconds a drain takes when devices read.
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 8;
/// The most [`Settings::shutdown_grace_secs`] may be.
pub const MAX_SHUTDOWN_GRACE_SECS: u64 = 3600;

/// How the relay writes its log lines (to standard error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields.message`, the event's fields,
    /// `target`), for log collectors.
    Json,
}

/// Every setting of the relay. `Default` gives the documented defaults; the limits' meanings
/// and defaults are [`Limits`]'s (the names here are the flags', so a few differ: `_secs` where
/// [`Limits`] keeps milliseconds, `max_fetches_in_flight` for
/// [`Limits::max_fetches_in_flight_per_device`], `max_appends_in_flight` for
/// [`Limits::max_appends_in_flight_per_device`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Directory for the sled store, the relay's identity key and its admin socket.
    pub data_dir: PathBuf,
    /// Multiaddr to listen on (TCP).
    pub listen: Multiaddr,
    /// Multiaddr to serve WebSocket on besides [`Settings::listen`], e.g.
    /// `/ip4/127.0.0.1/tcp/8080/ws` behind a reverse proxy that terminates TLS; off when unset.
    /// Plain `/ws` only: the relay holds no TLS certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen_ws: Option<Multiaddr>,
    /// Addresses devices reach the relay at besides the ones it listens on.
    pub external_addresses: Vec<Multiaddr>,
    /// Where the admin HTTP listener serves `/metrics`, `/healthz` and `/readyz`; off when
    /// unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_http: Option<SocketAddr>,
    /// Lets [`Settings::admin_http`] be an address other hosts can reach (refused otherwise:
    /// the listener has no authentication).
    pub admin_http_allow_remote: bool,
    /// How log lines are written.
    pub log_format: LogFormat,
    /// Seconds a stopping relay (SIGTERM, SIGINT) waits for what it accepted to be answered
    /// and for its devices' streams to close before it exits anyway (see `core/lifecycle.rs`).
    pub shutdown_grace_secs: u64,
    /// Where the owner-only admin socket is (`stratus-relay admin`, `backup`); unset:
    /// `<data_dir>/admin.sock`. A Unix socket's path is at most 107 bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_socket: Option<PathBuf>,
    // The limits, each under its flag's name (see `Settings::limits` for the field of
    // `Limits` it sets, and `Limits` for what it means).
    pub max_connections: u32,
    pub max_connections_per_peer: u32,
    pub max_streams_per_connection: u32,
    pub max_frame_bytes: usize,
    pub max_fetches_in_flight: u32,
    pub max_appends_in_flight: u32,
    pub requests_per_second: u32,
    pub request_burst: u32,
    pub min_session_age_secs: u64,
    pub max_reservations: u32,
    pub max_circuits: u32,
    pub max_circuits_per_peer: u32,
    pub max_circuit_secs: u32,
    pub max_circuit_bytes: u64,
    pub max_push_backlog_bytes: u64,
    pub stalled_reader_secs: u64,
    pub max_account_bytes: u64,
    pub max_chat_epochs: u32,
    pub member_change_interval_secs: u64,
    pub member_change_burst: u32,
    pub unregistered_requests_per_second: u32,
    pub unregistered_request_burst: u32,
    pub append_bytes_per_second: u64,
    pub append_bytes_burst: u64,
}

impl Default for Settings {
    fn default() -> Self {
        let l = Limits::default();
        Settings {
            data_dir: PathBuf::from("./stratus-relay-data"),
            listen: "/ip4/0.0.0.0/tcp/4001".parse().expect("a valid multiaddr"),
            listen_ws: None,
            external_addresses: Vec::new(),
            admin_http: None,
            admin_http_allow_remote: false,
            log_format: LogFormat::Text,
            shutdown_grace_secs: DEFAULT_SHUTDOWN_GRACE_SECS,
            admin_socket: None,
            max_connections: l.max_connections,
            max_connections_per_peer: l.max_connections_per_peer,
            max_streams_per_connection: l.max_streams_per_connection,
            max_frame_bytes: l.max_frame_bytes,
            max_fetches_in_flight: l.max_fetches_in_flight_per_device,
            max_appends_in_flight: l.max_appends_in_flight_per_device,
            requests_per_second: l.requests_per_second,
            request_burst: l.request_burst,
            min_session_age_secs: l.min_session_age_ms / 1000,
            max_reservations: l.max_reservations,
            max_circuits: l.max_circuits,
            max_circuits_per_peer: l.max_circuits_per_peer,
            max_circuit_secs: l.max_circuit_secs,
            max_circuit_bytes: l.max_circuit_bytes,
            max_push_backlog_bytes: l.max_push_backlog_bytes,
            stalled_reader_secs: l.stalled_reader_ms / 1000,
            max_account_bytes: l.max_account_bytes,
            max_chat_epochs: l.max_chat_epochs,
            member_change_interval_secs: l.member_change_interval_ms / 1000,
            member_change_burst: l.member_change_burst,
            unregistered_requests_per_second: l.unregistered_requests_per_second,
            unregistered_request_burst: l.unregistered_request_burst,
            append_bytes_per_second: l.append_bytes_per_second,
            append_bytes_burst: l.append_bytes_burst,
        }
    }
}

/// Why the settings cannot be used. Each names the setting and where its value came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The `--config` file cannot be read or is not TOML.
    #[error("the config file {path}: {message}")]
    File { path: PathBuf, message: String },
    /// A setting's value does not parse, or a setting is unknown.
    #[error("{0}")]
    Parse(String),
    /// A value parses but the relay cannot use it.
    #[error("invalid setting {setting} = {value} (from {origin}): {reason}")]
    Invalid { setting: &'static str, value: String, origin: String, reason: String },
}

/// Names a provider in error messages.
struct Named<P> {
    name: &'static str,
    inner: P,
}

impl<P: Provider> Provider for Named<P> {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name)
    }
    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        self.inner.data()
    }
}

/// The `STRATUS_RELAY_*` variables among `(name, value)` pairs, as settings: the name without
/// the prefix, lowercased; the value parsed as figment's own environment provider does (a
/// number, a boolean, `[a, b]` for a list, otherwise a string).
struct EnvVars(Dict);

impl EnvVars {
    fn new(vars: impl IntoIterator<Item = (String, String)>) -> Self {
        let settings = vars
            .into_iter()
            .filter_map(|(k, v)| {
                let setting = k.strip_prefix(ENV_PREFIX)?.to_ascii_lowercase();
                let value: Value = v.parse().unwrap_or_else(|never| match never {});
                Some((setting, value))
            })
            .collect();
        EnvVars(settings)
    }
}

impl Provider for EnvVars {
    fn metadata(&self) -> Metadata {
        Metadata::named(ENV)
    }
    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Map::from([(Profile::Default, self.0.clone())]))
    }
}

const ENV: &str = "the environment";
const DEFAULTS: &str = "the defaults";
const FLAGS: &str = "the command line";

impl Settings {
    /// The effective settings: the defaults, then `file` (a TOML file, when given), then the
    /// `STRATUS_RELAY_*` variables of `env` (pairs of name and value; the process's
    /// environment in the binary), then `flags` (a map of the settings given on the command
    /// line, nothing else), each overriding the one before; checked with
    /// [`Settings::validate`].
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: &impl Serialize,
    ) -> Result<Settings, ConfigError> {
        let mut figment = Figment::from(Named { name: DEFAULTS, inner: Serialized::defaults(Settings::default()) });
        if let Some(path) = file {
            // Read and parsed here first, so that a missing file and bad TOML are one-line
            // errors of their own (figment takes a missing file as an empty one, and prints
            // TOML's multi-line snippets).
            let file_error = |message: String| ConfigError::File { path: path.to_path_buf(), message };
            let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
            if let Err(e) = text.parse::<toml::Table>() {
                let at = e.span().map(|s| s.start).unwrap_or(0).min(text.len());
                let before = text.get(..at).unwrap_or("");
                let line = before.matches('\n').count() + 1;
                let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                let what = e.message().trim().replace('\n', "; ");
                return Err(file_error(format!("not valid TOML at line {line}, column {column}: {what}")));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(EnvVars::new(env));
        figment = figment.merge(Named { name: FLAGS, inner: Serialized::defaults(flags) });
        let settings: Settings = figment.extract().map_err(|e| ConfigError::Parse(describe(&e)))?;
        settings.validate(&|setting| origin(&figment, setting))?;
        Ok(settings)
    }

    /// Checks every value the types alone do not: limits that must be at least 1, the frame
    /// and backlog ranges, the admin listener's address. `origin` says where a setting's value
    /// came from, for the error.
    pub fn validate(&self, origin: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
        let invalid = |setting: &'static str, value: String, reason: String| ConfigError::Invalid {
            setting,
            value,
            origin: origin(setting),
            reason,
        };
        for (setting, v) in [
            ("max_connections", u64::from(self.max_connections)),
            ("max_connections_per_peer", u64::from(self.max_connections_per_peer)),
            ("max_streams_per_connection", u64::from(self.max_streams_per_connection)),
            ("max_fetches_in_flight", u64::from(self.max_fetches_in_flight)),
            ("max_appends_in_flight", u64::from(self.max_appends_in_flight)),
            ("request_burst", u64::from(self.request_burst)),
            ("max_circuit_secs", u64::from(self.max_circuit_secs)),
            ("stalled_reader_secs", self.stalled_reader_secs),
            ("max_chat_epochs", u64::from(self.max_chat_epochs)),
            ("member_change_burst", u64::from(self.member_change_burst)),
            ("unregistered_request_burst", u64::from(self.unregistered_request_burst)),
        ] {
            if v == 0 {
                return Err(invalid(setting, "0".into(), "must be at least 1".into()));
            }
        }
        // TOML integers are signed 64-bit: a larger value could not be written in the file nor
        // printed by --print-config. (Each is far past any use: 2^63 bytes, 2^63 s.)
        for (setting, v) in [
            ("min_session_age_secs", self.min_session_age_secs),
            ("max_circuit_bytes", self.max_circuit_bytes),
            ("stalled_reader_secs", self.stalled_reader_secs),
            ("max_account_bytes", self.max_account_bytes),
            ("member_change_interval_secs", self.member_change_interval_secs),
            ("append_bytes_per_second", self.append_bytes_per_second),
            ("append_bytes_burst", self.append_bytes_burst),
        ] {
            if i64::try_from(v).is_err() {
                return Err(invalid(setting, v.to_string(), format!("must be at most {}", i64::MAX)));
            }
        }
        if !(1..=MAX_SHUTDOWN_GRACE_SECS).contains(&self.shutdown_grace_secs) {
            return Err(invalid(
                "shutdown_grace_secs",
                self.shutdown_grace_secs.to_string(),
                format!("must be between 1 and {MAX_SHUTDOWN_GRACE_SECS}"),
            ));
        }
        if !(MIN_FRAME_BYTES..=MAX_FRAME_BYTES).contains(&self.max_frame_bytes) {
            return Err(invalid(
                "max_frame_bytes",
                self.max_frame_bytes.to_string(),
                format!("must be between {MIN_FRAME_BYTES} and {MAX_FRAME_BYTES}"),
            ));
        }
        if !(1..=MAX_QUEUED_BYTES / 2).contains(&self.max_push_backlog_bytes) {
            return Err(invalid(
                "max_push_backlog_bytes",
                self.max_push_backlog_bytes.to_string(),
                format!("must be between 1 and {}", MAX_QUEUED_BYTES / 2),
            ));
        }
        if self.append_bytes_per_second != 0 && self.append_bytes_burst < MIN_APPEND_BYTES_BURST {
            return Err(invalid(
                "append_bytes_burst",
                self.append_bytes_burst.to_string(),
                format!(
                    "must be at least {MIN_APPEND_BYTES_BURST} (the largest delta) while append_bytes_per_second is on"
                ),
            ));
        }
        if let Some(addr) = self.admin_http {
            if !addr.ip().is_loopback() && !self.admin_http_allow_remote {
                return Err(invalid(
                    "admin_http",
                    addr.to_string(),
                    "not a loopback address; the listener has no authentication, so serving it to other hosts \
                     needs admin_http_allow_remote = true"
                        .into(),
                ));
            }
        }
        if let Err(reason) = listen_addr(&self.listen, false) {
            return Err(invalid("listen", self.listen.to_string(), reason));
        }
        if let Some(ws) = &self.listen_ws {
            if let Err(reason) = listen_addr(ws, true) {
                return Err(invalid("listen_ws", ws.to_string(), reason));
            }
        }
        // What is left are the relationships between limits, which name their own fields.
        self.limits().validate().map_err(|e| ConfigError::Parse(format!("invalid settings: {e}")))
    }

    /// The limits these settings give.
    pub fn limits(&self) -> Limits {
        Limits {
            max_connections: self.max_connections,
            max_connections_per_peer: self.max_connections_per_peer,
            max_streams_per_connection: self.max_streams_per_connection,
            max_frame_bytes: self.max_frame_bytes,
            max_fetches_in_flight_per_device: self.max_fetches_in_flight,
            max_appends_in_flight_per_device: self.max_appends_in_flight,
            requests_per_second: self.requests_per_second,
            request_burst: self.request_burst,
            min_session_age_ms: self.min_session_age_secs.saturating_mul(1000),
            max_reservations: self.max_reservations,
            max_circuits: self.max_circuits,
            max_circuits_per_peer: self.max_circuits_per_peer,
            max_circuit_secs: self.max_circuit_secs,
            max_circuit_bytes: self.max_circuit_bytes,
            max_push_backlog_bytes: self.max_push_backlog_bytes,
            stalled_reader_ms: self.stalled_reader_secs.saturating_mul(1000),
            max_account_bytes: self.max_account_bytes,
            max_chat_epochs: self.max_chat_epochs,
            member_change_interval_ms: self.member_change_interval_secs.saturating_mul(1000),
            member_change_burst: self.member_change_burst,
            unregistered_requests_per_second: self.unregistered_requests_per_second,
            unregistered_request_burst: self.unregistered_request_burst,
            append_bytes_per_second: self.append_bytes_per_second,
            append_bytes_burst: self.append_bytes_burst,
        }
    }

    /// Where the admin socket is: [`Settings::admin_socket`], or `admin.sock` in the data
    /// directory.
    pub fn admin_socket_path(&self) -> PathBuf {
        self.admin_socket.clone().unwrap_or_else(|| self.data_dir.join(crate::admin::SOCKET_NAME))
    }

    /// The server's configuration from these settings.
    pub fn server_config(&self) -> Config {
        Config {
            admin_socket: self.admin_socket.clone(),
            data_dir: self.data_dir.clone(),
            listen: self.listen.clone(),
            listen_ws: self.listen_ws.clone(),
            external_addresses: self.external_addresses.clone(),
            limits: self.limits(),
            admin_http: self.admin_http,
            shutdown_grace: std::time::Duration::from_secs(self.shutdown_grace_secs),
        }
    }

    /// The settings as a TOML file that gives the same relay (`--print-config`). An unset
    /// `admin_http` is shown commented out.
    pub fn print(&self) -> String {
        let mut out = String::from("# stratus-relay effective settings (defaults < file < environment < flags)\n");
        // Validated settings always serialize (integers within i64, no maps); were one not to,
        // the reason is printed in its place rather than a panic.
        match toml::to_string(self) {
            Ok(text) => out.push_str(&text),
            Err(e) => out.push_str(&format!("# cannot print the settings as TOML: {e}\n")),
        }
        if self.admin_http.is_none() {
            out.push_str("# admin_http = \"127.0.0.1:9101\"  (unset: the admin HTTP listener is off)\n");
        }
        if self.listen_ws.is_none() {
            out.push_str("# listen_ws = \"/ip4/127.0.0.1/tcp/8080/ws\"  (unset: no WebSocket listener)\n");
        }
        if self.admin_socket.is_none() {
            out.push_str("# admin_socket = \"/run/stratus-relay/admin.sock\"  (unset: admin.sock in data_dir)\n");
        }
        out
    }
}

/// Whether the relay can listen on `addr`: an IP address (a name would have to be resolved to
/// one first, and which of its addresses to take is the operator's choice), TCP, then `/ws`
/// exactly when `ws`.
fn listen_addr(addr: &Multiaddr, ws: bool) -> Result<(), String> {
    use libp2p::multiaddr::Protocol;
    let mut parts = addr.iter();
    let ip = matches!(parts.next(), Some(Protocol::Ip4(_) | Protocol::Ip6(_)));
    let tcp = matches!(parts.next(), Some(Protocol::Tcp(_)));
    let rest: Vec<Protocol> = parts.collect();
    let (form, ok) = match ws {
        false => ("/ip4/ADDR/tcp/PORT or /ip6/ADDR/tcp/PORT", rest.is_empty()),
        true => ("/ip4/ADDR/tcp/PORT/ws or /ip6/ADDR/tcp/PORT/ws", matches!(rest[..], [Protocol::Ws(_)])),
    };
    if ws && matches!(rest[..], [Protocol::Wss(_)] | [Protocol::Tls, Protocol::Ws(_)]) {
        return Err("the relay serves plain /ws only: let a reverse proxy terminate TLS (wss) in front of it".into());
    }
    match ip && tcp && ok {
        true => Ok(()),
        false => Err(format!("must be {form}")),
    }
}

/// Where `setting`'s effective value came from, for an error message.
fn origin(figment: &Figment, setting: &str) -> String {
    match figment.find_metadata(setting) {
        Some(md) => describe_source(md, setting),
        None => DEFAULTS.into(),
    }
}

fn describe_source(md: &Metadata, setting: &str) -> String {
    if md.name == FLAGS {
        format!("the command line, --{}", setting.replace('_', "-"))
    } else if md.name == ENV {
        format!("the environment, {ENV_PREFIX}{}", setting.to_ascii_uppercase())
    } else if let Some(source) = &md.source {
        format!("{} {source}", md.name)
    } else {
        md.name.to_string()
    }
}

/// One line per error figment found, each naming the setting and where its value came from.
fn describe(e: &figment::Error) -> String {
    e.clone()
        .into_iter()
        .map(|e| {
            let setting = e.path.last().cloned();
            let from = e.metadata.as_ref().map(|md| describe_source(md, setting.as_deref().unwrap_or("")));
            match (&e.kind, setting, from) {
                (figment::error::Kind::UnknownField(name, _), _, from) => format!(
                    "unknown setting `{name}`{}; `stratus-relay --print-config` lists every setting",
                    from.map(|f| format!(" (in {f})")).unwrap_or_default()
                ),
                (kind, Some(setting), Some(from)) => {
                    format!("invalid setting {setting} (from {from}): {kind}")
                }
                (kind, Some(setting), None) => format!("invalid setting {setting}: {kind}"),
                (kind, None, _) => format!("invalid settings: {kind}"),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(pairs: &[(&str, toml::Value)]) -> toml::Table {
        pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    #[test]
    fn the_defaults_are_the_limits_defaults_and_valid() {
        let s = Settings::load(None, [], &toml::Table::new()).unwrap();
        assert_eq!(s, Settings::default());
        assert_eq!(s.limits(), Limits::default());
    }

    #[test]
    fn flags_override_the_environment_which_overrides_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("relay.toml");
        std::fs::write(&file, "max_connections = 11\nrequest_burst = 12\nmax_circuits = 13\n").unwrap();
        let env = [
            ("STRATUS_RELAY_REQUEST_BURST".to_string(), "22".to_string()),
            ("STRATUS_RELAY_MAX_CIRCUITS".to_string(), "23".to_string()),
            ("OTHER_MAX_CONNECTIONS".to_string(), "99".to_string()),
        ];
        let s = Settings::load(Some(&file), env, &flags(&[("max_circuits", 33.into())])).unwrap();
        assert_eq!((s.max_connections, s.request_burst, s.max_circuits), (11, 22, 33));
    }

    #[test]
    fn a_bad_value_names_the_setting_and_its_origin() {
        let env = [("STRATUS_RELAY_MAX_CONNECTIONS".to_string(), "lots".to_string())];
        let e = Settings::load(None, env, &toml::Table::new()).unwrap_err().to_string();
        assert!(e.contains("max_connections") && e.contains("STRATUS_RELAY_MAX_CONNECTIONS"), "{e}");

        let huge = [("STRATUS_RELAY_MAX_ACCOUNT_BYTES".to_string(), u64::MAX.to_string())];
        let e = Settings::load(None, huge, &toml::Table::new()).unwrap_err().to_string();
        assert!(e.contains("max_account_bytes") && e.contains("at most"), "{e}");

        let e = Settings::load(None, [], &flags(&[("max_chat_epochs", 0.into())])).unwrap_err().to_string();
        assert!(e.contains("max_chat_epochs = 0") && e.contains("--max-chat-epochs"), "{e}");

        let small = [("STRATUS_RELAY_APPEND_BYTES_BURST".to_string(), "1000".to_string())];
        let e = Settings::load(None, small, &toml::Table::new()).unwrap_err().to_string();
        assert!(e.contains("append_bytes_burst = 1000") && e.contains("largest delta"), "{e}");
        let off = [
            ("STRATUS_RELAY_APPEND_BYTES_BURST".to_string(), "1000".to_string()),
            ("STRATUS_RELAY_APPEND_BYTES_PER_SECOND".to_string(), "0".to_string()),
        ];
        assert!(Settings::load(None, off, &toml::Table::new()).is_ok(), "no burst is needed with the rate off");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("relay.toml");
        std::fs::write(&file, "max_conections = 1\n").unwrap();
        let e = Settings::load(Some(&file), [], &toml::Table::new()).unwrap_err().to_string();
        assert!(e.contains("unknown setting `max_conections`") && e.contains("relay.toml"), "{e}");

        let e = Settings::load(Some(&dir.path().join("missing.toml")), [], &toml::Table::new()).unwrap_err();
        assert!(matches!(e, ConfigError::File { .. }), "{e}");

        std::fs::write(&file, "max_chat_epochs = 5\nmax_connections = \n").unwrap();
        let e = Settings::load(Some(&file), [], &toml::Table::new()).unwrap_err().to_string();
        assert!(e.contains("relay.toml") && e.contains("line 2, column 19") && !e.contains('\n'), "{e}");
    }

    #[test]
    fn the_admin_listener_stays_on_loopback_unless_allowed() {
        let remote = flags(&[("admin_http", "0.0.0.0:9101".into())]);
        let e = Settings::load(None, [], &remote).unwrap_err().to_string();
        assert!(e.contains("admin_http") && e.contains("loopback"), "{e}");
        let allowed = flags(&[("admin_http", "0.0.0.0:9101".into()), ("admin_http_allow_remote", true.into())]);
        assert!(Settings::load(None, [], &allowed).is_ok());
        assert!(Settings::load(None, [], &flags(&[("admin_http", "[::1]:9101".into())])).is_ok());
    }

    #[test]
    fn printed_settings_read_back_the_same() {
        let s = Settings {
            admin_http: Some("127.0.0.1:9101".parse().unwrap()),
            external_addresses: vec!["/ip4/192.0.2.1/tcp/4001".parse().unwrap()],
            log_format: LogFormat::Json,
            max_connections: 77,
            ..Settings::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("printed.toml");
        std::fs::write(&file, s.print()).unwrap();
        assert_eq!(Settings::load(Some(&file), [], &toml::Table::new()).unwrap(), s);
        assert!(Settings::default().print().contains("# admin_http ="));
        let ws = Settings { listen_ws: Some("/ip4/127.0.0.1/tcp/8080/ws".parse().unwrap()), ..Settings::default() };
        std::fs::write(&file, ws.print()).unwrap();
        assert_eq!(Settings::load(Some(&file), [], &toml::Table::new()).unwrap(), ws);
    }

    #[test]
    fn listen_addresses_the_relay_cannot_serve_are_refused_by_name() {
        let refused = |setting: &str, v: &str| {
            let e = Settings::load(None, [], &flags(&[(setting, v.into())])).unwrap_err().to_string();
            assert!(e.contains(setting), "{e}");
            e
        };
        assert!(refused("listen_ws", "/ip4/127.0.0.1/tcp/8080/wss").contains("reverse proxy"));
        assert!(refused("listen_ws", "/ip4/127.0.0.1/tcp/8080").contains("/ws"));
        assert!(refused("listen", "/ip4/127.0.0.1/tcp/8080/ws").contains("must be"));
        assert!(refused("listen", "/dns4/example.com/tcp/4001").contains("must be"));
        for ok in [("listen_ws", "/ip6/::1/tcp/0/ws"), ("listen", "/ip4/0.0.0.0/tcp/4001")] {
            assert!(Settings::load(None, [], &flags(&[(ok.0, ok.1.into())])).is_ok(), "{ok:?}");
        }
    }
}
