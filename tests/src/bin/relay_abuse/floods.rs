//! The flood cases: each sets up its attackers, floods for a while, and says what it did and
//! what the relay answered. Each returns when its flood started and ended, for the caller to
//! measure the relay and the well-behaved devices over exactly that window.

use super::*;

/// What a case did: its flood's window and a line of counts.
pub(super) struct Flood {
    pub(super) start: Instant,
    pub(super) end: Instant,
    pub(super) what: String,
}

/// Counts of answers by kind (`Done`, `NotAllowed`, …), printed in a stable order.
#[derive(Default)]
struct Answers(BTreeMap<String, u64>);

impl Answers {
    fn count(&mut self, f: &RelayFrame) {
        let kind = match f {
            RelayFrame::Error { code, .. } => format!("{code:?}"),
            other => format!("{other:?}").split([' ', '{', '(']).next().unwrap_or("?").to_string(),
        };
        *self.0.entry(kind).or_default() += 1;
    }
    fn merge(&mut self, o: Answers) {
        for (k, v) in o.0 {
            *self.0.entry(k).or_default() += v;
        }
    }
    fn line(&self) -> String {
        self.0.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
    }
}

fn expect_done(f: RelayFrame, what: &str) {
    assert!(matches!(f, RelayFrame::Done { .. }), "{what}: {f:?}");
}

/// A fresh chat key for a group's `epoch`, wrapped to each of `members` and signed by `signer`.
pub(super) fn group_keys(
    signer: &AccountKeys,
    chat: ChatId,
    epoch: Epoch,
    members: &[AccountPublic],
    rng: &mut StdRng,
) -> Vec<WrappedKey> {
    let key = ChatKey::random(rng);
    let terms = KeyTerms { chat, kind: ChatKind::Group, epoch, members: members.iter().map(|m| m.id).collect() };
    members
        .iter()
        .map(|m| {
            let wrapped = wrap_chat_key(&key, chat, epoch, m.id, &m.kem_key, rng);
            WrappedKey {
                account: m.id,
                generation: 0,
                content: true,
                signature: signer.sign_chat_key(&terms, m.id, 0, true, &wrapped),
                key: wrapped,
            }
        })
        .collect()
}

/// `w` creates a group of itself and `others` (who must have accepted it).
pub(super) async fn create_group(w: &mut Writer, others: &[AccountPublic]) -> ChatId {
    let chat = ChatId::random(&mut w.rng);
    let mut members = vec![w.keys.public()];
    members.extend(others.iter().cloned());
    let keys = group_keys(&w.keys, chat, Epoch(0), &members, &mut w.rng);
    let req = w.req();
    let frame =
        ClientFrame::CreateChat { req, chat, kind: ChatKind::Group, epoch: Epoch(0), client_seq: ClientSeq(0), keys };
    expect_done(request(&mut w.raw, req, frame).await, "create a group");
    chat
}

/// `w`'s account accepts chats from `from`.
pub(super) async fn accept(w: &mut Writer, from: AccountId) {
    let req = w.req();
    expect_done(request(&mut w.raw, req, ClientFrame::Accept { req, account: from, accept: true }).await, "accept");
}

// ---------------------------------------------------------------------------------------------
// (a) Key-epoch churn

