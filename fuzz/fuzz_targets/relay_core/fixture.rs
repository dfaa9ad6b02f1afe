//! The fixture of the `relay_core` target: two accounts and every valid frame the harness can
//! send, built once. Split out of `relay_core.rs` for size.

use stratus_engine::proto::account_chain::ChainHash;

use super::*;

/// Two accounts and every valid frame the harness can send, built once.
pub(super) struct Fixture {
    pub(super) devices: Vec<DeviceId>,
    pub(super) create_account: Vec<(AccountPublic, DeviceCert)>,
    pub(super) chats: Vec<ChatId>,
    pub(super) create_chat: Vec<(ChatId, Epoch, Vec<WrappedKey>)>,
    pub(super) link_wait: Vec<([u8; 32], [u8; 32])>,
    pub(super) link_approve: Vec<([u8; 32], DeviceCert)>,
    /// Revocations with rotations: covering every device of the account but the revoked one,
    /// or only the revoking one; with and without a recovery bundle.
    pub(super) revoke: Vec<(Revocation, Rotation, Vec<NewEpoch>, Option<Vec<u8>>)>,
    /// A recovery key's public half signed for one device: (public, device index, signature).
    pub(super) put_recovery: Vec<([u8; 32], Vec<u8>)>,
    /// Directory and member requests (with req 0, replaced when sent).
    pub(super) members: Vec<ClientFrame>,
}

