//! What the engine decodes: a byte stream from the relay, cut into frames by the same
//! length-delimited codec the engine's `RelayStream` uses (`engine/src/device/net.rs`), each
//! frame decoded as a `RelayFrame` and handed to a connected `SyncCore`, and to a connected
//! `SessionCore` whose clock moves on with every frame (its timers, watchdog and app-request
//! routing see the same bytes). Never a panic: bytes from the relay reach the cores' decisions
//! and must give errors, not crashes. Every frame that decodes encodes again and decodes to
//! itself.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use stratus_engine::core::{SyncCore, SyncInput, SyncOutput};
use stratus_engine::proto::wire::{decode, encode, RelayFrame, MAX_FRAME_BYTES};
use stratus_engine::session_core::{SessionCore, SessionInput, Work};
use stratus_engine::{Action, Event};
use stratus_engine::{ChatId, Seq};
use tokio_util::codec::{Decoder, LengthDelimitedCodec};

fuzz_target!(|data: &[u8]| {
    // `RelayStream::new` builds its codec privately; this is the same configuration.
    let mut codec = LengthDelimitedCodec::builder().max_frame_length(MAX_FRAME_BYTES).new_codec();
    let mut buf = BytesMut::from(data);
    let mut core = SyncCore::new(Seq(0), false);
    core.handle(SyncInput::ChatReady { chat: ChatId([1; 16]), cursor: Seq(0) });
    core.handle(SyncInput::Connected);
    let mut session = SessionCore::new(SyncCore::new(Seq(0), false), 1);
    let mut now = 0u64;
    step(&mut session, now, SessionInput::Timeout);
    step(&mut session, now, SessionInput::Connected);
    // An app request waits too, so that answers can be routed to it.
    let _ = session.request(7, |req| stratus_engine::proto::wire::ClientFrame::ListDevices { req });
    loop {
        let body = match codec.decode_eof(&mut buf) {
            Ok(Some(body)) => body,
            Ok(None) | Err(_) => break,
        };
        assert!(body.len() <= MAX_FRAME_BYTES, "the codec let a frame of {} bytes through", body.len());
        if let Ok(frame) = decode::<RelayFrame>(&body) {
            let again = encode(&frame).expect("a decoded frame encodes");
            assert_eq!(decode::<RelayFrame>(&again).expect("a re-encoded frame decodes"), frame);
            core.handle(SyncInput::Frame(Box::new(frame.clone())));
            now += body.len() as u64 * 97;
            step(&mut session, now, SessionInput::Frame(Box::new(frame)));
            // The driver's timer fires at the wake-up asked for (frames in between may have
            // moved the clock past it). A timeout leaves nothing due at its own time: a wake-up
            // at or before it would spin the driver.
            if let Some(at) = session.next_wake() {
                now = now.max(at);
                step(&mut session, now, SessionInput::Timeout);
                if let Some(next) = session.next_wake() {
                    assert!(next > now, "a timeout at {now} left a wake-up due at {next}");
                }
            }
        }
    }
    let _ = decode::<RelayFrame>(data);
});

/// Runs an input through the session core, carrying out its sync outputs as the device would
/// for what needs no store.
fn step(session: &mut SessionCore, now: u64, input: SessionInput) -> Vec<Work> {
    let (mut work, outputs) = session.handle(now, input);
    let actions = outputs
        .into_iter()
        .filter_map(|o| match o {
            SyncOutput::Send(f) => Some(Action::Send(f)),
            SyncOutput::Reply(f) => Some(Action::Reply(f)),
            SyncOutput::RetryAfter { ms } => Some(Action::RetryAfter(ms)),
            SyncOutput::Revoked { proof: Some(_) } => Some(Action::Emit(Event::SessionRevoked)),
            SyncOutput::Revoked { proof: None } => Some(Action::Emit(Event::SessionRefused)),
            _ => None,
        })
        .collect();
    work.extend(session.actions(now, actions));
    work
}
