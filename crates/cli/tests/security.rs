//! TLS, mTLS and bearer tokens on the gRPC and wire ports of the real binary, driven through
//! the CLI's `--tls-ca`, `--tls-cert/--tls-key` and `--token-file` (and the wire client). Certificates are made per test with
//! `rcgen` (a CA, a server certificate for 127.0.0.1, a client certificate).

mod support;

use std::path::Path;

use imstate_client::{ClientOptions, WireClient};
use support::{Server, http_get, make_pki, write};

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn path(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn tls_clients_need_the_ca_that_signed_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path(), "good");
    let other = make_pki(dir.path(), "other");
    // Through the environment, which also exercises IMSTATE_<SECTION>__<KEY>.
    let server = Server::start_with(
        &dir.path().join("data"),
        None,
        &[],
        &[
            ("IMSTATE_TLS__CERT_FILE", path(&pki.server_cert)),
            ("IMSTATE_TLS__KEY_FILE", path(&pki.server_key)),
        ],
    );
    let plaintext = server.cli(&["seq", "next", "1"]);
    assert_eq!(plaintext.status.code(), Some(1), "plaintext must fail");
    let wrong_ca = server.cli(&["seq", "next", "--tls-ca", path(&other.ca), "1"]);
    assert_eq!(wrong_ca.status.code(), Some(1), "a foreign CA must fail");
    assert!(
        stderr(&wrong_ca).starts_with("error: "),
        "{}",
        stderr(&wrong_ca)
    );

    let good = server.cli(&["seq", "next", "--tls-ca", path(&pki.ca), "1"]);
    assert!(good.status.success(), "{}", stderr(&good));
    assert_eq!(String::from_utf8_lossy(&good.stdout), "1\n");
    let by_name = server.cli(&[
        "ctl",
        "status",
        "--tls-ca",
        path(&pki.ca),
        "--tls-domain",
        "localhost",
    ]);
    assert!(by_name.status.success(), "{}", stderr(&by_name));
}

#[test]
fn mtls_rejects_a_client_without_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path(), "m");
    let other = make_pki(dir.path(), "rogue");
    let config = write(
        dir.path(),
        "imstate.toml",
        &format!(
            "[tls]\ncert_file = {:?}\nkey_file = {:?}\nclient_ca_file = {:?}\n",
            pki.server_cert, pki.server_key, pki.ca
        ),
    );
    let server = Server::start(&dir.path().join("data"), Some(&config));
    let no_cert = server.cli(&["seq", "next", "--tls-ca", path(&pki.ca), "1"]);
    assert_eq!(
        no_cert.status.code(),
        Some(1),
        "no client certificate must fail"
    );
    let rogue = server.cli(&[
        "seq",
        "next",
        "--tls-ca",
        path(&pki.ca),
        "--tls-cert",
        path(&other.client_cert),
        "--tls-key",
        path(&other.client_key),
        "1",
    ]);
    assert_eq!(
        rogue.status.code(),
        Some(1),
        "a certificate of another CA must fail"
    );
    let good = server.cli(&[
        "seq",
        "next",
        "--tls-ca",
        path(&pki.ca),
        "--tls-cert",
        path(&pki.client_cert),
        "--tls-key",
        path(&pki.client_key),
        "1",
    ]);
    assert!(good.status.success(), "{}", stderr(&good));
}

