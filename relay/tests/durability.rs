//! Power-loss safety: no acknowledgement leaves the relay before its fsync barrier completed,
//! and a failing barrier stops the relay (non-zero) instead of acknowledging; a full disk stops
//! the writes, not the relay. The relay runs in-process over the real sled store wrapped so that
//! barriers can be held back or failed and writes can fail for lack of space; the device is a
//! real engine session over libp2p on 127.0.0.1.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use stratus_engine::proto::wire::{AccountEntry, Delta};
use stratus_engine::{AccountId, ChatId, Device, Seq, Session};
use stratus_relay::core::{Recovered, StoreOp};
use stratus_relay::server::{run_with_store, Config, ServerError};
use stratus_relay::store::{RelayStore, SledStore, StoreError};

/// The sled store with a gate in front of its barrier.
struct GatedStore {
    inner: SledStore,
    open: Mutex<bool>,
    opened: Condvar,
    fail: AtomicBool,
    /// Writes fail as on a full disk.
    full: AtomicBool,
}

impl GatedStore {
    fn set_open(&self, open: bool) {
        *self.open.lock().unwrap() = open;
        self.opened.notify_all();
    }
}

impl RelayStore for GatedStore {
    fn apply(&self, ops: &[StoreOp]) -> Result<(), StoreError> {
        if self.full.load(Ordering::SeqCst) {
            let e = std::io::Error::from(std::io::ErrorKind::StorageFull);
            return Err(StoreError::Sled(sled::Error::Io(e)));
        }
        self.inner.apply(ops)
    }
    fn barrier(&self) -> Result<(), StoreError> {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Barrier(std::io::Error::other("injected: the disk went away")));
        }
        self.inner.barrier()
    }
    fn read_chat(&self, chat: ChatId, after: Seq, upto: Seq, max: u32) -> Result<Vec<Delta>, StoreError> {
        self.inner.read_chat(chat, after, upto, max)
    }
    fn read_account(&self, a: AccountId, after: Seq, upto: Seq, max: u32) -> Result<Vec<AccountEntry>, StoreError> {
        self.inner.read_account(a, after, upto, max)
    }
    fn recover(&self) -> Result<Recovered, StoreError> {
        self.inner.recover()
    }
}

