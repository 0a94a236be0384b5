//! Harness for tests against the real `imstate` binary: start, kill -9, restart, request.
//!
//! Every server runs on a temporary data directory and a free loopback port, and is killed when
//! the harness is dropped, so a failing test leaves nothing running.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

/// Path of the binary under test.
/// `serve` flags that put every listener on a free port (for runs that fail before serving, or
/// that read the addresses from stdout).
pub const FREE_PORTS: [&str; 6] = [
    "--listen",
    "127.0.0.1:0",
    "--metrics-listen",
    "127.0.0.1:0",
    "--wire-listen",
    "127.0.0.1:0",
];

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_imstate")
}

/// A free loopback port, reserved for this test process (see
/// [`imstate_coord_etcd::loopback_port`]: a port bound and released would race with other
/// tests' connections).
pub fn free_port() -> u16 {
    imstate_coord_etcd::loopback_port()
}

/// A server process on a data directory, restartable on the same port.
pub struct Server {
    pub data_dir: PathBuf,
    pub addr: String,
    /// The HTTP listener (`/metrics`, `/healthz`, `/readyz`), on its own free port.
    pub metrics_addr: String,
    /// The wire-protocol listener, on its own free port.
    pub wire_addr: String,
    pub config: Option<PathBuf>,
    /// Extra arguments of `serve` and extra environment variables of the process.
    pub args: Vec<String>,
    pub envs: Vec<(String, String)>,
    child: Option<Child>,
    /// Total time spent waiting for restarts to become ready.
    pub restart_wait: Duration,
}

impl Server {
    /// Starts a server on `data_dir` with an optional config file.
    pub fn start(data_dir: &Path, config: Option<&Path>) -> Self {
        Self::start_with(data_dir, config, &[], &[])
    }

