//! A throwaway etcd process on loopback: free ports, a temporary data directory, stopped (by
//! its pid, kill then wait) when dropped. Installs nothing: the `etcd` binary must be on PATH
//! (Debian's `etcd-server`; `scripts/test.sh` installs it when missing).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An etcd started for a test.
pub struct EtcdProcess {
    child: Child,
    client_url: String,
    _dir: tempfile::TempDir,
}

/// Lowest port [`loopback_port`] hands out.
const RESERVED_PORTS_LOW: u16 = 10_000;

/// Files whose locks hold this process's reserved ports until it exits.
static RESERVATIONS: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());

/// The first port the kernel hands out for `bind(0)` and outgoing connections.
fn ephemeral_ports_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768)
}

/// A loopback port for a test server, free now and reserved for the rest of this process.
///
/// Binding port 0 and releasing it is racy on a machine running many test processes: the
/// kernel gives the same port to the next `bind(0)` or to an outgoing connection's local end
/// (both draw from `ip_local_port_range`), and a restarted server finds its port taken. So
/// the port comes from below that range, where no outgoing connection goes, and is reserved
/// by an exclusive lock on `$TMPDIR/imstate-test-ports/<port>`, held by this process until it
/// exits (the kernel drops the lock with the process, so a crash leaks nothing). A port some
/// other program listens on fails the bind check and is skipped. Falls back to `bind(0)` when
/// the range below the ephemeral ports is too small.
pub fn loopback_port() -> u16 {
    let ephemeral_low = ephemeral_ports_low();
    let dir = std::env::temp_dir().join("imstate-test-ports");
    if ephemeral_low > RESERVED_PORTS_LOW + 1_000 && std::fs::create_dir_all(&dir).is_ok() {
        let span = u32::from(ephemeral_low - RESERVED_PORTS_LOW);
        // Processes start at different places, so they rarely contend for the same files.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.subsec_nanos());
        let start = (std::process::id().wrapping_mul(7_919) ^ nanos) % span;
        for step in 0..span {
            let port = RESERVED_PORTS_LOW + ((start + step) % span) as u16;
            let Ok(file) = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(port.to_string()))
            else {
                continue;
            };
            if file.try_lock().is_err() {
                continue;
            }
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                RESERVATIONS
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(file);
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free loopback port")
}

impl EtcdProcess {
    /// Starts etcd and waits (at most 20 s) until its client port accepts connections.
    pub fn start() -> std::io::Result<Self> {
        let dir = tempfile::tempdir()?;
        let client = format!("http://127.0.0.1:{}", loopback_port());
        let peer = format!("http://127.0.0.1:{}", loopback_port());
        let child = Command::new("etcd")
            .arg("--name")
            .arg("imstate-test")
            .arg("--data-dir")
            .arg(dir.path().join("etcd"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .arg("--initial-cluster")
            .arg(format!("imstate-test={peer}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|error| {
                std::io::Error::new(
                    error.kind(),
                    format!("cannot start etcd (is etcd-server installed?): {error}"),
                )
            })?;
        let process = Self {
            child,
            client_url: client,
            _dir: dir,
        };
        let address = process.address();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&address).is_err() {
            if Instant::now() > deadline {
                return Err(std::io::Error::other("etcd did not listen within 20 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(process)
    }

    /// The client endpoint, `127.0.0.1:port`.
    pub fn address(&self) -> String {
        self.client_url.trim_start_matches("http://").to_owned()
    }

    /// The process id (for SIGSTOP / SIGKILL in fault tests).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_ports_are_distinct_bindable_below_the_ephemeral_range_and_locked() {
        let ports: Vec<u16> = (0..20).map(|_| loopback_port()).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "{ports:?}");
        for &port in &ports {
            assert!(
                port >= RESERVED_PORTS_LOW && port < ephemeral_ports_low(),
                "{port}"
            );
            TcpListener::bind(("127.0.0.1", port)).expect("a reserved port is free");
            // Another open of the lock file (as another test process would do) cannot lock it.
            let file = std::fs::File::open(
                std::env::temp_dir()
                    .join("imstate-test-ports")
                    .join(port.to_string()),
            )
            .unwrap();
            assert!(file.try_lock().is_err(), "port {port} is not reserved");
        }
    }
}
