//! Claim-check objects cut in the object store's default 128 KiB chunks against tally's
//! (`results_stream::object_chunk_size`: the server's `max_payload` less 1 KiB): the time to
//! store and to read back one result of ADC's 29,176-class model (~9 MB), on the NATS server
//! at `NATS_URL` (default `nats://127.0.0.1:4222`). The figures in docs/operations.md came
//! from `cargo run --release --example object_chunks`.
//!
//! Usage: `cargo run --release --example object_chunks [bytes] [objects]`.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, object_store};
use tally::results_stream::{self, Objects};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let mut args = std::env::args().skip(1);
    let size: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(9_000_000);
    let objects: u32 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(10);
    let client = async_nats::connect(&url).await?;
    let max_payload = client.server_info().max_payload;
    let js = jetstream::new(client);
    let body: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    println!("{objects} objects of {size} bytes, max_payload {max_payload}");
    println!("| chunks | chunk size | put, per object | read, per object |");
    println!("|---:|---:|---:|---:|");
    for chunk in [128 * 1024, results_stream::object_chunk_size(max_payload)] {
        let name = format!("TALLY_EXAMPLE_CHUNKS_{}", std::process::id());
        let bucket = results_stream::ensure_bucket(&js, &name, Duration::from_secs(600)).await?;
        let (put, read) = measure(&bucket, &body, chunk, objects).await;
        js.delete_object_store(&name).await?;
        let info = size.div_ceil(chunk);
        println!("| {info} | {chunk} | {:.1} ms | {:.1} ms |", ms(put / objects), ms(read / objects));
    }
    Ok(())
}

async fn measure(bucket: &Objects, body: &[u8], chunk: usize, objects: u32) -> (Duration, Duration) {
    let started = Instant::now();
    for i in 0..objects {
        let meta =
            object_store::ObjectMetadata { name: format!("o{i}"), chunk_size: Some(chunk), ..Default::default() };
        bucket.store.put(meta, &mut &body[..]).await.expect("put");
    }
    let put = started.elapsed();
    let started = Instant::now();
    for i in 0..objects {
        let read = results_stream::fetch_object(bucket, &format!("o{i}"), body.len()).await.expect("read");
        assert_eq!(read.len(), body.len());
    }
    (put, started.elapsed())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
