//! Opening a sealed delta after structured tampering: a valid delta is sealed from the fuzz
//! input, then its ciphertext, length, associated data (chat, epoch, device, account, client
//! seq) or key
//! is changed. Opening must return a typed error and never panic, and it must fail whenever
//! anything changed: the relay must not be able to move, cut, extend or alter a delta.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use rand::rngs::StdRng;
use rand::SeedableRng;
use stratus_engine::proto::crypto::{open_delta, seal_delta, ChatKey, CryptoError, DeltaAd};
use stratus_engine::{AccountId, ChatId, ClientSeq, DeviceId, Epoch};

/// Nonce and tag: anything shorter cannot be a sealed delta.
const OVERHEAD_BYTES: usize = 24 + 16;

#[derive(Debug, Arbitrary)]
struct Input {
    key: [u8; 32],
    nonce_seed: u64,
    plaintext: Vec<u8>,
    chat: [u8; 16],
    epoch: u32,
    device: String,
    account: [u8; 16],
    client_seq: u64,
    tampering: Vec<Tamper>,
}

#[derive(Debug, Arbitrary)]
enum Tamper {
    FlipBit {
        at: u16,
        bit: u8,
    },
    SetByte {
        at: u16,
        value: u8,
    },
    Truncate {
        len: u16,
    },
    Extend {
        bytes: Vec<u8>,
    },
    /// Moves bytes from the end to the front (keeps the length).
    Rotate {
        by: u16,
    },
    Replace {
        sealed: Vec<u8>,
    },
    Chat {
        chat: [u8; 16],
    },
    Epoch {
        epoch: u32,
    },
    Device {
        device: String,
    },
    /// Drops or appends one character at the end of the device id: the bytes next to the client
    /// seq in the associated data, where a missing length prefix would let them slide.
    DeviceEdge {
        drop: bool,
        c: char,
    },
    ClientSeq {
        client_seq: u64,
    },
    Account {
        account: [u8; 16],
    },
    Key {
        key: [u8; 32],
    },
}

fuzz_target!(|input: Input| {
    let Input { key, nonce_seed, plaintext, chat, epoch, device, account, client_seq, tampering } = input;
    let key = ChatKey(key);
    let device = DeviceId(device);
    let ad = DeltaAd {
        chat: ChatId(chat),
        epoch: Epoch(epoch),
        device: &device,
        account: AccountId(account),
        client_seq: ClientSeq(client_seq),
    };
    let sealed = seal_delta(&key, &ad, &plaintext, &mut StdRng::seed_from_u64(nonce_seed));
    assert_eq!(sealed.len(), plaintext.len() + OVERHEAD_BYTES);
    assert_eq!(open_delta(&key, &ad, &sealed).as_deref(), Ok(plaintext.as_slice()), "an untouched delta opens");

    let (mut k, mut c, mut e, mut d, mut cs, mut s) =
        (key.clone(), ChatId(chat), Epoch(epoch), device.0.clone(), ClientSeq(client_seq), sealed.clone());
    let mut a = AccountId(account);
    for t in tampering.into_iter().take(8) {
        match t {
            Tamper::FlipBit { at, bit } if !s.is_empty() => {
                let i = at as usize % s.len();
                s[i] ^= 1 << (bit % 8);
            }
            Tamper::SetByte { at, value } if !s.is_empty() => {
                let i = at as usize % s.len();
                s[i] = value;
            }
            Tamper::FlipBit { .. } | Tamper::SetByte { .. } => {}
            Tamper::Truncate { len } => s.truncate(len as usize),
            Tamper::Extend { bytes } => s.extend_from_slice(&bytes),
            Tamper::Rotate { by } if !s.is_empty() => {
                let n = by as usize % s.len();
                s.rotate_right(n);
            }
            Tamper::Rotate { .. } => {}
            Tamper::Replace { sealed } => s = sealed,
            Tamper::Chat { chat } => c = ChatId(chat),
            Tamper::Epoch { epoch } => e = Epoch(epoch),
            Tamper::Device { device } => d = device,
            Tamper::DeviceEdge { drop: true, .. } => {
                d.pop();
            }
            Tamper::DeviceEdge { drop: false, c } => d.push(c),
            Tamper::ClientSeq { client_seq } => cs = ClientSeq(client_seq),
            Tamper::Account { account } => a = AccountId(account),
            Tamper::Key { key } => k = ChatKey(key),
        }
    }
    let dev = DeviceId(d);
    let tampered_ad = DeltaAd { chat: c, epoch: e, device: &dev, account: a, client_seq: cs };
    let opened = open_delta(&k, &tampered_ad, &s);
    if k == key && tampered_ad == ad && s == sealed {
        assert_eq!(opened.as_deref(), Ok(plaintext.as_slice()), "tampering that changed nothing still opens");
    } else if s.len() < OVERHEAD_BYTES {
        assert_eq!(opened, Err(CryptoError::Truncated), "a delta shorter than nonce and tag");
    } else {
        assert_eq!(opened, Err(CryptoError::Authentication), "a tampered delta opened");
    }
});
