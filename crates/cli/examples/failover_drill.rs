//! The load side of `scripts/failover-drill.sh`: the same counter load against Redis (INCR,
//! following Sentinel) or against an imstate cluster (Next, through the smart client), for a
//! fixed time, while the script kills or pauses the master/owner. Prints one JSON object:
//! calls, the longest time without any successful call (unavailability), and the values that
//! a failover made repeat (duplicates) or go back (rollbacks: a value below one already
//! acknowledged for the key), checked with imstate's S1 history checker.
//!
//! Client settings (they decide what a Redis failover costs; reported as given): a call that
//! does not complete within `--timeout-ms` is abandoned (outcome unknown); after a failure the
//! Redis client asks the sentinels for the master again and reconnects.
//!
//! Usage: failover_drill --redis-sentinels H:P,H:P,H:P --master NAME | --imstate H:P
//!        [--seconds 30] [--workers 8] [--keys 16] [--timeout-ms 500]

use std::time::{Duration, Instant};

use imstate_check::seq::{Outcome, SeqCall, Violation, check};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

struct Args {
    sentinels: Vec<String>,
    master: String,
    imstate: Option<String>,
    seconds: u64,
    workers: u64,
    keys: u64,
    timeout: Duration,
}

fn args() -> Args {
    let mut args = Args {
        sentinels: Vec::new(),
        master: "mymaster".into(),
        imstate: None,
        seconds: 30,
        workers: 8,
        keys: 16,
        timeout: Duration::from_millis(500),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--redis-sentinels" => args.sentinels = value.split(',').map(str::to_owned).collect(),
            "--master" => args.master = value,
            "--imstate" => args.imstate = Some(value),
            "--seconds" => args.seconds = value.parse().expect("seconds"),
            "--workers" => args.workers = value.parse().expect("workers"),
            "--keys" => args.keys = value.parse().expect("keys"),
            "--timeout-ms" => args.timeout = Duration::from_millis(value.parse().expect("ms")),
            other => panic!("unknown flag {other}"),
        }
    }
    args
}

/// One RESP request (an array of bulk strings) and its reply line(s), minimal.
async fn resp(stream: &mut BufReader<TcpStream>, parts: &[&str]) -> std::io::Result<Vec<String>> {
    let mut request = format!("*{}\r\n", parts.len());
    for part in parts {
        request.push_str(&format!("${}\r\n{part}\r\n", part.len()));
    }
    stream.get_mut().write_all(request.as_bytes()).await?;
    let mut line = String::new();
    stream.read_line(&mut line).await?;
    let line = line.trim_end().to_owned();
    let invalid = |what: &str| std::io::Error::other(format!("{what}: {line}"));
    match line.chars().next() {
        Some(':') | Some('+') => Ok(vec![line[1..].to_owned()]),
        Some('-') => Err(invalid("error reply")),
        Some('*') => {
            let count: i64 = line[1..].parse().map_err(|_| invalid("array"))?;
            let mut items = Vec::new();
            for _ in 0..count.max(0) {
                let mut header = String::new();
                stream.read_line(&mut header).await?;
                let mut value = String::new();
                stream.read_line(&mut value).await?;
                items.push(value.trim_end().to_owned());
            }
            Ok(items)
        }
        _ => Err(invalid("unexpected reply")),
    }
}

/// The master's address, as the first sentinel that answers says.
async fn master_of(sentinels: &[String], name: &str) -> Option<String> {
    for sentinel in sentinels {
        let Ok(Ok(stream)) =
            tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(sentinel)).await
        else {
            continue;
        };
        let mut stream = BufReader::new(stream);
        if let Ok(Ok(reply)) = tokio::time::timeout(
            Duration::from_millis(300),
            resp(&mut stream, &["SENTINEL", "get-master-addr-by-name", name]),
        )
        .await
            && reply.len() == 2
        {
            return Some(format!("{}:{}", reply[0], reply[1]));
        }
    }
    None
}

