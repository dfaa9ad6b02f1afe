//! The answering side of a secret stream (`SecretConn`, `engine/src/device/local/secret/conn.rs`):
//! what another device sends before and during the handshake, fed to a real device with its
//! own store. The opening is built from arbitrary fields (then possibly cut or flipped) so that
//! it decodes often; the frames after it are arbitrary. Never a panic: every frame gives a step
//! or a typed error, and after an error the conn refuses everything.
#![no_main]

use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use stratus_engine::proto::cert::{DeviceCert, DeviceCertBody};
use stratus_engine::{AccountId, Device, DeviceId, Opening, SecretId, Step};

#[derive(Debug, Arbitrary)]
struct Input {
    chat: [u8; 16],
    account: [u8; 16],
    device: String,
    x25519: [u8; 32],
    name: String,
    created_ms: u64,
    signature: Vec<u8>,
    close: bool,
    /// The libp2p peer is the device the certificate names (else another one).
    peer_matches: bool,
    /// Cuts the opening to this length, or flips a bit at this place.
    cut: Option<u16>,
    flip: Option<(u16, u8)>,
    later: Vec<Vec<u8>>,
}

/// One device for every run: opening a sled store per run would be most of the time.
fn device() -> &'static Mutex<Device> {
    static DEVICE: OnceLock<Mutex<Device>> = OnceLock::new();
    DEVICE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir").keep();
        let mut d = Device::open_seeded(&dir, 7).expect("device");
        d.set_secret_auto_accept(true).expect("auto-accept");
        Mutex::new(d)
    })
}

fuzz_target!(|input: Input| {
    let cert = DeviceCert {
        body: DeviceCertBody {
            account: AccountId(input.account),
            device: DeviceId(input.device),
            device_x25519: input.x25519,
            name: input.name,
            created_ms: input.created_ms,
        },
        signature: input.signature,
    };
    let peer = if input.peer_matches { cert.body.device.clone() } else { DeviceId("another".into()) };
    let mut opening =
        postcard::to_allocvec(&Opening { chat: SecretId(input.chat), cert, close: input.close }).expect("encodes");
    if let Some(n) = input.cut {
        opening.truncate(usize::from(n));
    }
    if let Some((at, bit)) = input.flip {
        if let Some(b) = opening.get_mut(usize::from(at)) {
            *b ^= 1 << (bit % 8);
        }
    }
    let mut d = device().lock().unwrap_or_else(|p| p.into_inner());
    let mut conn = d.secret_incoming(peer);
    let mut dead = false;
    for frame in std::iter::once(opening).chain(input.later) {
        let mut result = d.secret_step(&mut conn, &frame);
        if let Ok((_, Step::Lookup(_))) = result {
            // No relay here: the lookup fails, and the offer waits for the user.
            result = d.secret_looked_up(&mut conn);
        }
        match result {
            Ok(_) => assert!(!dead, "a conn took a frame after an error"),
            Err(_) => dead = true,
        }
    }
});
