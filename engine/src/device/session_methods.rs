//! The session's methods for secret chats and for what needs the relay or reads the device's
//! state (approving a device, sessions, revocation, recovery, the directory, members, chat and
//! device lists): part of [`Session`], split out of `session.rs` for size. Each sends a command
//! to the session's task and waits for its answer.

use super::*;

impl Session {
    async fn secret<T>(&self, make: impl FnOnce(Reply<T>) -> SecretCmd) -> Result<T, Error> {
        self.call(|reply| Command::Secret(make(reply))).await
    }

    /// The devices of `account` a secret chat can be started with, each certificate checked
    /// against the account's keys (fetched from the relay if need be), with whether it is
    /// connected now. Needs the relay.
    pub async fn secret_devices(&self, account: AccountId) -> Result<Vec<(DeviceCert, bool)>, Error> {
        self.secret(|reply| SecretCmd::Devices { account, reply }).await
    }

    /// Starts a secret chat with the device whose certificate is `peer` (from
    /// [`Session::secret_devices`]) and offers it to that device as soon as it can be reached.
    pub async fn secret_start(&self, peer: DeviceCert) -> Result<SecretId, Error> {
        self.secret(|reply| SecretCmd::Start { peer: Box::new(peer), reply }).await
    }

    /// Accepts a secret chat another device offered ([`Event::SecretOffered`]), its
    /// certificate checked first (against its account's keys from the relay if need be).
    pub async fn secret_accept(&self, chat: SecretId) -> Result<(), Error> {
        self.secret(|reply| SecretCmd::Accept { chat, reply }).await
    }

    /// Writes a secret chat message (`ttl_s`: it disappears that many seconds after it is
    /// read); delivered as soon as the other device can be reached.
    pub async fn secret_send(&self, chat: SecretId, text: &str, ttl_s: Option<u32>) -> Result<SecretMessage, Error> {
        self.secret(|reply| SecretCmd::Send { chat, text: text.to_string(), ttl_s, reply }).await
    }

    /// A secret chat's messages in display order.
    pub async fn secret_messages(&self, chat: SecretId) -> Result<Vec<SecretMessage>, Error> {
        self.secret(|reply| SecretCmd::Messages { chat, reply }).await
    }

    /// Marks a secret chat read up to message `upto`: the timers of the messages it covers start
    /// (on the other device when the read mark reaches it).
    pub async fn secret_read(&self, chat: SecretId, upto: &str) -> Result<(), Error> {
        self.secret(|reply| SecretCmd::Read { chat, upto: upto.to_string(), reply }).await
    }

    /// Closes a secret chat (or declines an offer): deleted here at once, and on the other
    /// device as soon as it can be reached.
    pub async fn secret_close(&self, chat: SecretId) -> Result<(), Error> {
        self.secret(|reply| SecretCmd::Close { chat, reply }).await
    }

    /// The secret chats on this device.
    pub async fn secret_chats(&self) -> Result<Vec<SecretChat>, Error> {
        self.secret(|reply| SecretCmd::Chats { reply }).await
    }

    /// The fingerprint of a secret chat's keys, for the two users to compare.
    pub async fn secret_fingerprint(&self, chat: SecretId) -> Result<String, Error> {
        self.secret(|reply| SecretCmd::Fingerprint { chat, reply }).await
    }

    async fn op(&self, op: Op) -> Result<OpOut, Error> {
        self.call(|reply| Command::Op { op, reply }).await
    }

    /// Approves the new device that shows `code` (see [`crate::Device::link_code`]): signs its
    /// certificate and seals the account's keys to it. Returns its id and name.
    ///
    /// ```
    /// use stratus_engine::{Device, Event, Session};
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let (tx, rx) = tokio::sync::oneshot::channel();
    /// # let config = stratus_relay::server::Config {
    /// #     data_dir: dir.path().join("relay"),
    /// #     listen: "/ip4/127.0.0.1/tcp/0".parse()?,
    /// #     listen_ws: None,
    /// #     external_addresses: Vec::new(),
    /// #     limits: Default::default(),
    /// #     admin_http: None,
    /// #     shutdown_grace: std::time::Duration::from_secs(5),
    /// #     admin_socket: None,
    /// # };
    /// # tokio::spawn(stratus_relay::server::run(config, move |a| drop(tx.send(a)), std::future::pending()));
    /// # let relay = rx.await?.to_string();
    /// # let mut laptop = Device::open(&dir.path().join("laptop"))?;
    /// # laptop.create_account(&relay, "laptop").await?;
    /// let laptop = Session::start(laptop)?;
    /// let chat = laptop.create_chat("Notes").await?;
    /// laptop.send(chat, "written before the phone came").await?;
    ///
    /// // The phone shows its link code (as text or a QR code) and waits; the laptop approves.
    /// let mut phone = Device::open(&dir.path().join("phone"))?;
    /// let code = phone.link_code()?;
    /// let (relay_addr, shown) = (relay.clone(), code.clone());
    /// let waiting = tokio::spawn(async move { phone.link(&relay_addr, "phone", &shown).await.map(|_| phone) });
    /// # for _ in 0..50 {
    /// #     // (Until the phone's wait has reached the relay.)
    /// #     if laptop.approve(&code).await.is_ok() { break }
    /// #     tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    /// # }
    /// # /*
    /// let (_id, name) = laptop.approve(&code).await?;
    /// # */
    /// let mut phone = Session::start(waiting.await??)?;
    ///
    /// // The phone pulls the account's chats and their history by itself.
    /// let mut events = phone.events();
    /// while !matches!(events.recv().await?, Event::Idle) {}
    /// assert_eq!(phone.messages(chat).await?[0].text, "written before the phone came");
    /// # Ok(())
    /// # }
    /// ```
    pub async fn approve(&self, code: &LinkCode) -> Result<(DeviceId, String), Error> {
        match self.op(Op::approve(code.clone())).await? {
            OpOut::Approved(id, name) => Ok((id, name)),
            other => Err(unexpected(other)),
        }
    }