pub(super) fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let mut rng = StdRng::seed_from_u64(3);
        let devices: Vec<DeviceId> = (0..4).map(|i| DeviceId(format!("device-{i}"))).collect();
        let a = AccountKeys::generate(&mut rng);
        let b = AccountKeys::generate(&mut rng);
        let cert = |keys: &AccountKeys, device: &DeviceId, x: u8| {
            keys.certify(DeviceCertBody {
                account: keys.public().id,
                device: device.clone(),
                device_x25519: [x; 32],
                name: "d".into(),
                created_ms: 0,
            })
        };
        let chats: Vec<ChatId> = (0..3).map(|_| ChatId::random(&mut rng)).collect();
        let mut key_for = |signer: &AccountKeys, terms: &KeyTerms, to: &[&AccountKeys]| {
            let key = ChatKey::random(&mut rng);
            to.iter().map(|m| signer.grant_chat_key(&key, terms, &m.current(), true, &mut rng)).collect::<Vec<_>>()
        };
        let mut key = |signer: &AccountKeys, members: &[&AccountKeys], chat: ChatId, epoch: Epoch| {
            let kind = if members.len() == 1 { ChatKind::Notes } else { ChatKind::Direct };
            let terms = KeyTerms { chat, kind, epoch, members: members.iter().map(|m| m.public().id).collect() };
            key_for(signer, &terms, members)
        };
        let create_chat = vec![
            (chats[0], Epoch(0), key(&a, &[&a], chats[0], Epoch(0))),
            (chats[1], Epoch(0), key(&b, &[&b], chats[1], Epoch(0))),
            (chats[0], Epoch(1), key(&a, &[&a], chats[0], Epoch(1))),
            // Signed by the wrong account.
            (chats[2], Epoch(0), key(&b, &[&a], chats[2], Epoch(0))),
            // A direct chat of the two accounts.
            (chats[2], Epoch(0), key(&a, &[&a, &b], chats[2], Epoch(0))),
        ];
        // The direct chat (chats[2]): A leaves, B starts epoch 1 alone; or B leaves, A does.
        let mut members = vec![
            ClientFrame::SetUsername { req: 0, name: Some("ann".into()) },
            ClientFrame::SetUsername { req: 0, name: Some("Bad Name".into()) },
            ClientFrame::SetUsername { req: 0, name: None },
            ClientFrame::Lookup { req: 0, username: "ann".into() },
            ClientFrame::LookupAccounts { req: 0, accounts: vec![a.public().id, b.public().id, AccountId([7; 16])] },
            ClientFrame::AccountDevices { req: 0, account: b.public().id },
            ClientFrame::AccountDevices { req: 0, account: AccountId([7; 16]) },
            // Consent: either account accepting (or no longer) the other, inviting it, listing.
            ClientFrame::Accept { req: 0, account: a.public().id, accept: true },
            ClientFrame::Accept { req: 0, account: b.public().id, accept: true },
            ClientFrame::Accept { req: 0, account: a.public().id, accept: false },
            ClientFrame::Invite { req: 0, account: a.public().id },
            ClientFrame::Invite { req: 0, account: b.public().id },
            ClientFrame::ListInvitations { req: 0 },
            // Account log checkpoints: the device's own or another's, within the log or past
            // it, the account's or signed by the other account.
            ClientFrame::Checkpoint {
                req: 0,
                checkpoint: a.sign_checkpoint(Seq(1), ChainHash([1; 32]), devices[0].clone()),
            },
            ClientFrame::Checkpoint {
                req: 0,
                checkpoint: a.sign_checkpoint(Seq(3), ChainHash([2; 32]), devices[1].clone()),
            },
            ClientFrame::Checkpoint {
                req: 0,
                checkpoint: b.sign_checkpoint(Seq(1_000), ChainHash([3; 32]), devices[2].clone()),
            },
            ClientFrame::Checkpoint {
                req: 0,
                checkpoint: b.sign_checkpoint(Seq(2), ChainHash([4; 32]), devices[0].clone()),
            },
        ];
        for (leaver, stayer) in [(&a, &b), (&b, &a)] {
            let chat = chats[2];
            let body = MemberChangeBody {
                chat,
                base_epoch: Epoch(0),
                seq: 0,
                by: leaver.public().id,
                change: Membership::Leave,
            };
            members.push(ClientFrame::ChangeMembers { req: 0, change: leaver.sign_member_change(body) });
            let epoch = Epoch(1);
            let terms = KeyTerms { chat, kind: ChatKind::Direct, epoch, members: [stayer.public().id].into() };
            let keys = key_for(stayer, &terms, &[stayer]);
            members.push(ClientFrame::Rekey { req: 0, epoch: NewEpoch { chat, epoch, keys }, history: Vec::new() });
        }
        let revocation = |keys: &AccountKeys, device: usize, by: usize| {
            keys.revoke(RevocationBody {
                account: keys.public().id,
                device: devices[device].clone(),
                by: devices[by].clone(),
                at_ms: 0,
            })
        };
        let revocations = [
            (&a, revocation(&a, 1, 0), [0, 1], chats[0]),
            (&a, revocation(&a, 0, 1), [0, 1], chats[0]),
            (&b, revocation(&b, 3, 2), [2, 3], chats[1]),
            // Signed by the wrong account; naming itself; naming another account's device.
            (&a, revocation(&b, 1, 0), [0, 1], chats[0]),
            (&a, revocation(&a, 0, 0), [0, 1], chats[0]),
            (&a, revocation(&a, 2, 0), [0, 1], chats[0]),
        ];
        let mut revoke = Vec::new();
        for (keys, r, account_devices, chat) in revocations {
            let next = keys.rotated(&mut rng).expect("a first rotation");
            let new: AccountGen = next.current();
            let epoch = Epoch(1);
            let terms = KeyTerms { chat, kind: ChatKind::Notes, epoch, members: [new.account].into() };
            let chats = vec![NewEpoch {
                chat,
                epoch,
                keys: vec![next.grant_chat_key(&ChatKey::random(&mut rng), &terms, &new, true, &mut rng)],
            }];
            let all: Vec<&DeviceId> =
                account_devices.iter().map(|d| &devices[*d]).filter(|d| **d != r.body.device).collect();
            for bundles in [all, vec![&r.body.by]] {
                let mut rotation = keys.sign_rotation(&next);
                rotation.bundles = bundles
                    .into_iter()
                    .map(|d| (d.clone(), SealedBox { ephemeral: [6; 32], sealed: vec![7; 90] }))
                    .collect();
                for recovery in [None, Some(vec![8; 70])] {
                    revoke.push((r.clone(), rotation.clone(), chats.clone(), recovery));
                }
            }
        }
        let put_recovery = [(&a, 0), (&a, 1), (&b, 2), (&b, 3)]
            .into_iter()
            .map(|(keys, d)| ([d as u8; 32], keys.sign_recovery(&[d as u8; 32], &devices[d])))
            .collect();
        Fixture {
            revoke,
            put_recovery,
            create_account: vec![
                (a.public(), cert(&a, &devices[0], 1)),
                (b.public(), cert(&b, &devices[2], 2)),
                (a.public(), cert(&a, &devices[1], 9)),
                (b.public(), cert(&a, &devices[3], 3)),
            ],
            chats,
            create_chat,
            members,
            link_wait: vec![([1; 32], [9; 32]), ([3; 32], [7; 32])],
            link_approve: vec![
                ([1; 32], cert(&a, &devices[1], 9)),
                ([3; 32], cert(&b, &devices[3], 7)),
                ([3; 32], cert(&a, &devices[1], 9)),
                ([1; 32], cert(&b, &devices[1], 8)),
            ],
            devices,
        }
    })
}

/// A fixture's directory or member frame with the request id it is sent with.
pub(super) fn with_req(frame: ClientFrame, req: ReqId) -> ClientFrame {
    match frame {
        ClientFrame::SetUsername { name, .. } => ClientFrame::SetUsername { req, name },
        ClientFrame::Lookup { username, .. } => ClientFrame::Lookup { req, username },
        ClientFrame::LookupAccounts { accounts, .. } => ClientFrame::LookupAccounts { req, accounts },
        ClientFrame::AccountDevices { account, .. } => ClientFrame::AccountDevices { req, account },
        ClientFrame::Accept { account, accept, .. } => ClientFrame::Accept { req, account, accept },
        ClientFrame::Invite { account, .. } => ClientFrame::Invite { req, account },
        ClientFrame::ListInvitations { .. } => ClientFrame::ListInvitations { req },
        ClientFrame::Checkpoint { checkpoint, .. } => ClientFrame::Checkpoint { req, checkpoint },
        ClientFrame::ChangeMembers { change, .. } => ClientFrame::ChangeMembers { req, change },
        ClientFrame::Rekey { epoch, history, .. } => ClientFrame::Rekey { req, epoch, history },
        other => other,
    }
}

pub(super) fn pick<T>(items: &[T], i: u8) -> &T {
    &items[i as usize % items.len()]
}