    /// Starts a server with extra `serve` arguments and environment variables.
    pub fn start_with(
        data_dir: &Path,
        config: Option<&Path>,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Self {
        let mut server = Self::new(data_dir, config, args, envs);
        server.restart();
        server
    }

    /// A server not started yet (see [`Server::spawn`] and [`Server::restart`]).
    pub fn new(
        data_dir: &Path,
        config: Option<&Path>,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Self {
        Self {
            data_dir: data_dir.to_path_buf(),
            addr: format!("127.0.0.1:{}", free_port()),
            metrics_addr: format!("127.0.0.1:{}", free_port()),
            wire_addr: format!("127.0.0.1:{}", free_port()),
            config: config.map(Path::to_path_buf),
            args: args.iter().map(|arg| arg.to_string()).collect(),
            envs: envs
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect(),
            child: None,
            restart_wait: Duration::ZERO,
        }
    }

    /// Where the node's log goes: the test's stderr, or with `IMSTATE_TEST_LOGDIR=DIR`
    /// appended to `DIR/<data dir name>.log` (one file per node across restarts, kept after
    /// the test; with `IMSTATE_TEST_LOG=info` for more than warnings), to tell the nodes of
    /// a failing cluster run apart.
    fn log_sink(&self) -> Stdio {
        let Ok(dir) = std::env::var("IMSTATE_TEST_LOGDIR") else {
            return Stdio::inherit();
        };
        let name = self.data_dir.file_name().unwrap().to_string_lossy();
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(format!("{dir}/{name}.log"))
            .map_or_else(|_| Stdio::inherit(), Stdio::from)
    }

    /// Spawns the process without waiting for it; returns its stdout.
    pub fn spawn(&mut self) -> std::process::ChildStdout {
        assert!(self.child.is_none(), "server still running");
        let mut command = Command::new(binary());
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen")
            .arg(&self.addr)
            .arg("--metrics-listen")
            .arg(&self.metrics_addr)
            .arg("--wire-listen")
            .arg(&self.wire_addr)
            .args(&self.args)
            .envs(self.envs.iter().map(|(key, value)| (key, value)))
            .env(
                "RUST_LOG",
                std::env::var("IMSTATE_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(self.log_sink());
        if let Some(config) = &self.config {
            command.arg("--config").arg(config);
        }
        let mut child = command.spawn().expect("spawn imstate");
        let stdout = child.stdout.take().unwrap();
        self.child = Some(child);
        stdout
    }

    /// Spawns the process and waits until it prints that it listens (recovery done).
    pub fn restart(&mut self) {
        let started = Instant::now();
        let stdout = self.spawn();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        assert!(
            line.starts_with("imstate listening on"),
            "unexpected first line: {line:?}"
        );
        self.restart_wait += started.elapsed();
    }

    /// kill -9, and reap the process.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM, and the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().unwrap()
    }

    /// SIGTERM, then the exit status and how long the exit took, or `None` (and kill -9) if
    /// the process is still running after `limit`.
    pub fn terminate_within(
        &mut self,
        limit: Duration,
    ) -> Option<(std::process::ExitStatus, Duration)> {
        let child = self.child.as_mut().expect("running");
        let started = Instant::now();
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        while started.elapsed() < limit {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return Some((status, started.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        None
    }

    /// Waits for the process to exit by itself; `None` (and kill -9) if it still runs after
    /// `limit`.
    pub fn wait_exit_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut().expect("running");
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        None
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `imstate presence login` against this server (the output, checked by the caller).
    pub fn login(&self, uid: &str, device: &str, gateway: &str, conn: &str) -> Output {
        self.cli(&[
            "presence",
            "login",
            "--uid",
            uid,
            "--device",
            device,
            "--gateway",
            gateway,
            "--conn",
            conn,
        ])
    }

    /// Runs the CLI against this server.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut command = Command::new(binary());
        command.args(args).env("IMSTATE_ADDR", &self.addr);
        command.output().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One HTTP/1.1 GET on loopback: (status code, body), or `None` if nothing listens yet.
pub fn http_get(address: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// Nanoseconds since a fixed origin on CLOCK_MONOTONIC (what `Instant` uses on Linux).
pub fn monotonic_ns(origin: Instant) -> u64 {
    origin.elapsed().as_nanos() as u64
}

/// The client of a load worker across server restarts: the connected client, or `None` after
/// a failed attempt and a short pause (the caller loops). Drop the client (set `None`) after a
/// failed call so that the next turn reconnects.
pub async fn reconnect(
    client: &mut Option<imstate_client::Client>,
    addr: &str,
) -> Option<imstate_client::Client> {
    if client.is_none() {
        match imstate_client::Client::connect(addr).await {
            Ok(connected) => *client = Some(connected),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    client.clone()
}

/// A two-worker runtime for tests that drive async clients.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A login on gateway `gw1` with a 60 s ttl and no metadata.
pub fn login_args(uid: u64, device: &str, conn: u64) -> imstate_client::LoginArgs {
    imstate_client::LoginArgs {
        uid,
        device: device.into(),
        gateway: "gw1".into(),
        conn,
        ttl_ms: 60_000,
        meta: Vec::new(),
    }
}

/// The code and message of a wire error reply (op byte and body as read off the socket).
pub fn wire_error_of(frame: &(u8, Vec<u8>)) -> (imstate_wire::Code, String) {
    imstate_wire::Frame {
        op: frame.0,
        body: &frame.1,
    }
    .reply_body(imstate_wire::Op::Next)
    .expect("a valid reply")
    .expect_err("an error reply")
}

/// A CA and the certificates it signed (server, client), written as PEM files.
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Writes a CA, a server certificate for 127.0.0.1/localhost and a client certificate, all
/// prefixed with `prefix`, into `dir`.
pub fn make_pki(dir: &Path, prefix: &str) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{prefix} test CA"));
    let ca = ca_params.self_signed(&ca_key).unwrap();

    let server_key = KeyPair::generate().unwrap();
    let mut server_params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server = server_params.signed_by(&server_key, &ca, &ca_key).unwrap();

    let client_key = KeyPair::generate().unwrap();
    let mut client_params = CertificateParams::new(vec!["client".to_string()]).unwrap();
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client = client_params.signed_by(&client_key, &ca, &ca_key).unwrap();

    Pki {
        ca: write(dir, &format!("{prefix}-ca.pem"), &ca.pem()),
        server_cert: write(dir, &format!("{prefix}-server.pem"), &server.pem()),
        server_key: write(
            dir,
            &format!("{prefix}-server.key"),
            &server_key.serialize_pem(),
        ),
        client_cert: write(dir, &format!("{prefix}-client.pem"), &client.pem()),
        client_key: write(
            dir,
            &format!("{prefix}-client.key"),
            &client_key.serialize_pem(),
        ),
    }
}

/// A TCP proxy on loopback that can be cut (every connection closed, new ones dropped) and
/// restored: a partition between one node and etcd without network namespaces. Threads
/// only; everything stops when it is dropped.
pub struct CutProxy {
    address: String,
    state: std::sync::Arc<ProxyState>,
}

#[derive(Default)]
struct ProxyState {
    cut: std::sync::atomic::AtomicBool,
    stop: std::sync::atomic::AtomicBool,
    open: std::sync::Mutex<Vec<std::net::TcpStream>>,
}

impl CutProxy {
    /// Forwards a free loopback port to `upstream`.
    pub fn start(upstream: &str) -> Self {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        listener.set_nonblocking(true).unwrap();
        let state = std::sync::Arc::new(ProxyState::default());
        let upstream = upstream.to_owned();
        let shared = std::sync::Arc::clone(&state);
        std::thread::spawn(move || {
            while !shared.stop.load(Ordering::Relaxed) {
                let (client, _) = match listener.accept() {
                    Ok(accepted) => accepted,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                if shared.cut.load(Ordering::Relaxed) {
                    drop(client);
                    continue;
                }
                let _ = client.set_nonblocking(false);
                let Ok(server) = std::net::TcpStream::connect(&upstream) else {
                    continue;
                };
                for stream in [&client, &server] {
                    if let Ok(clone) = stream.try_clone() {
                        shared.open.lock().unwrap().push(clone);
                    }
                }
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Self { address, state }
    }

    /// The proxy's address, `127.0.0.1:port`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Closes every connection and drops new ones until [`Self::restore`].
    pub fn cut(&self) {
        self.state
            .cut
            .store(true, std::sync::atomic::Ordering::Relaxed);
        for stream in self.state.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.state
            .cut
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.state
            .stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.cut();
    }
}