#[test]
fn missing_or_wrong_tokens_get_unauthenticated_and_the_right_one_works() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = write(
        dir.path(),
        "tokens",
        "# ops team\nsecret-token-1\nsecret-token-2\n",
    );
    let wrong = write(dir.path(), "wrong", "secret-token-3\n");
    let right = write(dir.path(), "right", "secret-token-2\n");
    let config = write(
        dir.path(),
        "imstate.toml",
        &format!("[auth]\ntoken_file = {tokens:?}\n"),
    );
    let server = Server::start(&dir.path().join("data"), Some(&config));
    for (args, what) in [
        (vec!["seq", "next", "1"], "missing"),
        (
            vec!["seq", "next", "--token-file", path(&wrong), "1"],
            "wrong",
        ),
        (vec!["ctl", "status", "--token-file", path(&wrong)], "wrong"),
    ] {
        let output = server.cli(&args);
        assert_eq!(output.status.code(), Some(1), "{what}");
        assert!(
            stderr(&output).contains("Unauthenticated"),
            "{what}: {}",
            stderr(&output)
        );
    }
    let output = server.cli(&["seq", "next", "--token-file", path(&right), "1"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let mut command = std::process::Command::new(support::binary());
    let output = command
        .args(["ctl", "namespaces"])
        .env("IMSTATE_ADDR", &server.addr)
        .env("IMSTATE_TOKEN_FILE", &right)
        .output()
        .unwrap();
    assert!(output.status.success(), "env token: {}", stderr(&output));

    let (_, metrics) = http_get(&server.metrics_addr, "/metrics").unwrap();
    let rejected: f64 = metrics
        .lines()
        .filter(|line| line.starts_with("imstate_auth_rejected_total"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(rejected, 3.0, "{metrics}");
}

#[test]
fn a_bad_token_file_is_a_startup_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let empty = write(dir.path(), "tokens", "# nobody\n");
    let output = std::process::Command::new(support::binary())
        .arg("serve")
        .args(support::FREE_PORTS)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("IMSTATE_AUTH__TOKEN_FILE", &empty)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("auth.token_file"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn bench_reaches_a_token_protected_node_with_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = write(dir.path(), "tokens", "bench-token\n");
    let config = write(
        dir.path(),
        "imstate.toml",
        &format!("[auth]\ntoken_file = {tokens:?}\n"),
    );
    let server = Server::start(&dir.path().join("data"), Some(&config));
    let grpc = format!("imstate+grpc://{}", server.addr);
    let wire = format!("imstate://{}", server.wire_addr);
    let run = |target: &str, extra: &[&str]| {
        let json = dir.path().join("bench.json");
        let mut args = vec![
            "bench",
            "--target",
            target,
            "--workload",
            "seq-next",
            "--connections",
            "1",
            "--duration",
            "1",
            "--warmup",
            "0",
            "--quiet",
            "--json-out",
        ];
        let json_arg = json.to_str().unwrap().to_string();
        args.push(&json_arg);
        args.extend_from_slice(extra);
        let output = std::process::Command::new(support::binary())
            .args(&args)
            .output()
            .unwrap();
        if !output.status.success() {
            return Err(stderr(&output));
        }
        let text = std::fs::read_to_string(&json).unwrap();
        let results: serde_json::Value = serde_json::from_str(&text).unwrap();
        Ok((
            results[0]["ops"].as_u64().unwrap(),
            results[0]["errors"].as_u64().unwrap(),
        ))
    };
    for target in [&grpc, &wire] {
        let (ops, errors) = run(target, &["--token-file", path(&tokens)]).unwrap();
        assert!(
            ops > 0 && errors == 0,
            "{target} with the token: {ops} ops, {errors} errors"
        );
    }
    // The wire protocol checks the token in its Hello, so the bench cannot even connect.
    let error = run(&wire, &[]).unwrap_err();
    assert!(error.contains("bearer token"), "{error}");
    // gRPC checks it per call: every call fails.
    let (ops, errors) = run(&grpc, &[]).unwrap();
    assert!(
        ops == 0 && errors > 0,
        "without a token: {ops} ops, {errors} errors"
    );
}

// ----- the wire port ------------------------------------------------------------------------

fn client_options(ca: Option<&Path>, identity: Option<(&Path, &Path)>) -> ClientOptions {
    ClientOptions::from_files(
        ca,
        identity.map(|(cert, _)| cert),
        identity.map(|(_, key)| key),
        None,
    )
    .unwrap()
}

/// Connects to the wire port and allocates one value; the error's text on failure.
async fn wire_next(address: &str, options: &ClientOptions) -> Result<u64, String> {
    let client = WireClient::connect_with(address, options)
        .await
        .map_err(|error| error.to_string())?;
    client
        .next("default", 7)
        .await
        .map_err(|error| error.to_string())
}

/// With `[tls]`, the wire port speaks TLS with the same certificates as gRPC: a client with
/// the node's CA is served (also when the port listens beyond loopback, which TLS now
/// allows), a plaintext client or one trusting another CA is not, and the node goes on.
#[test]
fn the_wire_port_speaks_tls_with_the_grpc_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path(), "w");
    let other = make_pki(dir.path(), "w-other");
    let mut server = Server::new(
        &dir.path().join("data"),
        None,
        &[],
        &[
            ("IMSTATE_TLS__CERT_FILE", path(&pki.server_cert)),
            ("IMSTATE_TLS__KEY_FILE", path(&pki.server_key)),
            ("IMSTATE_WIRE__HELLO_TIMEOUT_MS", "1000"),
        ],
    );
    let port = server.wire_addr.rsplit_once(':').unwrap().1.to_owned();
    server.wire_addr = format!("0.0.0.0:{port}");
    server.restart();
    let address = format!("127.0.0.1:{port}");
    support::runtime().block_on(async {
        let good = client_options(Some(&pki.ca), None);
        assert_eq!(wire_next(&address, &good).await, Ok(1));

        let plaintext = wire_next(&address, &ClientOptions::default()).await;
        assert!(plaintext.is_err(), "plaintext must not be served");
        let foreign = wire_next(&address, &client_options(Some(&other.ca), None)).await;
        let error = foreign.expect_err("a foreign CA must not trust the node");
        assert!(error.contains("TLS handshake"), "{error}");

        // A client that connects and never starts the handshake is closed by the Hello
        // deadline (1 s here), which the handshake counts against.
        let mut idle = tokio::net::TcpStream::connect(&address).await.unwrap();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            tokio::io::AsyncReadExt::read(&mut idle, &mut byte),
        )
        .await
        .expect("the Hello deadline closes a silent TLS client");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

        // Every path above left the node serving, and the login path works over TLS.
        let client = WireClient::connect_with(&address, &good).await.unwrap();
        let login = client
            .login(&support::login_args(5, "phone", 1))
            .await
            .unwrap();
        assert!(login.replaced.is_none());
        assert_eq!(client.next("default", 7).await.unwrap(), 2);
    });
    let metrics = http_get(&server.metrics_addr, "/metrics").unwrap().1;
    assert!(
        metrics
            .lines()
            .any(|line| line.starts_with("imstate_wire_refused_total") && line.contains("tls")),
        "{metrics}"
    );
}

