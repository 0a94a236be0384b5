//! The presence commands as a user runs them: login (with replace), lookup (text and JSON),
//! heartbeat, logout, count, gateway-down, gateway leases, expiry in real time, restart, and
//! clear errors for bad input.

mod support;

use std::time::Duration;

use support::Server;

fn out(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn err(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn login(server: &Server, uid: &str, device: &str, gateway: &str, conn: &str) -> String {
    let output = server.login(uid, device, gateway, conn);
    assert!(output.status.success(), "{}", err(&output));
    out(&output)
}

#[test]
fn login_lookup_heartbeat_logout_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), None);
    assert_eq!(
        login(&server, "42", "phone", "gw1", "7"),
        "42\tphone,gw1,7\n"
    );
    login(&server, "42", "pad", "gw2", "9");
    // Same device again: replaces the old session and says which one, so it can be kicked.
    assert_eq!(
        login(&server, "42", "phone", "gw3", "8"),
        "42\tphone,gw3,8\nreplaced\tphone,gw1,7\n"
    );
    // The same login again (a gateway's retry) refreshes the session: nothing is replaced,
    // so the gateway never kicks its own live connection.
    assert_eq!(
        login(&server, "42", "phone", "gw3", "8"),
        "42\tphone,gw3,8\n"
    );
    let lookup = out(&server.cli(&["presence", "lookup", "42", "43"]));
    assert_eq!(lookup, "42\tpad,gw2,9\tphone,gw3,8\n43\toffline\n");
    let json = out(&server.cli(&["presence", "lookup", "--json", "42"]));
    assert!(
        json.starts_with("[{\"sessions\":[") || json.contains("\"uid\":42"),
        "{json}"
    );
    assert!(
        server
            .cli(&["presence", "heartbeat", "--uid", "42", "--conn", "9"])
            .status
            .success()
    );
    assert_eq!(out(&server.cli(&["presence", "count"])), "2\n");

    // A clean stop and restart keeps the sessions.
    assert!(server.terminate().success());
    server.restart();
    let lookup = out(&server.cli(&["presence", "lookup", "42"]));
    assert_eq!(lookup, "42\tpad,gw2,9\tphone,gw3,8\n");
    let output = server.cli(&["presence", "logout", "--uid", "42", "--conn", "9"]);
    assert_eq!(out(&output), "42\tpad,gw2,9\n");
    assert_eq!(out(&server.cli(&["presence", "count"])), "1\n");
}

#[test]
fn gateway_down_drops_exactly_that_gateways_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None);
    for uid in 1..=5 {
        login(&server, &uid.to_string(), "phone", "gw-a", &uid.to_string());
    }
    login(&server, "6", "phone", "gw-b", "6");
    assert_eq!(
        out(&server.cli(&["presence", "gateway-down", "gw-a"])),
        "5\n"
    );
    assert_eq!(
        out(&server.cli(&["presence", "lookup", "1", "6"])),
        "1\toffline\n6\tphone,gw-b,6\n"
    );
}

#[test]
fn sessions_and_gateway_leases_expire_in_real_time() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None);
    let output = server.cli(&[
        "presence",
        "login",
        "--uid",
        "1",
        "--device",
        "d",
        "--gateway",
        "gw",
        "--conn",
        "1",
        "--ttl",
        "1",
    ]);
    assert!(output.status.success(), "{}", err(&output));
    assert!(
        server
            .cli(&["presence", "gateway-register", "gw-lease", "--ttl", "1"])
            .status
            .success()
    );
    login(&server, "2", "d", "gw-lease", "2");
    login(&server, "3", "d", "gw-other", "3");
    assert_eq!(out(&server.cli(&["presence", "count"])), "3\n");
    // P2 as the issue states it: gone within ttl + 1 s (the tick is 250 ms; the exact bound is
    // tested with a controlled clock in the core). The gateway lease lapse drops its sessions.
    std::thread::sleep(Duration::from_millis(2_000));
    assert_eq!(
        out(&server.cli(&["presence", "lookup", "1", "2", "3"])),
        "1\toffline\n2\toffline\n3\td,gw-other,3\n"
    );
}

#[test]
fn bad_presence_input_is_a_clear_error_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None);
    let long_device = "x".repeat(65);
    let output = server.cli(&[
        "presence",
        "login",
        "--uid",
        "1",
        "--device",
        &long_device,
        "--gateway",
        "g",
        "--conn",
        "1",
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(err(&output).contains("64"), "{}", err(&output));
    let output = server.cli(&["presence", "logout", "--uid", "1", "--conn", "1"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        err(&output).contains("no session for uid 1 conn 1"),
        "{}",
        err(&output)
    );
    for device in 0..16 {
        login(
            &server,
            "9",
            &format!("d{device}"),
            "g",
            &device.to_string(),
        );
    }
    let output = server.cli(&[
        "presence",
        "login",
        "--uid",
        "9",
        "--device",
        "d16",
        "--gateway",
        "g",
        "--conn",
        "16",
    ]);
    assert!(
        err(&output).contains("sessions_per_uid_max"),
        "{}",
        err(&output)
    );
    assert_eq!(out(&server.cli(&["presence", "count"])), "16\n");
}