async fn wait_outbox(session: &Session, want: usize, secs: u64) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if session.status().await.unwrap().outbox == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A relay over a [`GatedStore`] in `dir`, and its address.
async fn start(dir: &std::path::Path) -> (Arc<GatedStore>, tokio::task::JoinHandle<Result<(), ServerError>>, String) {
    let store = Arc::new(GatedStore {
        inner: SledStore::open(&dir.join("relay/store")).unwrap(),
        open: Mutex::new(true),
        opened: Condvar::new(),
        fail: AtomicBool::new(false),
        full: AtomicBool::new(false),
    });
    let config = test_config(dir.join("relay"), std::time::Duration::from_secs(5));
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let relay = tokio::spawn(run_with_store(
        config,
        store.clone(),
        move |a| {
            let _ = addr_tx.send(a.to_string());
        },
        std::future::pending(),
    ));
    (store, relay, addr_rx.await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_wait_for_the_barrier_and_a_failed_barrier_stops_the_relay() {
    let dir = tempfile::tempdir().unwrap();
    let (store, relay, addr) = start(dir.path()).await;

    let mut device = Device::open(&dir.path().join("d")).unwrap();
    device.create_account(&addr, "d").await.unwrap();
    let mut session = Session::start(device).unwrap();
    let mut events = session.events();
    while !matches!(events.recv().await.unwrap(), stratus_engine::Event::Connected) {}
    let chat = session.create_chat("durable").await.unwrap();
    assert!(wait_outbox(&session, 0, 20).await, "the title delta is acknowledged");

    // Barriers held back: the append is written but not acknowledged.
    store.set_open(false);
    session.send(chat, "waits for the disk").await.unwrap();
    assert!(!wait_outbox(&session, 0, 2).await, "acknowledged before its barrier completed");
    // The barrier completes: now it is acknowledged.
    store.set_open(true);
    assert!(wait_outbox(&session, 0, 20).await, "acknowledged after the barrier");

    // The barrier fails: no acknowledgement, and the relay stops with an error.
    store.fail.store(true, Ordering::SeqCst);
    session.send(chat, "never acknowledged").await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(20), relay).await.expect("the relay stops").unwrap();
    assert!(matches!(result, Err(ServerError::Store(StoreError::Barrier(_)))), "{result:?}");
    assert_eq!(session.status().await.unwrap().outbox, 1, "the failed append stays in the outbox");
    session.stop().await.unwrap();
}

/// The disk fills up (a write fails for lack of space): the relay stays up, acknowledges
/// nothing more (the device keeps its message in its outbox), and goes on serving what it
/// stored to a device that reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_the_writes_not_the_relay() {
    use stratus_engine::proto::wire::{ClientFrame, RelayFrame, PROTOCOL_VERSION};
    let dir = tempfile::tempdir().unwrap();
    let (store, relay, addr) = start(dir.path()).await;
    let mut device = Device::open(&dir.path().join("d")).unwrap();
    device.create_account(&addr, "d").await.unwrap();
    let keys = device.keypair();
    let mut session = Session::start(device).unwrap();
    let mut events = session.events();
    while !matches!(events.recv().await.unwrap(), stratus_engine::Event::Connected) {}
    let chat = session.create_chat("full").await.unwrap();
    session.send(chat, "stored").await.unwrap();
    assert!(wait_outbox(&session, 0, 20).await, "acknowledged while there is space");

    store.full.store(true, Ordering::SeqCst);
    session.send(chat, "no room").await.unwrap();
    assert!(!wait_outbox(&session, 0, 3).await, "acknowledged without being written");
    assert!(!relay.is_finished(), "the relay stays up");

    // Another stream of the device reads what is stored, and is refused a write.
    let (peer, ma) = stratus_engine::net::parse_relay_addr(&addr).unwrap();
    let mut net = stratus_engine::net::Net::start(keys).unwrap();
    let mut s = net.open(peer, ma).await.unwrap();
    s.send(&ClientFrame::Hello { version: PROTOCOL_VERSION }).await.unwrap();
    assert!(matches!(s.recv().await.unwrap(), Some(RelayFrame::Hello { account: Some(_), .. })));
    s.send(&ClientFrame::FetchChat { req: 1, chat, after: stratus_engine::Seq(0), max: 100 }).await.unwrap();
    let page = loop {
        match s.recv().await.unwrap() {
            Some(RelayFrame::ChatPage { deltas, .. }) => break deltas,
            Some(_) => {}
            None => panic!("the stream closed"),
        }
    };
    assert_eq!(page.len(), 2, "the title and the first message, nothing of the one not written");
    let sealed = vec![1; 40];
    let append = ClientFrame::Append {
        req: 2,
        chat,
        epoch: stratus_engine::Epoch(0),
        client_seq: stratus_engine::ClientSeq(1 << 40),
        sealed,
    };
    s.send(&append).await.unwrap();
    let refused = loop {
        match s.recv().await.unwrap() {
            Some(RelayFrame::Error { req: Some(2), message, .. }) => break message,
            Some(_) => {}
            None => panic!("the stream closed"),
        }
    };
    assert!(refused.contains("disk is full"), "{refused}");
    assert!(!relay.is_finished(), "the relay stays up");
    assert_eq!(session.status().await.unwrap().outbox, 1, "the message waits in the outbox");
    session.stop().await.unwrap();
}

/// `GET path` on the admin listener at `addr`: the status code and the body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.split(' ').nth(1).unwrap().parse().unwrap(), body.to_string())
}

