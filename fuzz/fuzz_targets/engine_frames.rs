//! What the engine decodes: a byte stream from the relay, cut into frames by the same
//! length-delimited codec the engine's `RelayStream` uses (`engine/src/device/net.rs`), each
//! frame decoded as a `RelayFrame` and handed to a connected `SyncCore`. Never a panic: bytes
//! from the relay reach the sync core's decisions and must give errors, not crashes. Every frame
//! that decodes encodes again and decodes to itself.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use stratus_engine::core::{SyncCore, SyncInput};
use stratus_engine::proto::wire::{decode, encode, RelayFrame, MAX_FRAME_BYTES};
use stratus_engine::{ChatId, Seq};
use tokio_util::codec::{Decoder, LengthDelimitedCodec};

fuzz_target!(|data: &[u8]| {
    // `RelayStream::new` builds its codec privately; this is the same configuration.
    let mut codec = LengthDelimitedCodec::builder().max_frame_length(MAX_FRAME_BYTES).new_codec();
    let mut buf = BytesMut::from(data);
    let mut core = SyncCore::new(Seq(0), false);
    core.handle(SyncInput::ChatReady { chat: ChatId([1; 16]), cursor: Seq(0) });
    core.handle(SyncInput::Connected);
    loop {
        let body = match codec.decode_eof(&mut buf) {
            Ok(Some(body)) => body,
            Ok(None) | Err(_) => break,
        };
        assert!(body.len() <= MAX_FRAME_BYTES, "the codec let a frame of {} bytes through", body.len());
        if let Ok(frame) = decode::<RelayFrame>(&body) {
            let again = encode(&frame).expect("a decoded frame encodes");
            assert_eq!(decode::<RelayFrame>(&again).expect("a re-encoded frame decodes"), frame);
            core.handle(SyncInput::Frame(Box::new(frame)));
        }
    }
    let _ = decode::<RelayFrame>(data);
});
