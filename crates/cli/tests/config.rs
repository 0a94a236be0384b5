//! Configuration as an operator meets it: `imstate config example` documents every key with
//! its default, `imstate config show` prints what `serve` would run with, precedence is flags >
//! environment > file > defaults, and mistakes stop start-up naming the key.

mod support;

use std::process::Command;

use support::{Server, binary};

fn run(args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    Command::new(binary())
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .unwrap()
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The value of `key = value` in the section `section` ("" = top level) of TOML text.
fn toml_value(text: &str, section: &str, key: &str) -> Option<String> {
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.to_string();
        } else if current == section
            && let Some((k, v)) = line.split_once(" = ")
            && k.trim() == key
        {
            return Some(v.split('#').next().unwrap_or("").trim().to_string());
        }
    }
    None
}

#[test]
fn the_example_documents_every_key_and_round_trips_through_show() {
    let dir = tempfile::tempdir().unwrap();
    let output = run(&["config", "example"], &[]);
    assert!(output.status.success());
    let example = stdout(&output);
    let file = dir.path().join("imstate.toml");
    std::fs::write(&file, &example).unwrap();

    let defaults = stdout(&run(&["config", "show"], &[]));
    let from_example = run(&["config", "show", "--config", file.to_str().unwrap()], &[]);
    assert!(from_example.status.success(), "{}", stderr(&from_example));
    assert_eq!(
        stdout(&from_example),
        defaults,
        "the example's values are the defaults"
    );

    // Every key `show` prints is documented in the example with the same value.
    let mut section = String::new();
    let mut keys = 0;
    for line in defaults.lines() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
        } else if let Some((key, value)) = line.split_once(" = ") {
            assert_eq!(
                toml_value(&example, &section, key).as_deref(),
                Some(value),
                "[{section}] {key}"
            );
            keys += 1;
        }
    }
    assert!(keys >= 20, "{defaults}");
}

#[test]
fn a_typo_in_a_key_or_a_bad_value_fails_startup_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    for (text, expected) in [
        ("[presence]\nfsynk = \"always\"\n", "fsynk"),
        ("metrics_listn = \"127.0.0.1:1\"\n", "metrics_listn"),
        ("[seq]\nbatch_ids_max = 0\n", "seq.batch_ids_max"),
        ("[presence]\nfsync = \"sometimes\"\n", "presence.fsync"),
        ("log_format = \"xml\"\n", "log_format"),
    ] {
        let file = dir.path().join("imstate.toml");
        std::fs::write(&file, text).unwrap();
        let data = dir.path().join("data");
        let mut args = vec!["serve"];
        args.extend(support::FREE_PORTS);
        args.extend(["--data-dir", data.to_str().unwrap()]);
        args.extend(["--config", file.to_str().unwrap()]);
        let output = run(&args, &[]);
        assert_eq!(output.status.code(), Some(1), "{text}");
        let message = stderr(&output);
        assert!(message.starts_with("error: "), "{message}");
        assert!(message.contains(expected), "{text}: {message}");
    }
    let output = run(&["config", "show"], &[("IMSTATE_SEQ__BATCH_ID_MAX", "3")]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("IMSTATE_SEQ__BATCH_ID_MAX"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn environment_overrides_the_file_and_flags_override_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("imstate.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:1\"\nmetrics_listen = \"127.0.0.1:11\"\n\
         [seq]\nbatch_ids_max = 5\n[presence]\nfsync = \"never\"\n",
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let env = [
        ("IMSTATE_LISTEN", "127.0.0.1:2"),
        ("IMSTATE_SEQ__BATCH_IDS_MAX", "6"),
    ];
    let shown = stdout(&run(&["config", "show", "--config", file], &env));
    assert_eq!(toml_value(&shown, "", "listen").unwrap(), "\"127.0.0.1:2\"");
    assert_eq!(toml_value(&shown, "seq", "batch_ids_max").unwrap(), "6");
    assert_eq!(
        toml_value(&shown, "presence", "fsync").unwrap(),
        "\"never\""
    );
    assert_eq!(
        toml_value(&shown, "", "metrics_listen").unwrap(),
        "\"127.0.0.1:11\""
    );

    let shown = stdout(&run(
        &[
            "config",
            "show",
            "--config",
            file,
            "--listen",
            "127.0.0.1:3",
        ],
        &env,
    ));
    assert_eq!(toml_value(&shown, "", "listen").unwrap(), "\"127.0.0.1:3\"");
    assert_eq!(toml_value(&shown, "seq", "batch_ids_max").unwrap(), "6");
}

#[test]
fn a_served_node_runs_with_the_environment_it_was_given() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        dir.path(),
        None,
        &[],
        &[("IMSTATE_SEQ__BATCH_IDS_MAX", "2")],
    );
    let output = server.cli(&["seq", "next", "1", "2", "3"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains('2'), "{}", stderr(&output));
    assert!(server.cli(&["seq", "next", "1", "2"]).status.success());
}