/// `/readyz` says 503 until the first barrier (over what a crash may have left unflushed) is
/// done and again once the relay is stopping, while `/healthz` answers throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_the_first_barrier_and_ends_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(GatedStore {
        inner: SledStore::open(&dir.path().join("relay/store")).unwrap(),
        open: Mutex::new(false),
        opened: Condvar::new(),
        fail: AtomicBool::new(false),
        full: AtomicBool::new(false),
    });
    // A port that was free a moment ago (the listener takes no port 0 here: its address is not
    // reported back to an in-process caller).
    let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let config =
        Config { admin_http: Some(admin), ..test_config(dir.path().join("relay"), std::time::Duration::from_secs(5)) };
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(run_with_store(
        config,
        store.clone(),
        move |a| {
            let _ = addr_tx.send(a.to_string());
        },
        async move {
            let _ = stop_rx.await;
        },
    ));
    // The listener is bound before the first barrier, which is held back.
    let mut answer = None;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(admin).await.is_ok() {
            answer = Some(http_get(admin, "/readyz").await);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(answer, Some((503, "not ready: waiting for the first fsync barrier\n".into())));
    assert_eq!(http_get(admin, "/healthz").await.0, 200);

    store.set_open(true);
    addr_rx.await.unwrap();
    assert_eq!(http_get(admin, "/readyz").await, (200, "ready\n".into()));

    // Stopping: the final barrier is held back, and meanwhile the relay is not ready.
    store.set_open(false);
    stop_tx.send(()).unwrap();
    let mut stopping = None;
    for _ in 0..200 {
        let (code, body) = http_get(admin, "/readyz").await;
        if code != 200 {
            stopping = Some((code, body));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stopping, Some((503, "not ready: shutting down\n".into())));
    store.set_open(true);
    assert!(relay.await.unwrap().is_ok());
}

/// Stopping while an append waits for its barrier (lame duck): the relay stops listening at
/// once, but stays up until the barrier lets it answer the append; then it closes the stream
/// and returns `Ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_relay_answers_what_it_accepted_and_takes_no_new_connection() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(GatedStore {
        inner: SledStore::open(&dir.path().join("relay/store")).unwrap(),
        open: Mutex::new(true),
        opened: Condvar::new(),
        fail: AtomicBool::new(false),
        full: AtomicBool::new(false),
    });
    let config = test_config(dir.path().join("relay"), Duration::from_secs(600));
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(run_with_store(
        config,
        store.clone(),
        move |a| {
            let _ = addr_tx.send(a.to_string());
        },
        async move {
            let _ = stop_rx.await;
        },
    ));
    let addr = addr_rx.await.unwrap();
    let mut device = Device::open(&dir.path().join("d")).unwrap();
    device.create_account(&addr, "d").await.unwrap();
    let mut session = Session::start(device).unwrap();
    let mut events = session.events();
    while !matches!(events.recv().await.unwrap(), stratus_engine::Event::Connected) {}
    let chat = session.create_chat("drain").await.unwrap();
    assert!(wait_outbox(&session, 0, 20).await);

    // Accepted, written, waiting for its barrier; then the relay is told to stop.
    store.set_open(false);
    let stored = || store.inner.read_chat(chat, Seq(0), Seq(u64::MAX), 10).unwrap().len();
    let before = stored();
    session.send(chat, "in flight at the stop").await.unwrap();
    for _ in 0..1000 {
        if stored() > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(stored() > before, "the append reached the relay's store");
    stop_tx.send(()).unwrap();
    // New connections are refused while it drains.
    let (peer, ma) = stratus_engine::net::parse_relay_addr(&addr).unwrap();
    let mut refused = false;
    for _ in 0..200 {
        let mut net =
            stratus_engine::net::Net::start(stratus_engine::libp2p::identity::Keypair::generate_ed25519()).unwrap();
        if net.open(peer, ma.clone()).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "a new connection was taken while stopping");
    assert!(!relay.is_finished(), "the drain waits for the accepted append's barrier");
    assert_eq!(session.status().await.unwrap().outbox, 1, "not acknowledged before its barrier");

    // The barrier completes: the append is acknowledged, the streams close, the relay returns.
    store.set_open(true);
    assert!(wait_outbox(&session, 0, 20).await, "acknowledged during the drain");
    let result = tokio::time::timeout(Duration::from_secs(20), relay).await.expect("the relay stops").unwrap();
    assert!(result.is_ok(), "{result:?}");
    session.stop().await.unwrap();
}

/// The relay's settings in these tests: loopback, default limits, no admin listeners, the data
/// in `data_dir`, and `shutdown_grace` for a stop (one place, so a new setting is added once).
fn test_config(data_dir: std::path::PathBuf, shutdown_grace: std::time::Duration) -> Config {
    Config {
        data_dir,
        listen: "/ip4/127.0.0.1/tcp/0".parse().unwrap(),
        listen_ws: None,
        external_addresses: Vec::new(),
        limits: Default::default(),
        admin_http: None,
        shutdown_grace,
        admin_socket: None,
    }
}
