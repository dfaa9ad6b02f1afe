//! The directory of other accounts: this account's username on the relay, usernames looked up
//! and the accounts they name pinned on first use, other accounts' chains of keys (checked
//! from the account id on, never taken shorter or forked), and safety numbers (see
//! docs/crypto.md, "Members").

use serde::Serialize;

use crate::device::error::Error;
use crate::device::local::Device;
use crate::device::store::Contact;
use crate::proto::cert::AccountGen;
use crate::proto::directory::{check_username, safety_number, AccountChain, DirectoryEntry};
use crate::proto::ids::AccountId;
use crate::proto::wire::{ClientFrame, RelayFrame};

/// Another account as this device knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContactInfo {
    /// Its id.
    pub account: String,
    /// The username it was pinned under, if looked up by name.
    pub username: Option<String>,
    /// The generation of its keys this device has seen.
    pub generation: u32,
    /// The user confirmed the safety number.
    pub verified: bool,
    /// Whether it accepts chats from this account, as the relay said in the lookup that gave
    /// this (`None`: not from a lookup). Without it, the relay refuses to put it in a chat made
    /// or changed by this account.
    pub accepts_you: Option<bool>,
    /// The number both users see for the pair (see [`safety_number`]).
    pub safety_number: String,
}

impl Device {
    /// Takes `name` as this account's username on the relay (`None` releases it).
    pub async fn set_username(&mut self, name: Option<&str>) -> Result<(), Error> {
        if let Some(n) = name {
            check_username(n)?;
        }
        self.one_request(ClientFrame::SetUsername { req: 1, name: name.map(str::to_string) }, 1).await?;
        Ok(())
    }

    /// Accepts chats from `account`, or with `accept` false no longer does (see
    /// [`crate::Session::accept_chats_from`]).
    pub async fn accept_chats_from(&mut self, account: AccountId, accept: bool) -> Result<(), Error> {
        self.one_request(ClientFrame::Accept { req: 1, account, accept }, 1).await?;
        Ok(())
    }

    /// Asks `account` to accept chats from this account (see [`crate::Session::invite`]).
    pub async fn invite(&mut self, account: AccountId) -> Result<(), Error> {
        self.one_request(ClientFrame::Invite { req: 1, account }, 1).await?;
        Ok(())
    }

    /// The invitations waiting for this account (see [`crate::Session::invitations`]).
    pub async fn invitations(&mut self) -> Result<Vec<(AccountId, u64)>, Error> {
        match self.one_request(ClientFrame::ListInvitations { req: 1 }, 1).await? {
            RelayFrame::Invitations { from, .. } => Ok(from),
            _ => {
                Err(Error::Relay { code: crate::proto::wire::ErrorCode::Internal, message: "unexpected answer".into() })
            }
        }
    }

    /// Looks `username` up in the relay's directory and pins the account it names on first use.
    /// [`Error::KeyChanged`] if the directory now names another account than the pinned one.
    pub async fn lookup(&mut self, username: &str) -> Result<ContactInfo, Error> {
        self.lookup_and_pin(username, None).await
    }

    /// After the users compared safety numbers: pins the account the directory names for
    /// `username` now (even if another was pinned) and marks it verified, if `number` is the
    /// safety number with it ([`Error::NumberMismatch`] otherwise: the directory may have
    /// changed its answer since the number was shown).
    pub async fn confirm_contact(&mut self, username: &str, number: &str) -> Result<ContactInfo, Error> {
        self.lookup_and_pin(username, Some(number)).await
    }

    async fn lookup_and_pin(&mut self, username: &str, confirm: Option<&str>) -> Result<ContactInfo, Error> {
        check_username(username)?;
        let reply = self.one_request(ClientFrame::Lookup { req: 1, username: username.to_string() }, 1).await?;
        self.lookup_answer(username, confirm, reply)
    }

