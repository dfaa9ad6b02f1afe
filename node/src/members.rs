//! The commands for chats with other accounts: creating direct chats and groups, changing
//! their members, and checking contacts.

use clap::Subcommand;
use stratus_engine::proto::directory::Membership;
use stratus_engine::proto::wire::ChatKind;
use stratus_engine::{AccountId, ChatId, Device, Error};

use crate::local::{sync_until_idle, with_current_keys};
use crate::print::{json_line, out};
use crate::Failure;

#[derive(Subcommand)]
pub(crate) enum ContactCommand {
    /// Look USER up and print the safety number to compare with them (in person, or over a
    /// channel you trust). Warns if the relay now names another account for USER than the one
    /// this device saw first. --confirm NUMBER, with the number you compared, trusts the account
    /// it belongs to and marks it verified.
    Verify {
        user: String,
        #[arg(long, value_name = "NUMBER")]
        confirm: Option<String>,
    },
    /// Ask USER to accept chats from you: until they do, you cannot make a chat with them or
    /// add them to a group.
    Invite { user: String },
    /// The accounts that invited you, waiting for your answer.
    Invitations,
    /// Accept chats from WHO (a username, or an account id from `contact invitations`): they can
    /// make chats with you and add you to groups.
    Accept { who: String },
    /// Decline WHO's invitation, or stop accepting chats from WHO (chats you are in stay).
    Decline { who: String },
}

/// One invitation as the CLI prints it (`--json`: one object a line).
pub(crate) fn invitation_line(json: bool, account: &str, at_ms: u64) -> String {
    let at = crate::view::rfc3339(i64::try_from(at_ms).unwrap_or(i64::MAX));
    match json {
        true => serde_json::json!({ "account": account, "invited": at }).to_string(),
        false => format!("{account} invited you on {at}"),
    }
}

/// Looks each user up (pinning on first use) and returns their account ids. Callers sync first:
/// keys seen in a lookup are the newest this device accepts, so what the account log still
/// holds from those users must be taken before.
async fn accounts_of(device: &mut Device, users: &[String]) -> Result<Vec<AccountId>, Failure> {
    look_up(device, users, false).await
}

/// [`accounts_of`] for accounts to put in a chat: each must accept chats from this account
/// ([`Error::NotAccepted`] before anything is made otherwise).
async fn members_of(device: &mut Device, users: &[String]) -> Result<Vec<AccountId>, Failure> {
    look_up(device, users, true).await
}

async fn look_up(device: &mut Device, users: &[String], accepting: bool) -> Result<Vec<AccountId>, Failure> {
    let mut out = Vec::new();
    for user in users {
        let info = device.lookup(user).await?;
        if accepting && info.accepts_you == Some(false) {
            return Err(Error::NotAccepted(user.clone()).into());
        }
        out.push(info.account.parse().map_err(|_| Failure::Other(format!("the relay gave a bad id for {user}")))?);
    }
    Ok(out)
}

pub(crate) async fn create_chat(
    mut device: Device,
    title: Option<String>,
    direct: Option<String>,
    group: bool,
    members: Vec<String>,
) -> Result<ChatId, Failure> {
    // Like `send`: the chat is made here first and queued; the command returns once the relay
    // has it (a session's `Idle` from before the creation was queued would not say that).
    device.account().ok_or(Error::NotLoggedIn)?;
    let (kind, users) = match (direct, group) {
        (Some(user), _) => (ChatKind::Direct, vec![user]),
        (None, true) => (ChatKind::Group, members),
        (None, false) => (ChatKind::Notes, Vec::new()),
    };
    if !users.is_empty() {
        device = sync_until_idle(device).await?;
    }
    let others = members_of(&mut device, &users).await?;
    let (chat, _) = device.new_chat_with(kind, title.as_deref().unwrap_or(""), &others)?;
    sync_until_idle(device).await?;
    Ok(chat)
}

/// Changes a chat's members (the caller synced first: the change is made for the chat's state
/// as this device has it), again after a sync if the chat moved on meanwhile, and syncs
/// afterwards until this device's key work (the chat's next epoch) is done.
async fn change(mut device: Device, chat: ChatId, change: Membership) -> Result<(), Failure> {
    with_current_keys!(device, device.change_members(chat, change.clone()).await);
    sync_until_idle(device).await?;
    Ok(())
}

pub(crate) async fn add(
    mut device: Device,
    chat: ChatId,
    users: Vec<String>,
    share_history: bool,
) -> Result<(), Failure> {
    device.account().ok_or(Error::NotLoggedIn)?;
    device = sync_until_idle(device).await?;
    let accounts = members_of(&mut device, &users).await?.into_iter().collect();
    change(device, chat, Membership::Add { accounts, share_history }).await
}

pub(crate) async fn remove(mut device: Device, chat: ChatId, user: String) -> Result<(), Failure> {
    device.account().ok_or(Error::NotLoggedIn)?;
    device = sync_until_idle(device).await?;
    let account = accounts_of(&mut device, &[user]).await?[0];
    change(device, chat, Membership::Remove { account }).await
}

pub(crate) async fn leave(mut device: Device, chat: ChatId) -> Result<(), Failure> {
    device.account().ok_or(Error::NotLoggedIn)?;
    device = sync_until_idle(device).await?;
    change(device, chat, Membership::Leave).await
}

/// The account `who` names: an account id as such, else a username looked up (and pinned).
async fn account_named(device: &mut Device, who: &str) -> Result<AccountId, Failure> {
    match who.parse() {
        Ok(id) => Ok(id),
        Err(_) => Ok(accounts_of(device, &[who.to_string()]).await?[0]),
    }
}

pub(crate) async fn contact(mut device: Device, command: ContactCommand, json: bool) -> Result<(), Failure> {
    let (user, confirm) = match command {
        ContactCommand::Verify { user, confirm } => (user, confirm),
        ContactCommand::Invite { user } => {
            let account = account_named(&mut device, &user).await?;
            return Ok(device.invite(account).await?);
        }
        ContactCommand::Accept { who } => {
            let account = account_named(&mut device, &who).await?;
            return Ok(device.accept_chats_from(account, true).await?);
        }
        ContactCommand::Decline { who } => {
            let account = account_named(&mut device, &who).await?;
            return Ok(device.accept_chats_from(account, false).await?);
        }
        ContactCommand::Invitations => {
            for (account, at_ms) in device.invitations().await? {
                out(&invitation_line(json, &account.to_string(), at_ms));
            }
            return Ok(());
        }
    };
    let info = match confirm {
        Some(number) => device.confirm_contact(&user, &number).await?,
        None => device.lookup(&user).await?,
    };
    if json {
        out(&json_line(&info));
    } else {
        out(&format!("{user}: account {}", info.account));
        out(&format!("safety number: {}", info.safety_number));
        out(if info.verified {
            "verified: you confirmed this number"
        } else {
            "not verified: compare the number with them, then run `contact verify USER --confirm NUMBER`"
        });
    }
    Ok(())
}
