//! `imstate seq ...`: client commands of the sequence service.
//!
//! `next` and `current` send ONE batch call for all ids and print one value per line in argument
//! order.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use imstate_client::{Client, ClientOptions, Namespace};

/// Where the node is and how to reach it (TLS, token); shared by every client command.
#[derive(Args)]
pub struct Target {
    /// Node address, host:port: in cluster mode, any node (requests are routed to owners).
    #[arg(long, default_value = "127.0.0.1:7700", env = "IMSTATE_ADDR")]
    addr: String,
    /// The cluster the node must belong to; a node of another cluster is refused.
    /// [default: whichever the node serves]
    #[arg(long, env = "IMSTATE_CLUSTER", value_name = "NAME")]
    cluster: Option<String>,
    #[command(flatten)]
    security: Security,
}

/// TLS and token options of a client; shared by every client command and `bench`.
#[derive(Args, Clone, Debug, Default)]
pub struct Security {
    /// PEM CA that signed the node's certificate; turns TLS on.
    #[arg(long, env = "IMSTATE_TLS_CA", value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a node that requires mTLS (with --tls-key).
    #[arg(
        long,
        env = "IMSTATE_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(
        long,
        env = "IMSTATE_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,
    /// Name to verify in the node's certificate. [default: the host of the address]
    #[arg(long, value_name = "NAME")]
    tls_domain: Option<String>,
    /// File whose first non-comment line is the bearer token sent with every call.
    #[arg(long, env = "IMSTATE_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
}

impl Security {
    /// The client options these flags describe (reads the files).
    pub fn options(&self) -> anyhow::Result<ClientOptions> {
        let mut options = ClientOptions::from_files(
            self.tls_ca.as_deref(),
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            self.token_file.as_deref(),
        )?;
        options.tls_domain = self.tls_domain.clone();
        Ok(options)
    }

    /// Connects to `address` with these options.
    pub async fn connect(&self, address: &str) -> anyhow::Result<Client> {
        Ok(Client::connect_with(address, &self.options()?).await?)
    }

    /// Connects to a wire listener at `address` with these options: TLS (mTLS) with
    /// `--tls-ca` (`--tls-cert/--tls-key`), Hello with the token.
    pub async fn connect_wire(&self, address: &str) -> anyhow::Result<imstate_client::WireClient> {
        Ok(imstate_client::WireClient::connect_with(address, &self.options()?).await?)
    }
}

impl Target {
    /// Connects with the TLS and token options given.
    pub async fn connect(&self) -> anyhow::Result<Client> {
        self.security.connect(&self.addr).await
    }

    /// Connects to another node (`address`) with the same TLS and token options.
    pub async fn connect_to(&self, address: &str) -> anyhow::Result<Client> {
        self.security.connect(address).await
    }

    /// Connects the smart client: any node of a cluster, routed by its table.
    pub async fn connect_cluster(&self) -> anyhow::Result<imstate_client::ClusterClient> {
        Ok(imstate_client::ClusterClient::connect(
            &self.addr,
            &self.security.options()?,
            self.cluster.as_deref(),
        )
        .await?)
    }
}