/// Two accounts loop, over `chats` groups of the two: B leaves → A starts a new epoch → A adds B
/// → A starts a new epoch, as fast as the relay answers, for `flood`.
pub(super) async fn churn(addr: &str, seed: u64, chats: usize, flood: Duration) -> Flood {
    let mut a = Writer::create(addr.into(), seed, "churn-a".into()).await;
    let mut b = Writer::create(addr.into(), seed ^ 1, "churn-b".into()).await;
    let (pa, pb) = (a.keys.public(), b.keys.public());
    accept(&mut b, pa.id).await;
    // (chat, newest epoch, changes since it, B is a member)
    let mut groups = Vec::new();
    for _ in 0..chats {
        groups.push((create_group(&mut a, std::slice::from_ref(&pb)).await, Epoch(0), 0u32, true));
    }
    let (start, until) = (Instant::now(), Instant::now() + flood);
    let (mut changes, mut limited) = (0u64, 0u64);
    while Instant::now() < until {
        let mut progressed = false;
        for (chat, newest, seq, b_in) in groups.iter_mut() {
            let body = |by: AccountId, change: Membership| MemberChangeBody {
                chat: *chat,
                base_epoch: *newest,
                seq: *seq,
                by,
                change,
            };
            let (w, change) = if *b_in {
                (&mut b, body(pb.id, Membership::Leave))
            } else {
                (&mut a, body(pa.id, Membership::Add { accounts: [pb.id].into(), share_history: false }))
            };
            let change = w.keys.sign_member_change(change);
            let req = w.req();
            match request(&mut w.raw, req, ClientFrame::ChangeMembers { req, change }).await {
                RelayFrame::Done { .. } => {}
                RelayFrame::RateLimited { .. } => {
                    limited += 1;
                    continue;
                }
                other => panic!("member change: {other:?}"),
            }
            changes += 1;
            *b_in = !*b_in;
            let members = if *b_in { vec![pa.clone(), pb.clone()] } else { vec![pa.clone()] };
            let epoch = Epoch(newest.0 + 1);
            let keys = group_keys(&a.keys, *chat, epoch, &members, &mut a.rng);
            let req = a.req();
            let frame = ClientFrame::Rekey { req, epoch: NewEpoch { chat: *chat, epoch, keys }, history: Vec::new() };
            expect_done(request(&mut a.raw, req, frame).await, "new epoch");
            (*newest, *seq) = (epoch, 0);
            progressed = true;
            if Instant::now() >= until {
                break;
            }
        }
        if !progressed {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let end = Instant::now();
    let newest = groups.iter().map(|g| g.1 .0).max().unwrap_or(0);
    Flood {
        start,
        end,
        what: format!(
            "{changes} member changes and as many new epochs over {chats} groups (newest epoch {newest}); \
             {limited} adds refused RateLimited"
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// (b) Storage

/// One account appends 64 KiB deltas with 32 in flight until its quota refuses them, and 2 s
/// more, or until `cap`. An append refused `RateLimited` is sent again after the wait, in
/// client-seq order before any new one (as a device does: the relay holds later ones back until
/// it comes again).
pub(super) async fn storage(addr: &str, seed: u64, cap: Duration) -> Flood {
    let mut w = Writer::create(addr.into(), seed, "storage".into()).await;
    let (start, until) = (Instant::now(), Instant::now() + cap);
    let (mut inflight, mut stored, mut limited) = (0usize, 0u64, 0u64);
    let mut answers = Answers::default();
    let mut refused_at: Option<Instant> = None;
    // Sent and not answered, by request; refused for the rate and waiting to go again.
    let mut sent: BTreeMap<ReqId, (ClientSeq, ClientFrame)> = BTreeMap::new();
    let mut again: BTreeMap<ClientSeq, ClientFrame> = BTreeMap::new();
    let mut resume_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let stop = now >= until || refused_at.is_some_and(|t| now - t > Duration::from_secs(2));
        if stop && inflight == 0 {
            break;
        }
        if let Some(t) = resume_at.take() {
            if inflight == 0 {
                tokio::time::sleep_until(t.into()).await;
            } else {
                resume_at = Some(t);
            }
        }
        while !stop && resume_at.is_none() && inflight < 32 {
            let (req, cs, frame) = match again.pop_first() {
                Some((cs, frame)) => (frame.req(), cs, frame),
                None => w.append_sized(MAX_DELTA_BYTES),
            };
            w.raw.stream.send(&frame).await.expect("send an append");
            sent.insert(req, (cs, frame));
            inflight += 1;
        }
        let f = recv(&mut w.raw, "an answer to an append").await;
        let Some(req) = f.req() else { continue };
        inflight -= 1;
        let mine = sent.remove(&req);
        answers.count(&f);
        match f {
            RelayFrame::Acked { .. } => stored += 1,
            RelayFrame::RateLimited { retry_after_ms, .. } => {
                limited += 1;
                if let Some((cs, frame)) = mine {
                    again.insert(cs, frame);
                }
                let t = Instant::now() + Duration::from_millis(u64::from(retry_after_ms));
                resume_at = Some(resume_at.map_or(t, |r| r.max(t)));
            }
            RelayFrame::Error { code: ErrorCode::QuotaExceeded, .. } => {
                refused_at.get_or_insert(now);
            }
            _ => {}
        }
    }
    let to_quota = refused_at.map(|t| format!("{:.1} s", (t - start).as_secs_f64())).unwrap_or_else(|| "never".into());
    Flood {
        start,
        end: Instant::now(),
        what: format!(
            "{stored} deltas of 64 KiB stored ({:.0} MiB), quota refused after {to_quota}; answers: {}{}",
            (stored * MAX_DELTA_BYTES as u64) as f64 / 1048576.0,
            answers.line(),
            if limited > 0 { format!(" ({limited} rate limited)") } else { String::new() }
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// (c) Chats and invitations without consent

/// `attackers` accounts each loop: a group naming 16 of `victims` (who accepted none of them),
/// then an invitation to each of 16 victims, for `flood`.
pub(super) async fn strangers(
    addr: &str,
    seed: u64,
    attackers: usize,
    victims: Vec<AccountPublic>,
    flood: Duration,
) -> Flood {
    let mut ws = Vec::new();
    for i in 0..attackers {
        ws.push(Writer::create(addr.into(), seed.wrapping_add(i as u64), format!("stranger-{i}")).await);
    }
    let victims = Arc::new(victims);
    let (start, until) = (Instant::now(), Instant::now() + flood);
    let tasks: Vec<_> = ws
        .into_iter()
        .map(|mut w| {
            let victims = victims.clone();
            tokio::spawn(async move {
                let mut answers = Answers::default();
                while Instant::now() < until {
                    let named: Vec<AccountPublic> =
                        (0..16).map(|_| victims[w.rng.next_u32() as usize % victims.len()].clone()).collect();
                    let mut named: Vec<AccountPublic> =
                        named.into_iter().map(|v| (v.id, v)).collect::<BTreeMap<_, _>>().into_values().collect();
                    named.retain(|v| v.id != w.account());
                    let chat = ChatId::random(&mut w.rng);
                    let mut members = vec![w.keys.public()];
                    members.extend(named.iter().cloned());
                    let keys = group_keys(&w.keys, chat, Epoch(0), &members, &mut w.rng);
                    let req = w.req();
                    let frame = ClientFrame::CreateChat {
                        req,
                        chat,
                        kind: ChatKind::Group,
                        epoch: Epoch(0),
                        client_seq: ClientSeq(0),
                        keys,
                    };
                    answers.count(&request(&mut w.raw, req, frame).await);
                    for v in &named {
                        let req = w.req();
                        answers.count(&request(&mut w.raw, req, ClientFrame::Invite { req, account: v.id }).await);
                    }
                }
                answers
            })
        })
        .collect();
    let mut answers = Answers::default();
    for t in tasks {
        answers.merge(t.await.expect("a stranger's task"));
    }
    Flood {
        start,
        end: Instant::now(),
        what: format!(
            "{attackers} accounts, {} victims (accepted none of them); answers to group creations and \
             invitations: {}",
            victims.len(),
            answers.line()
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// (d) Typing

/// `t`, a member of `chat` with every well-behaved account, sends `Typing` as fast as its stream
/// takes it for `flood`, reading what comes back between batches of 64.
pub(super) async fn typing(t: &mut Writer, chat: ChatId, flood: Duration) -> Flood {
    let (start, until) = (Instant::now(), Instant::now() + flood);
    let (mut sent, mut cut_off) = (0u64, false);
    let mut answers = Answers::default();
    'flood: while Instant::now() < until {
        for _ in 0..64 {
            if t.raw.stream.send(&ClientFrame::Typing { chat }).await.is_err() {
                cut_off = true;
                break 'flood;
            }
            sent += 1;
        }
        loop {
            match tokio::time::timeout(Duration::from_millis(1), t.raw.stream.recv()).await {
                Err(_) => break,
                Ok(Ok(Some(f))) => answers.count(&f),
                Ok(Ok(None)) | Ok(Err(_)) => {
                    cut_off = true;
                    break 'flood;
                }
            }
        }
    }
    Flood {
        start,
        end: Instant::now(),
        what: format!(
            "{sent} typing frames sent ({:.0}/s){}; frames back to the sender: {}",
            sent as f64 / start.elapsed().as_secs_f64(),
            if cut_off { ", then the relay closed the sender's stream" } else { "" },
            if answers.0.is_empty() { "none".to_string() } else { answers.line() }
        ),
    }
}