async fn redis_worker(args: &Args, worker: u64, origin: Instant, until: Instant) -> Vec<SeqCall> {
    let mut history = Vec::new();
    let mut connection: Option<BufReader<TcpStream>> = None;
    let mut turn = worker;
    while Instant::now() < until {
        if connection.is_none() {
            if let Some(master) = master_of(&args.sentinels, &args.master).await
                && let Ok(Ok(stream)) =
                    tokio::time::timeout(args.timeout, TcpStream::connect(&master)).await
            {
                connection = Some(BufReader::new(stream));
            } else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        }
        turn += 1;
        let key = turn % args.keys;
        let name = format!("drill:{key}");
        let start = origin.elapsed().as_nanos() as u64;
        let stream = connection.as_mut().expect("connected");
        let reply = tokio::time::timeout(args.timeout, resp(stream, &["INCR", &name])).await;
        let end = origin.elapsed().as_nanos() as u64;
        let outcome = match reply {
            Ok(Ok(reply)) => match reply.first().and_then(|value| value.parse().ok()) {
                Some(value) => Outcome::Ok(vec![value]),
                None => Outcome::Unknown,
            },
            _ => {
                connection = None;
                Outcome::Unknown
            }
        };
        history.push(SeqCall {
            ids: vec![key],
            start_ns: start,
            end_ns: end,
            outcome,
        });
    }
    history
}

async fn imstate_worker(
    client: &imstate_client::ClusterClient,
    args: &Args,
    worker: u64,
    origin: Instant,
    until: Instant,
) -> Vec<SeqCall> {
    let mut history = Vec::new();
    let mut turn = worker;
    while Instant::now() < until {
        turn += 1;
        // The same small key space as Redis, as ids of one section (one owner).
        let key = turn % args.keys;
        let start = origin.elapsed().as_nanos() as u64;
        let reply = tokio::time::timeout(args.timeout, client.next("", key)).await;
        let end = origin.elapsed().as_nanos() as u64;
        let outcome = match reply {
            Ok(Ok(value)) => Outcome::Ok(vec![value]),
            _ => Outcome::Unknown,
        };
        history.push(SeqCall {
            ids: vec![key],
            start_ns: start,
            end_ns: end,
            outcome,
        });
    }
    history
}

#[tokio::main]
async fn main() {
    let args = args();
    let origin = Instant::now();
    let until = origin + Duration::from_secs(args.seconds);
    let client = match &args.imstate {
        Some(address) => Some(
            imstate_client::ClusterClient::connect(
                address,
                &imstate_client::ClientOptions::default(),
                None,
            )
            .await
            .expect("connect to the imstate cluster"),
        ),
        None => None,
    };
    let mut tasks = Vec::new();
    for worker in 0..args.workers {
        let args = &args;
        let client = client.as_ref();
        tasks.push(async move {
            match client {
                Some(client) => imstate_worker(client, args, worker, origin, until).await,
                None => redis_worker(args, worker, origin, until).await,
            }
        });
    }
    let mut history = Vec::new();
    for part in futures_all(tasks).await {
        history.extend(part);
    }
    let ok: Vec<&SeqCall> = history
        .iter()
        .filter(|call| matches!(call.outcome, Outcome::Ok(_)))
        .collect();
    // Unavailability: the longest time between two successful completions.
    let mut ends: Vec<u64> = ok.iter().map(|call| call.end_ns).collect();
    ends.sort_unstable();
    let longest_gap_ms = ends
        .windows(2)
        .map(|pair| pair[1] - pair[0])
        .max()
        .unwrap_or(0) as f64
        / 1e6;
    let violations = check(&history);
    let duplicates = violations
        .iter()
        .filter(|violation| matches!(violation, Violation::Duplicate { .. }))
        .count();
    let rollbacks = violations
        .iter()
        .filter(|violation| matches!(violation, Violation::RealTime { .. }))
        .count();
    println!(
        "{}",
        serde_json::json!({
            "target": if args.imstate.is_some() { "imstate" } else { "redis" },
            "calls": history.len(),
            "ok": ok.len(),
            "longest_gap_ms": longest_gap_ms,
            "duplicates": duplicates,
            "rollbacks": rollbacks,
            "timeout_ms": args.timeout.as_millis() as u64,
            "workers": args.workers,
            "keys": args.keys,
        })
    );
}

/// Runs futures concurrently on this task and returns their outputs in order.
async fn futures_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut pending: Vec<Option<std::pin::Pin<Box<F>>>> = futures
        .into_iter()
        .map(|future| Some(Box::pin(future)))
        .collect();
    let mut outputs: Vec<Option<F::Output>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (index, slot) in pending.iter_mut().enumerate() {
            if let Some(future) = slot {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(output) => {
                        outputs[index] = Some(output);
                        *slot = None;
                    }
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    outputs
        .into_iter()
        .map(|output| output.expect("finished"))
        .collect()
}
