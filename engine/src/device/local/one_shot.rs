//! One request at a time over a fresh stream to the relay, for the `async` methods of
//! [`Device`] that run without a [`crate::Session`] (account creation, linking, approval,
//! recovery, the directory, sessions, member changes, secret chats' device lists). A session
//! makes the same requests over its own connection ([`crate::device::ops`]).

use crate::device::error::Error;
use crate::device::local::Device;
use crate::device::net::{parse_relay_addrs, Net, NetError, RelayStream};
use crate::proto::ids::AccountId;
use crate::proto::wire::{ClientFrame, ErrorCode, RelayFrame, ReqId, PROTOCOL_VERSION};

/// How often a one-shot request opens its stream before giving up.
pub(crate) const CONNECT_ATTEMPTS: u32 = 5;

impl Device {
    /// Opens a sync stream and exchanges `Hello`. A stream that breaks during the exchange is
    /// opened again (up to [`CONNECT_ATTEMPTS`] times): libp2p-stream 0.4 drops an inbound
    /// stream that arrives while the relay's accept queue (one slot) is taken, which happens
    /// when many devices connect at once. `relay` may list several addresses: each attempt
    /// tries them in order until one answers.
    pub(super) async fn connect(&self, relay: &str) -> Result<(Net, RelayStream, Option<AccountId>), Error> {
        let addrs = parse_relay_addrs(relay)?;
        let mut net = Net::start(self.keypair())?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = async {
                let mut stream = Self::open_any(&mut net, &addrs).await?;
                stream.send(&ClientFrame::Hello { version: PROTOCOL_VERSION }).await?;
                Ok::<_, Error>((stream.recv().await?, stream))
            }
            .await;
            match result {
                Ok((Some(RelayFrame::Hello { account, .. }), stream)) => return Ok((net, stream, account)),
                // The session ended: believed only with a proof this device checks (the caller
                // deletes the account's data on `SessionRevoked`).
                Ok((Some(RelayFrame::SessionEnded { entry, chain }), _)) => {
                    return Err(match self.session_end_proven(Some(&(*entry, *chain))) {
                        true => Error::SessionRevoked,
                        false => Error::SessionRefused,
                    })
                }
                Ok((Some(RelayFrame::Error { code: ErrorCode::SessionRevoked, .. }), _)) => {
                    return Err(Error::SessionRefused)
                }
                Ok((Some(RelayFrame::Error { code: ErrorCode::UnsupportedVersion, message, .. }), _)) => {
                    return Err(Error::VersionRefused(message))
                }
                Ok((Some(RelayFrame::Error { code, message, .. }), _)) => return Err(Error::Relay { code, message }),
                Err(Error::Net(NetError::Io(_))) | Ok((None, _)) if attempt < CONNECT_ATTEMPTS => {
                    tokio::time::sleep(std::time::Duration::from_millis(50 << attempt)).await;
                }
                Err(e) => return Err(e),
                Ok(_) => return Err(Error::Net(NetError::Unreachable("relay did not answer hello".into()))),
            }
        }
    }

    /// A stream to the first of `addrs` that can be reached, or the last one's failure.
    async fn open_any(net: &mut Net, addrs: &[(libp2p::PeerId, libp2p::Multiaddr)]) -> Result<RelayStream, NetError> {
        let mut last = NetError::AddressCount(0);
        for (peer, addr) in addrs {
            match net.open(*peer, addr.clone()).await {
                Err(e @ NetError::Unreachable(_)) => last = e,
                r => return r,
            }
        }
        Err(last)
    }

    pub(super) async fn reply(stream: &mut RelayStream, req: ReqId) -> Result<RelayFrame, Error> {
        loop {
            match stream.recv().await? {
                None => return Err(Error::Net(NetError::Unreachable("relay closed the stream".into()))),
                Some(RelayFrame::Error { req: r, code, message }) if r == Some(req) || r.is_none() => {
                    return Err(Error::Relay { code, message })
                }
                Some(f) if f.req() == Some(req) => return Ok(f),
                Some(_) => {} // pushes and other traffic: the session will fetch them
            }
        }
    }

    /// One request over a fresh stream for a logged-in device, and its reply. A relay that
    /// proves that the account ended this device's session gets the account's data deleted
    /// here; one that only says so gets [`Error::SessionRefused`], and nothing is deleted.
    pub(super) async fn one_request(&mut self, frame: ClientFrame, req: ReqId) -> Result<RelayFrame, Error> {
        let relay = self.login()?.relay.clone();
        let result = async {
            let (_net, mut stream, _) = self.connect(&relay).await?;
            stream.send(&frame).await?;
            Self::reply(&mut stream, req).await
        }
        .await;
        match result {
            Err(Error::SessionRevoked) => {
                self.wipe_account()?;
                Err(Error::SessionRevoked)
            }
            Err(Error::Relay { code: ErrorCode::SessionRevoked, .. }) => Err(Error::SessionRefused),
            result => result,
        }
    }
}
