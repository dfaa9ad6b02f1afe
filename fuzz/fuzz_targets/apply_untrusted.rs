//! Arbitrary bytes into the only door through which outside bytes reach Automerge: it must
//! return an error or apply, never panic, hang or allocate without bound; and whatever it
//! accepts, the document must still save and load back (a snapshot that does not load makes
//! the chat unreadable on the device).
#![no_main]

use libfuzzer_sys::fuzz_target;
use stratus_engine::doc::{Author, ChatDoc};
use stratus_engine::{AccountId, ChatId, DeviceId};

fuzz_target!(|data: &[u8]| {
    let chat = ChatId([1; 16]);
    let device = DeviceId("fuzz".into());
    let mut doc = ChatDoc::new(chat, &device);
    // An own change with a present-day time, as every real document has.
    doc.set_title("t", 1_700_000_000_000);
    // Sent by another member's device, whatever actor the bytes carry (the authorship rules
    // still apply).
    let from = Author { account: AccountId([2; 16]), device: DeviceId("peer".into()) };
    doc.fuzz_trust_sender(data, &from);
    if doc.apply_untrusted(data, &from).is_ok() {
        let loaded =
            ChatDoc::load(chat, &device, Some(&doc.save()), &[], &[]).expect("an accepted change saves and loads");
        assert_eq!(loaded.heads(), doc.heads());
        assert_eq!(loaded.messages(), doc.messages());
    }
    if !doc.is_poisoned() {
        let _ = doc.messages();
    }
});
