//! `imstate seq ...`: client commands of the sequence service.
//!
//! `next` and `current` send ONE batch call for all ids and print one value per line in argument
//! order.

use clap::{Args, Subcommand};
use imstate_client::{Client, Namespace};

/// Where the node is.
#[derive(Args)]
pub struct Target {
    /// Node address, host:port.
    #[arg(long, default_value = "127.0.0.1:7700", env = "IMSTATE_ADDR")]
    addr: String,
}

impl Target {
    /// The node address.
    pub fn address(&self) -> &str {
        &self.addr
    }
}

#[derive(Subcommand)]
pub enum SeqCommand {
    /// Allocates the next seq of each ID (one NextBatch call); prints one per line.
    Next {
        #[command(flatten)]
        target: Target,
        /// Namespace.
        #[arg(long, default_value = "default")]
        ns: String,
        /// Ids, in order; a repeated id gets increasing values.
        #[arg(required = true)]
        ids: Vec<u64>,
    },
    /// Prints the current seq of each ID (one CurrentBatch call); 0 = never allocated.
    Current {
        #[command(flatten)]
        target: Target,
        /// Namespace.
        #[arg(long, default_value = "default")]
        ns: String,
        /// Ids, in order.
        #[arg(required = true)]
        ids: Vec<u64>,
    },
    /// Lists namespaces: name, id range, section size, step.
    Namespaces {
        #[command(flatten)]
        target: Target,
    },
    /// Creates a namespace (its layout can never change afterwards).
    CreateNamespace(CreateNamespace),
}

#[derive(Args)]
pub struct CreateNamespace {
    #[command(flatten)]
    target: Target,
    /// Name: 1 to 64 bytes of [A-Za-z0-9_.-].
    name: String,
    /// First id.
    #[arg(long, default_value_t = 0)]
    id_lo: u64,
    /// One past the last id.
    #[arg(long)]
    id_hi: u64,
    /// Adjacent ids sharing one persisted max_seq.
    #[arg(long, default_value_t = 100_000)]
    section_size: u64,
    /// How far max_seq is raised at a time.
    #[arg(long, default_value_t = 10_000)]
    step: u64,
}

pub async fn run(command: SeqCommand) -> anyhow::Result<()> {
    match command {
        SeqCommand::Next { target, ns, ids } => {
            let seqs = Client::connect(&target.addr)
                .await?
                .next_batch(&ns, ids)
                .await?;
            print_lines(seqs);
        }
        SeqCommand::Current { target, ns, ids } => {
            let seqs = Client::connect(&target.addr)
                .await?
                .current_batch(&ns, ids)
                .await?;
            print_lines(seqs);
        }
        SeqCommand::Namespaces { target } => {
            for namespace in Client::connect(&target.addr)
                .await?
                .list_namespaces()
                .await?
            {
                print_namespace(&namespace);
            }
        }
        SeqCommand::CreateNamespace(args) => {
            let namespace = Namespace {
                name: args.name,
                id_lo: args.id_lo,
                id_hi: args.id_hi,
                section_size: args.section_size,
                step: args.step,
            };
            let client = Client::connect(&args.target.addr).await?;
            print_namespace(&client.create_namespace(namespace).await?);
        }
    }
    Ok(())
}

fn print_lines(values: Vec<u64>) {
    let mut out = String::with_capacity(values.len() * 8);
    for value in values {
        out.push_str(&value.to_string());
        out.push('\n');
    }
    print!("{out}");
}

fn print_namespace(namespace: &Namespace) {
    println!(
        "{}\tids=[{}, {})\tsection_size={}\tstep={}",
        namespace.name, namespace.id_lo, namespace.id_hi, namespace.section_size, namespace.step
    );
}
