//! The group commit (`group_commit.rs`) on a device driven by hand: writes staged and not yet
//! durable stay away from the relay, whether the core would load them from the store or not,
//! and go once their barrier is done, in client-seq order.

use super::*;
use crate::device::core::{SyncCore, SyncInput, SyncOutput};
use crate::device::drive::Action;
use crate::device::group_commit::BarrierStart;
use crate::device::kv::MemDisk;
use crate::proto::ids::{AccountId, ChatId, ClientSeq, Seq};
use crate::proto::wire::{ClientFrame, RelayFrame, PROTOCOL_VERSION};

/// A device logged in as the first of a new account of its own (no relay involved), its login
/// stored.
fn device(disk: &MemDisk) -> Device {
    let mut d = Device::open_mem(disk, 5).unwrap();
    super::secret::tests::log_in(&mut d, "d");
    d.store.set_login(d.login().unwrap()).unwrap();
    d
}

/// The client seqs of the appends and chat creations among `actions`.
fn sent(actions: &[Action]) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(ClientFrame::Append { client_seq, .. } | ClientFrame::CreateChat { client_seq, .. }) => {
                Some(client_seq.0)
            }
            _ => None,
        })
        .collect()
}

/// Connects `core` to a relay that knows `chat` at seq 0 and carries out what it asks.
fn connect(d: &mut Device, core: &mut SyncCore, chat: ChatId) -> Vec<Action> {
    let mut actions = Vec::new();
    let out = core.handle(SyncInput::Connected);
    actions.extend(d.carry_out(core, out));
    let hello = RelayFrame::Hello {
        version: PROTOCOL_VERSION,
        account: Some(AccountId([2; 16])),
        incarnation: Default::default(),
    };
    let out = core.handle(SyncInput::Frame(Box::new(hello)));
    let req = out
        .iter()
        .find_map(|o| match o {
            SyncOutput::Send(ClientFrame::SyncState { req }) => Some(*req),
            _ => None,
        })
        .expect("asks for the relay's state");
    actions.extend(d.carry_out(core, out));
    let state = RelayFrame::SyncState { req, account_head: Seq(0), chats: vec![(chat, Seq(0))], restored: None };
    let out = core.handle(SyncInput::Frame(Box::new(state)));
    actions.extend(d.carry_out(core, out));
    actions
}

fn send(text: &str) -> MessageOp {
    MessageOp::Send { text: text.into(), reply_to: None }
}

#[test]
fn staged_writes_reach_the_relay_only_after_their_barrier_and_in_order() {
    let disk = MemDisk::new();
    let mut d = device(&disk);
    let mut offline = d.start_core().unwrap();
    let (chat, _) = d.create_chat(&mut offline, "t").unwrap();
    let made: Vec<u64> = d.store.outbox_after(ClientSeq(0), 10).unwrap().iter().map(|i| i.client_seq.0).collect();
    assert!(!made.is_empty() && !d.writes_unsettled());

    d.stage_batch(vec![(chat, send("a")), (chat, send("b"))]);
    d.stage_batch(vec![(chat, send("c"))]);
    assert!(d.writes_unsettled());
    assert!(disk.unsynced() > 0, "stored, not durable");
    let first = *made.last().unwrap() + 1;
    assert_eq!(d.durable_bound(), Some(ClientSeq(first)));

    // A core started now loads the outbox from the store: only what is durable.
    let mut core = d.start_core().unwrap();
    let actions = connect(&mut d, &mut core, chat);
    assert_eq!(sent(&actions), made, "the chat's creation goes, the staged writes wait");

    // One barrier covers both batches; a second start while it runs does nothing.
    let BarrierStart::Run(barrier) = d.start_barrier() else { panic!("a barrier is owed") };
    d.stage_batch(vec![(chat, send("d"))]);
    assert!(matches!(d.start_barrier(), BarrierStart::Nothing), "one barrier at a time");
    barrier.barrier().unwrap();
    let (answers, actions) = d.barrier_done(&mut core, Ok(()));
    let seqs: Vec<Vec<u64>> = answers.iter().map(|a| a.iter().map(|w| w.as_ref().unwrap().1 .0).collect()).collect();
    assert_eq!(seqs, vec![vec![first, first + 1], vec![first + 2]], "both batches answered, in order");
    assert_eq!(sent(&actions), vec![first, first + 1, first + 2]);
    assert_eq!(d.durable_bound(), Some(ClientSeq(first + 3)), "the batch staged meanwhile still waits");

    // The next barrier, failed: the batch is answered with the error and nothing is sent.
    let BarrierStart::Run(_) = d.start_barrier() else { panic!("a barrier is owed") };
    let (answers, actions) = d.barrier_done(&mut core, Err("disk full".into()));
    assert!(matches!(&answers[..], [a] if matches!(&a[..], [Err(Error::NotDurable(_))])), "{answers:?}");
    assert!(sent(&actions).is_empty());
    assert!(!d.writes_unsettled());
    assert!(matches!(d.start_barrier(), BarrierStart::Nothing));
}