    /// The account's sessions (every device whose session was not ended), and after how many
    /// days of inactivity they end (0: never).
    pub async fn sessions(&self) -> Result<(Vec<SessionInfo>, u32), Error> {
        match self.op(Op::sessions()).await? {
            OpOut::Sessions(s, ttl) => Ok((s, ttl)),
            other => Err(unexpected(other)),
        }
    }

    /// Ends another device's session and rotates the account's keys; made once the session is
    /// caught up, and again if the account moved on meanwhile.
    pub async fn revoke(&self, device: DeviceId) -> Result<(), Error> {
        self.op(Op::revoke(device)).await.map(drop)
    }

    /// Sets after how many days of inactivity the account's sessions end (0: never).
    pub async fn set_session_ttl(&self, days: u32) -> Result<(), Error> {
        self.op(Op::set_session_ttl(days)).await.map(drop)
    }

    /// Makes a new recovery key and stores the account's keys sealed under it on the relay
    /// (replacing an earlier one). Show it to the user once: nothing keeps it.
    pub async fn create_recovery_key(&self) -> Result<RecoveryKey, Error> {
        match self.op(Op::recovery_key()).await? {
            OpOut::RecoveryKey(k) => Ok(k),
            other => Err(unexpected(other)),
        }
    }

    /// Takes `name` as the account's username (`None` releases it).
    pub async fn set_username(&self, name: Option<&str>) -> Result<(), Error> {
        self.op(Op::set_username(name.map(str::to_string))).await.map(drop)
    }

    /// Looks `username` up in the directory and pins the account it names on first use
    /// ([`Error::KeyChanged`] if another account is pinned for it); with `confirm`, the safety
    /// number the users compared, pins that account and marks it verified.
    pub async fn lookup(&self, username: &str, confirm: Option<&str>) -> Result<ContactInfo, Error> {
        match self.op(Op::lookup(username.to_string(), confirm.map(str::to_string))).await? {
            OpOut::Contact(c) => Ok(c),
            other => Err(unexpected(other)),
        }
    }

    /// Accepts chats from `account` (or with `accept` false, no longer does): only an account
    /// this one accepts can create a chat with it or add it to a group (the relay refuses the
    /// others with `NotAllowed`). Answers `account`'s invitation, if one waits.
    pub async fn accept_chats_from(&self, account: AccountId, accept: bool) -> Result<(), Error> {
        self.op(Op::accept(account, accept)).await.map(drop)
    }

    /// Asks `account` to accept chats from this account; it sees the invitation in
    /// [`Session::invitations`] until it answers ([`Session::accept_chats_from`]).
    pub async fn invite(&self, account: AccountId) -> Result<(), Error> {
        self.op(Op::invite(account)).await.map(drop)
    }

    /// The accounts that invited this one and wait for its answer, with when each asked (ms
    /// since the Unix epoch, by the relay's clock), oldest first.
    pub async fn invitations(&self) -> Result<Vec<(AccountId, u64)>, Error> {
        match self.op(Op::invitations()).await? {
            OpOut::Invitations(from) => Ok(from),
            other => Err(unexpected(other)),
        }
    }

    /// Creates a direct chat (one user) or a group with other accounts, looked up by username
    /// first. It is made here and queued like [`Session::create_chat`].
    pub async fn create_chat_with(&self, kind: ChatKind, title: &str, users: &[String]) -> Result<ChatId, Error> {
        let mut others = Vec::new();
        for user in users {
            let info = self.lookup(user, None).await?;
            if info.accepts_you == Some(false) {
                return Err(Error::NotAccepted(user.clone()));
            }
            others.push(info.account.parse().map_err(|_| Error::Untrusted("the directory gave a bad account id"))?);
        }
        self.call(|reply| Command::CreateChatWith { kind, title: title.to_string(), others, reply }).await
    }

    /// Changes a chat's members (add with or without the history, remove, leave): made once the
    /// session is caught up; the chat's next key epoch follows by itself.
    pub async fn change_members(&self, chat: ChatId, change: Membership) -> Result<(), Error> {
        self.op(Op::change_members(chat, change)).await.map(drop)
    }

    /// Renames a chat (queued like a message).
    pub async fn rename(&self, chat: ChatId, title: &str) -> Result<(), Error> {
        self.call(|reply| Command::Rename { chat, title: title.to_string(), reply }).await
    }

    /// Every chat on this device.
    pub async fn chats(&self) -> Result<Vec<ChatSummary>, Error> {
        self.call(|reply| Command::Read(ReadCmd::Chats(reply))).await
    }

    /// The account's devices as this device knows them (their certificates).
    pub async fn devices(&self) -> Result<Vec<DeviceCert>, Error> {
        self.call(|reply| Command::Read(ReadCmd::Devices(reply))).await
    }

    /// Another account as this device knows it.
    pub async fn contact(&self, account: AccountId) -> Result<Option<ContactInfo>, Error> {
        self.call(|reply| Command::Read(ReadCmd::Contact(account, reply))).await
    }
}