#[derive(Subcommand)]
pub enum SeqCommand {
    /// Allocates the next seq of each ID (one NextBatch call); prints one per line. With
    /// `--count N`, reserves N consecutive seqs per ID (one NextRange call) and prints
    /// `FIRST<TAB>LAST` per line. With `--keys`, the IDs are string keys of a keyed namespace.
    Next {
        #[command(flatten)]
        target: Target,
        /// Namespace.
        #[arg(long, default_value = "default")]
        ns: String,
        /// Seqs to reserve per id, 1 to 1000000 (RANGE_COUNT_MAX).
        #[arg(long)]
        count: Option<u64>,
        /// The IDS are string keys (1 to 128 bytes) of a keyed namespace.
        #[arg(long)]
        keys: bool,
        /// Ids (or keys with --keys), in order; a repeated id gets increasing values.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Prints the current seq of each ID (one CurrentBatch call); 0 = never allocated.
    Current {
        #[command(flatten)]
        target: Target,
        /// Namespace.
        #[arg(long, default_value = "default")]
        ns: String,
        /// The IDS are string keys (1 to 128 bytes) of a keyed namespace.
        #[arg(long)]
        keys: bool,
        /// Ids (or keys with --keys), in order.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Sets the min_seq of each id (the floor below which its history is hidden; 0 clears
    /// it), all or none, in one SetMinSeq call; durable when it returns. Each argument is
    /// ID=MIN_SEQ; a min_seq above the id's current seq is refused. In a cluster each part goes
    /// to its section's owner (all or none per owner, at most 128 ids per owner).
    SetMinSeq {
        #[command(flatten)]
        target: Target,
        /// Namespace.
        #[arg(long, default_value = "default")]
        ns: String,
        /// The IDs are string keys (1 to 128 bytes) of a keyed namespace.
        #[arg(long)]
        keys: bool,
        /// ID=MIN_SEQ pairs, in order (a key may contain `=`: the last one splits).
        #[arg(required = true, value_name = "ID=MIN_SEQ")]
        pairs: Vec<String>,
    },
    /// Prints the min_seq of each ID (one GetMinSeq call); 0 = none set.
    MinSeq {
        #[command(flatten)]
        target: Target,
        /// Namespace.
        #[arg(long, default_value = "default")]
        ns: String,
        /// The IDS are string keys (1 to 128 bytes) of a keyed namespace.
        #[arg(long)]
        keys: bool,
        /// Ids (or keys with --keys), in order.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Lists namespaces: name, id range, section size, step, and `keys=string` if keyed.
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
    /// How far max_seq is raised at a time (1 to 2^32, STEP_MAX).
    #[arg(long, default_value_t = 10_000)]
    step: u64,
    /// `numeric`: ids are numbers in [id-lo, id-hi). `string`: ids are keys of 1 to 128 bytes,
    /// hashed (FNV-1a) onto [id-lo, id-hi) to find their section.
    #[arg(long, default_value = "numeric", value_parser = ["numeric", "string"])]
    keys: String,
}

/// The ids of a `seq` command: numbers, or with `--keys` the arguments' bytes.
enum IdArgs {
    Numeric(Vec<u64>),
    Keys(Vec<Vec<u8>>),
}

impl IdArgs {
    fn parse(args: Vec<String>, keys: bool) -> anyhow::Result<Self> {
        if keys {
            return Ok(IdArgs::Keys(
                args.into_iter().map(String::into_bytes).collect(),
            ));
        }
        args.iter()
            .map(|arg| {
                arg.parse::<u64>().map_err(|_| {
                    anyhow::anyhow!(
                        "id `{arg}` is not a number (the ids of a keyed namespace are strings: \
                         pass --keys)"
                    )
                })
            })
            .collect::<anyhow::Result<_>>()
            .map(IdArgs::Numeric)
    }
}

pub async fn run(command: SeqCommand) -> anyhow::Result<()> {
    match command {
        SeqCommand::Next {
            target,
            ns,
            count,
            keys,
            ids,
        } => {
            let ids = IdArgs::parse(ids, keys)?;
            let client = target.connect_cluster().await?;
            let ranges = match ids {
                IdArgs::Numeric(ids) => {
                    client
                        .next_range_batch(&ns, ids, count.unwrap_or(1))
                        .await?
                }
                IdArgs::Keys(keys) => client.next_keys(&ns, keys, count.unwrap_or(1)).await?,
            };
            if count.is_none() {
                print_lines(ranges.into_iter().map(|range| range.last).collect());
            } else {
                let mut out = String::new();
                for range in ranges {
                    out.push_str(&format!("{}\t{}\n", range.first, range.last));
                }
                print!("{out}");
            }
        }
        SeqCommand::Current {
            target,
            ns,
            keys,
            ids,
        } => {
            let client = target.connect_cluster().await?;
            let seqs = match IdArgs::parse(ids, keys)? {
                IdArgs::Numeric(ids) => client.current_batch(&ns, ids).await?,
                IdArgs::Keys(keys) => client.current_keys(&ns, keys).await?,
            };
            print_lines(seqs);
        }
        SeqCommand::SetMinSeq {
            target,
            ns,
            keys,
            pairs,
        } => {
            let mut ids = Vec::with_capacity(pairs.len());
            let mut values = Vec::with_capacity(pairs.len());
            for pair in pairs {
                let Some((id, value)) = pair.rsplit_once('=') else {
                    anyhow::bail!("`{pair}` is not ID=MIN_SEQ");
                };
                let value: u64 = value
                    .parse()
                    .map_err(|_| anyhow::anyhow!("min_seq `{value}` of `{id}` is not a number"))?;
                ids.push(id.to_owned());
                values.push(value);
            }
            let client = target.connect_cluster().await?;
            match IdArgs::parse(ids, keys)? {
                IdArgs::Numeric(ids) => client.set_min_seqs(&ns, ids, Vec::new(), values),
                IdArgs::Keys(keys) => client.set_min_seqs(&ns, Vec::new(), keys, values),
            }
            .await?;
        }
        SeqCommand::MinSeq {
            target,
            ns,
            keys,
            ids,
        } => {
            let client = target.connect_cluster().await?;
            let values = match IdArgs::parse(ids, keys)? {
                IdArgs::Numeric(ids) => client.min_seqs(&ns, ids, Vec::new()).await?,
                IdArgs::Keys(keys) => client.min_seqs(&ns, Vec::new(), keys).await?,
            };
            print_lines(values);
        }
        SeqCommand::Namespaces { target } => {
            for namespace in target.connect().await?.list_namespaces().await? {
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
                keys: args.keys,
            };
            let client = args.target.connect().await?;
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

pub fn print_namespace(namespace: &Namespace) {
    let keys = if namespace.keys == "string" {
        "\tkeys=string"
    } else {
        ""
    };
    println!(
        "{}\tids=[{}, {})\tsection_size={}\tstep={}{keys}",
        namespace.name, namespace.id_lo, namespace.id_hi, namespace.section_size, namespace.step
    );
}