    /// Takes the directory's answer to a `Lookup` of `username` (see [`Device::lookup`] and
    /// [`Device::confirm_contact`]).
    pub(crate) fn lookup_answer(
        &mut self,
        username: &str,
        confirm: Option<&str>,
        reply: RelayFrame,
    ) -> Result<ContactInfo, Error> {
        let entry = match reply {
            RelayFrame::Accounts { mut accounts, .. }
                if accounts.len() == 1 && accounts[0].username.as_deref() == Some(username) =>
            {
                accounts.remove(0)
            }
            _ => return Err(Error::Untrusted("the directory answered for another name")),
        };
        if let Some(number) = confirm {
            let digits = |s: &str| s.chars().filter(char::is_ascii_digit).collect::<String>();
            let me = self.login()?.account.id;
            if digits(number) != digits(&safety_number(me, entry.chain.id())) {
                return Err(Error::NumberMismatch(username.to_string()));
            }
        }
        let mut info = self.take_named(username, &entry, confirm.is_some())?;
        info.accepts_you = Some(entry.accepts_you);
        Ok(info)
    }

    /// Takes what the directory says `username` is: refused if another account is pinned for it
    /// (unless `confirm`), pinned otherwise.
    pub(crate) fn take_named(
        &mut self,
        username: &str,
        entry: &DirectoryEntry,
        confirm: bool,
    ) -> Result<ContactInfo, Error> {
        let id = entry.chain.id();
        if Some(id) == self.account() {
            return Err(Error::Untrusted("that username is this account's own"));
        }
        if let Some(pinned) = self.store.pin(username)? {
            if pinned != id && !confirm {
                let number = safety_number(self.login()?.account.id, id);
                return Err(Error::KeyChanged { username: username.to_string(), pinned, now: id, number });
            }
        }
        self.take_chain(&entry.chain)?;
        self.store.set_pin(username, id)?;
        let mut c = self.store.contact(id)?.expect("taken above");
        c.username = Some(username.to_string());
        c.verified |= confirm;
        self.store.put_contact(&c)?;
        self.contact_info(&c)
    }

    /// Another account as this device knows it, by id.
    pub fn contact(&self, account: AccountId) -> Result<Option<ContactInfo>, Error> {
        self.store.contact(account)?.map(|c| self.contact_info(&c)).transpose()
    }

    /// The account pinned under `username`, if any.
    pub fn pinned(&self, username: &str) -> Result<Option<AccountId>, Error> {
        Ok(self.store.pin(username)?)
    }

    fn contact_info(&self, c: &Contact) -> Result<ContactInfo, Error> {
        Ok(ContactInfo {
            account: c.chain.id().to_string(),
            username: c.username.clone(),
            generation: c.chain.rotations.len() as u32,
            verified: c.verified,
            accepts_you: None,
            safety_number: safety_number(self.login()?.account.id, c.chain.id()),
        })
    }

    /// Takes another account's chain of keys: checked from the account id on, refused when it
    /// is behind or beside the chain this device saw (keys a rotation ended must not sign
    /// again), kept when it is longer. Returns the newest generation.
    pub(crate) fn take_chain(&mut self, chain: &AccountChain) -> Result<AccountGen, Error> {
        let gens = chain.verify()?;
        match self.store.contact(chain.id())? {
            Some(c) if c.chain.extended_by(chain) => {
                if c.chain != *chain {
                    self.store.put_contact(&Contact { chain: chain.clone(), ..c })?;
                }
            }
            Some(c) if chain.extended_by(&c.chain) => {
                return Err(Error::Untrusted("keys of another account older than ones this device saw"))
            }
            Some(_) => return Err(Error::Untrusted("another account's keys fork from the ones this device saw")),
            None => self.store.put_contact(&Contact { chain: chain.clone(), username: None, verified: false })?,
        }
        Ok(gens.last().expect("a chain has its genesis").clone())
    }

    /// Takes other accounts' keys as the directory gave them (the answer to a
    /// `LookupAccounts`), each checked from its id: for drivers other than [`Device::lookup`],
    /// before [`Device::new_chat_with`].
    pub fn take_accounts(&mut self, accounts: &[DirectoryEntry]) -> Result<(), Error> {
        for entry in accounts {
            self.take_chain(&entry.chain)?;
        }
        Ok(())
    }

    /// Whether `account` is a contact (its keys are pinned here).
    pub fn is_contact(&self, account: AccountId) -> Result<bool, Error> {
        Ok(self.store.contact(account)?.is_some())
    }
}
