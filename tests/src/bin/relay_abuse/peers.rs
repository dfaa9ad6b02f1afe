//! (e) Unregistered peers: fresh identities that flood malformed frames, recovery lookups and
//! link slots, connecting again whenever the relay closes them; and a probe, another fresh
//! peer each time, whose recovery lookup should be answered all along.

use super::*;
use stratus_engine::net::parse_relay_addr;

/// A fresh identity's sync stream after `Hello`, or why not.
async fn fresh_peer(addr: &str) -> Result<Conn, String> {
    let (peer, ma) = parse_relay_addr(addr).map_err(|e| e.to_string())?;
    let mut net = Net::start(Keypair::generate_ed25519()).map_err(|e| e.to_string())?;
    let mut stream = net.open(peer, ma).await.map_err(|e| e.to_string())?;
    stream.send(&ClientFrame::Hello { version: PROTOCOL_VERSION }).await.map_err(|e| e.to_string())?;
    match tokio::time::timeout(STALL, stream.recv()).await {
        Ok(Ok(Some(RelayFrame::Hello { .. }))) => Ok(Conn { _net: net, stream }),
        other => Err(format!("no hello: {other:?}")),
    }
}

#[derive(Default)]
struct Counts {
    connections: u64,
    refused_connections: u64,
    sent: u64,
    answers: u64,
    closed_by_relay: u64,
}

/// One flooding peer after another until `until`.
async fn flood_peer(addr: String, mut rng: StdRng, until: Instant) -> Counts {
    let mut c = Counts::default();
    while Instant::now() < until {
        let mut conn = match fresh_peer(&addr).await {
            Ok(conn) => conn,
            Err(_) => {
                c.refused_connections += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        c.connections += 1;
        let mut req = 0;
        'conn: while Instant::now() < until {
            for i in 0..16u32 {
                req += 1;
                let mut id = [0u8; 32];
                rng.fill_bytes(&mut id);
                let sent = match i % 4 {
                    0 | 1 => conn.stream.send_raw_frame(&[0xff, 0xff, 0xff, (i & 0xff) as u8]).await,
                    2 => conn.stream.send(&ClientFrame::FetchRecovery { req, lookup_id: id }).await,
                    _ => {
                        let wait = ClientFrame::LinkWait { req, link_id: id, device_x25519: id, name: "flood".into() };
                        conn.stream.send(&wait).await
                    }
                };
                if sent.is_err() {
                    c.closed_by_relay += 1;
                    break 'conn;
                }
                c.sent += 1;
            }
            loop {
                match tokio::time::timeout(Duration::from_millis(1), conn.stream.recv()).await {
                    Err(_) => break,
                    Ok(Ok(Some(_))) => c.answers += 1,
                    Ok(Ok(None)) | Ok(Err(_)) => {
                        c.closed_by_relay += 1;
                        break 'conn;
                    }
                }
            }
        }
    }
    c
}

/// `peers` flooding peers at once for `flood`; a probe peer every 500 ms.
pub(super) async fn unregistered(addr: &str, seed: u64, peers: usize, flood: Duration) -> Flood {
    let mut rng = StdRng::seed_from_u64(seed);
    let (start, until) = (Instant::now(), Instant::now() + flood);
    let tasks: Vec<_> = (0..peers)
        .map(|_| tokio::spawn(flood_peer(addr.to_string(), StdRng::seed_from_u64(rng.next_u64()), until)))
        .collect();
    // The probe: a fresh peer's recovery lookup, answered `RecoveryNotFound` when the flood
    // spends nothing it needs.
    let (mut probes, mut answered, mut lat) = (0u64, 0u64, Vec::new());
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(500)).await;
        probes += 1;
        let Ok(mut p) = fresh_peer(addr).await else { continue };
        let mut id = [0u8; 32];
        rng.fill_bytes(&mut id);
        let t = Instant::now();
        if let RelayFrame::Error { code: ErrorCode::RecoveryNotFound, .. } =
            request(&mut p, 1, ClientFrame::FetchRecovery { req: 1, lookup_id: id }).await
        {
            answered += 1;
            lat.push(t.elapsed());
        }
    }
    let mut c = Counts::default();
    for t in tasks {
        let o = t.await.expect("a flooding peer");
        c.connections += o.connections;
        c.refused_connections += o.refused_connections;
        c.sent += o.sent;
        c.answers += o.answers;
        c.closed_by_relay += o.closed_by_relay;
    }
    lat.sort();
    Flood {
        start,
        end: Instant::now(),
        what: format!(
            "{peers} peers at once: {} fresh identities connected ({} refused), {} frames sent \
             (half malformed, a quarter recovery lookups, a quarter link waits), {} answered, {} streams \
             closed by the relay; probe peers' recovery lookups answered {answered} of {probes} (p99 {:.1} ms)",
            c.connections,
            c.refused_connections,
            c.sent,
            c.answers,
            c.closed_by_relay,
            ms(pct(&lat, 99.0))
        ),
    }
}
