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

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free loopback port")
}

impl EtcdProcess {
    /// Starts etcd and waits (at most 20 s) until its client port accepts connections.
    pub fn start() -> std::io::Result<Self> {
        let dir = tempfile::tempdir()?;
        let client = format!("http://127.0.0.1:{}", free_port());
        let peer = format!("http://127.0.0.1:{}", free_port());
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
