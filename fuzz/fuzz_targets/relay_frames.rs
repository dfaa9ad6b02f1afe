//! What the relay decodes: a byte stream from a device, cut into frames by the same
//! length-delimited codec the relay's connection task uses (`relay/src/server.rs`), each frame
//! decoded as a `ClientFrame`. Never a panic; an oversized length prefix is an error that ends
//! the stream; every frame that decodes encodes again and decodes to itself.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use stratus_engine::proto::wire::{decode, encode, ClientFrame, MAX_FRAME_BYTES};
use tokio_util::codec::{Decoder, LengthDelimitedCodec};

fuzz_target!(|data: &[u8]| {
    // The codec is built inline in the relay's connection task; this is the same configuration.
    let mut codec = LengthDelimitedCodec::builder().max_frame_length(MAX_FRAME_BYTES).new_codec();
    let mut buf = BytesMut::from(data);
    // The stream ends with `data`: `decode_eof` as the relay's `Framed` does when the device hangs up.
    loop {
        let body = match codec.decode_eof(&mut buf) {
            Ok(Some(body)) => body,
            // End of stream, a truncated last frame, or an oversized prefix: the relay stops reading.
            Ok(None) | Err(_) => break,
        };
        assert!(body.len() <= MAX_FRAME_BYTES, "the codec let a frame of {} bytes through", body.len());
        if let Ok(frame) = decode::<ClientFrame>(&body) {
            let again = encode(&frame).expect("a decoded frame encodes");
            assert_eq!(decode::<ClientFrame>(&again).expect("a re-encoded frame decodes"), frame);
        }
    }
    // The frame body alone, as when the fuzzer finds a decodable frame without its prefix.
    let _ = decode::<ClientFrame>(data);
});
