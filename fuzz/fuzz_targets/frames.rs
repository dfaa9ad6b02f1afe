//! Arbitrary bytes as a frame body, both directions: a typed error or a frame, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stratus_engine::proto::wire::{decode, ClientFrame, RelayFrame};

fuzz_target!(|data: &[u8]| {
    let _ = decode::<ClientFrame>(data);
    let _ = decode::<RelayFrame>(data);
});
