//! Short lines for the trace (hashed, and the tail a failure prints).

use super::*;

pub(super) fn describe(ev: &Ev) -> String {
    match ev {
        Ev::ToRelay { conn, frame } => format!("c{conn} -> relay {}", short_client(frame)),
        Ev::ToDevice { conn, frame } => format!("relay -> c{conn} {}", short_relay(frame)),
        other => format!("{other:?}"),
    }
}

pub(super) fn short_client(f: &ClientFrame) -> String {
    match f {
        ClientFrame::Append { req, chat, client_seq, sealed, .. } => {
            format!("append req {req} chat {chat} cs {} ({} B {})", client_seq.0, sealed.len(), digest(sealed))
        }
        other => format!("{other:?}"),
    }
}

pub(super) fn short_relay(f: &RelayFrame) -> String {
    let seqs = |ds: &[stratus_engine::proto::wire::Delta]| ds.iter().map(|d| d.seq.0).collect::<Vec<_>>();
    match f {
        RelayFrame::Push { delta } => {
            format!("push chat {} seq {} ({})", delta.chat, delta.seq.0, digest(&delta.sealed))
        }
        RelayFrame::ChatPage { req, chat, deltas, head } => {
            format!("page req {req} chat {chat} seqs {:?} head {}", seqs(deltas), head.0)
        }
        RelayFrame::AccountPage { req, entries, head } => {
            format!(
                "account page req {req} seqs {:?} head {}",
                entries.iter().map(|e| e.seq.0).collect::<Vec<_>>(),
                head.0
            )
        }
        RelayFrame::PushAccount { entry } => format!("push account seq {}", entry.seq.0),
        other => format!("{other:?}"),
    }
}

pub(super) fn digest(b: &[u8]) -> String {
    blake3::hash(b).to_hex()[..12].to_string()
}
