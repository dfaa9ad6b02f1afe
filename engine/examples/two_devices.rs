//! Two devices of one account, synced through a relay.
//!
//! Start a relay first and pass the address it prints:
//!
//! ```sh
//! cargo run -p stratus-relay -- --data-dir /tmp/relay --listen /ip4/127.0.0.1/tcp/4001
//! cargo run -p stratus-engine --example two_devices -- /ip4/127.0.0.1/tcp/4001/p2p/12D3KooW...
//! ```

use std::time::Duration;

use stratus_engine::{Device, Event, Session};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let relay = std::env::args().nth(1).ok_or("usage: two_devices <relay multiaddr with /p2p/…>")?;
    let dir = std::env::temp_dir().join(format!("stratus-example-{}", std::process::id()));

    // The laptop creates the account.
    let mut laptop = Device::open(&dir.join("laptop"))?;
    let account = laptop.create_account(&relay, "laptop").await?;
    println!("account {account}");

    // The phone shows a link code; the laptop approves it (here both in one process).
    let mut phone = Device::open(&dir.join("phone"))?;
    let code = phone.link_code()?;
    let (relay2, code2) = (relay.clone(), code.clone());
    let waiting = tokio::spawn(async move { phone.link(&relay2, "phone", &code2).await.map(|_| phone) });
    tokio::time::sleep(Duration::from_millis(200)).await; // let the phone register its wait
    laptop.approve(&code).await?;
    let phone = waiting.await??;
    println!("phone linked");

    // Both run a session; the laptop creates a chat and writes.
    let mut on_laptop = Session::start(laptop)?;
    let mut laptop_events = on_laptop.events();
    while !matches!(laptop_events.recv().await?, Event::Connected) {}
    let chat = on_laptop.create_chat("Notes").await?;
    let mut on_phone = Session::start(phone)?;
    let mut phone_events = on_phone.events();
    on_laptop.send(chat, "hello from the laptop").await?;

    // The phone learns of the chat from the account log and receives the message.
    loop {
        if let Event::MessageAdded { message, .. } = phone_events.recv().await? {
            println!("phone got: {}", message.text);
            break;
        }
    }
    on_phone.stop().await?;
    on_laptop.stop().await?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
