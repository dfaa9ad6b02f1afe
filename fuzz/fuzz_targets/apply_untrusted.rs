//! Arbitrary bytes into the only door through which outside bytes reach Automerge: it must
//! return an error or apply, never panic, hang or allocate without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stratus_engine::doc::ChatDoc;
use stratus_engine::{ChatId, DeviceId};

fuzz_target!(|data: &[u8]| {
    let mut doc = ChatDoc::new(ChatId([1; 16]), &DeviceId("fuzz".into()));
    let _ = doc.apply_untrusted(data);
    if !doc.is_poisoned() {
        let _ = doc.messages();
    }
});
