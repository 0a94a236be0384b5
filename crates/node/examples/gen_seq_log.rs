//! Writes a large sequence log for recovery measurements, through the real log engine.
//!
//! `cargo run --release -p imstate-node --example gen_seq_log -- DATA_DIR LOG_MIB SECTIONS`
//! creates `DATA_DIR/seq/` holding the default namespace and Raise records cycling over
//! `SECTIONS` sections of it (each raise one step above the section's last), until the log holds
//! `LOG_MIB` MiB. `imstate serve --data-dir DATA_DIR` then recovers it; the time from start to
//! "imstate listening" is the recovery time.

use imstate_log::{FileStorage, FsyncPolicy, Log, LogOptions};
use imstate_node::records::SeqRecord;
use imstate_seq::{NamespaceDef, Raise};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, data_dir, log_mib, sections] = args.as_slice() else {
        return Err("usage: gen_seq_log DATA_DIR LOG_MIB SECTIONS".into());
    };
    let log_bytes = log_mib.parse::<u64>()? * 1024 * 1024;
    let sections: u64 = sections.parse()?;
    let seq_dir = std::path::Path::new(data_dir).join("seq");
    std::fs::create_dir_all(&seq_dir)?;
    let options = LogOptions {
        fsync: FsyncPolicy::Never,
        ..LogOptions::default()
    };
    let (log, _) = Log::open(FileStorage::new(&seq_dir)?, options, |_| Ok(()))?;
    let default = NamespaceDef::default_namespace();
    log.append(SeqRecord::NamespaceCreated(default.clone()).encode())?;
    let mut records = 0u64;
    while log.stats().bytes_written < log_bytes {
        for _ in 0..100_000 {
            let section = records % sections;
            let max_seq = default.step * (1 + records / sections);
            log.append(
                SeqRecord::Raise(Raise {
                    ns: 0,
                    section,
                    max_seq,
                })
                .encode(),
            )?;
            records += 1;
        }
        log.wait_durable(log.last_lsn())?;
    }
    log.shutdown()?;
    println!(
        "{records} raise records, {} bytes",
        log.stats().bytes_written
    );
    Ok(())
}
