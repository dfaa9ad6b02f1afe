//! Devices' checkpoints of their account log (issue 15, item 8; `core/checkpoints.rs`), driven
//! through the core: logged and pushed to the account's devices once durable; refused when
//! another device's, past the log, not past the last checkpoint, or not signed by the account.

use stratus_engine::proto::account_chain::ChainHash;
use stratus_engine::proto::cert::AccountKeys;

use super::sessions::error_codes;
use super::*;

#[test]
fn checkpoints_are_logged_once_per_position_and_only_the_accounts_own() {
    let mut w = world();
    let a = w.connect(1, "a");
    let (keys, _) = w.account(&a);
    let b = w.second_device(&keys, 2, "b");
    let head = w.core.accounts[&keys.public().id].log_head;
    assert!(head > Seq(0), "the account's creation logged entries");
    let hash = ChainHash([5; 32]);
    let frame = |req, seq, by: &Dev, keys: &AccountKeys| ClientFrame::Checkpoint {
        req,
        checkpoint: keys.sign_checkpoint(seq, hash, by.id.clone()),
    };

    // Refused, and nothing written: another device's, past the log, signed by a stranger.
    let stranger = AccountKeys::generate(&mut w.rng);
    let refusals = [
        w.frame(a.conn, frame(1, head, &b, &keys)),
        w.frame(a.conn, frame(2, head.next(), &a, &keys)),
        w.frame(a.conn, frame(3, head, &a, &stranger)),
    ];
    let codes: Vec<_> = refusals.iter().flat_map(|e| error_codes(e)).map(|(_, c)| c).collect();
    assert_eq!(codes, [ErrorCode::ProtocolViolation, ErrorCode::ProtocolViolation, ErrorCode::BadCertificate]);
    assert!(refusals.iter().flatten().all(|e| !matches!(e, Effect::Write { .. })));

    // Logged, and pushed to both devices once durable.
    let e = w.frame(a.conn, frame(4, head, &a, &keys));
    assert!(sends(&e).is_empty(), "nothing before the barrier: {e:?}");
    let released = w.durable(&e);
    let pushed = |conn| {
        sends(&released).iter().any(|(c, f)| {
            *c == conn
                && matches!(f, RelayFrame::PushAccount { entry: AccountEntry { seq, event: AccountEvent::Checkpoint { checkpoint } } }
                    if *seq == head.next() && checkpoint.seq == head && checkpoint.hash == hash)
        })
    };
    assert!(pushed(a.conn) && pushed(b.conn), "{released:?}");
    assert!(sends(&released).iter().any(|(c, f)| *c == a.conn && matches!(f, RelayFrame::Done { req: 4 })));

    // One per position: `b`'s at the same position, or at the checkpoint's own, is refused;
    // after another entry, it is taken.
    for (req, seq) in [(5, head), (6, head.next())] {
        let e = w.frame(b.conn, frame(req, seq, &b, &keys));
        assert_eq!(error_codes(&e), vec![(b.conn, ErrorCode::AlreadyExists)], "{e:?}");
    }
    let recovery = ClientFrame::PutRecovery {
        req: 7,
        lookup_id: [1; 32],
        public: [1; 32],
        signature: keys.sign_recovery(&[1; 32], &a.id),
        sealed: vec![1; 10],
    };
    let e = w.frame(a.conn, recovery);
    w.durable(&e);
    let later = w.core.accounts[&keys.public().id].log_head;
    let e = w.frame(b.conn, frame(8, later, &b, &keys));
    assert!(error_codes(&e).is_empty(), "{e:?}");
    assert_eq!(w.core.accounts[&keys.public().id].log_head, later.next());
}