/// With `tls.client_ca_file`, the wire port requires a client certificate that CA signed.
#[test]
fn the_wire_port_requires_client_certificates_under_mtls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path(), "wm");
    let rogue = make_pki(dir.path(), "wm-rogue");
    let config = write(
        dir.path(),
        "imstate.toml",
        &format!(
            "[tls]\ncert_file = {:?}\nkey_file = {:?}\nclient_ca_file = {:?}\n",
            pki.server_cert, pki.server_key, pki.ca
        ),
    );
    let server = Server::start(&dir.path().join("data"), Some(&config));
    support::runtime().block_on(async {
        let address = &server.wire_addr;
        let no_cert = wire_next(address, &client_options(Some(&pki.ca), None)).await;
        assert!(no_cert.is_err(), "no client certificate must fail");
        let rogue_cert =
            client_options(Some(&pki.ca), Some((&rogue.client_cert, &rogue.client_key)));
        assert!(
            wire_next(address, &rogue_cert).await.is_err(),
            "a certificate of another CA must fail"
        );
        let good = client_options(Some(&pki.ca), Some((&pki.client_cert, &pki.client_key)));
        assert_eq!(wire_next(address, &good).await, Ok(1));
    });
}

/// `imstate bench` drives a TLS wire port with the CLI's TLS flags.
#[test]
fn bench_reaches_a_tls_wire_port_with_the_tls_flags() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path(), "wb");
    let config = write(
        dir.path(),
        "imstate.toml",
        &format!(
            "[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
            pki.server_cert, pki.server_key
        ),
    );
    let server = Server::start(&dir.path().join("data"), Some(&config));
    let output = std::process::Command::new(support::binary())
        .args(["bench", "--workload", "seq-next", "--duration", "1"])
        .args([
            "--connections",
            "2",
            "--inflight",
            "2",
            "--warmup",
            "0",
            "--tls-ca",
        ])
        .arg(&pki.ca)
        .arg("--target")
        .arg(format!("imstate://{}", server.wire_addr))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
}
