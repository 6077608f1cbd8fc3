//! Talk to a running node with the Rust client.
//!
//! ```sh
//! cargo run --release --bin flux-server &          # a node on 127.0.0.1:7379
//! cargo run --example quickstart -- 127.0.0.1:7379
//! ```
use std::time::Duration;

use flux_kv::client::{Client, ClientConfig, Condition, SetOptions, Ttl};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), flux_kv::client::Error> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:7379".into());
    let client = Client::connect(&addr, ClientConfig::default()).await?;
    let hello = client.hello();
    println!(
        "connected to {} ({} cores, {} shards, shard-aware: {})",
        hello.node_id,
        hello.cores,
        hello.shards,
        client.is_shard_aware()
    );

    client.set("greeting", "hello").await?;
    println!("greeting = {:?}", client.get("greeting").await?);
    println!("missing  = {:?}", client.get("no-such-key").await?);

    let first = client
        .set_with(
            "lock",
            "me",
            SetOptions {
                ttl: Some(Duration::from_secs(30)),
                condition: Condition::IfAbsent,
            },
        )
        .await?;
    println!("took the lock: {first}");
    if let Ttl::Expires(left) = client.ttl("lock").await? {
        println!("lock expires in {left:?}");
    }

    client.mset([("a", "1"), ("b", "2")]).await?;
    println!("mget a, c, b = {:?}", client.mget(["a", "c", "b"]).await?);
    for core in client.stats().await? {
        println!("core {}: {} requests, {} keys", core.core, core.requests, core.keys);
    }
    Ok(())
}
