//! `promtool check metrics`: the Prometheus text format checked by Prometheus's own tool.

use std::{
    io::Write,
    process::{Command, Stdio},
};

/// `promtool check metrics` (Debian package `prometheus`) parses the text and lints names,
/// units and help. CI installs it, so there a missing promtool fails; elsewhere it skips
/// only this check.
pub fn promtool_check(text: &str) {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(error)
            if error.kind() == std::io::ErrorKind::NotFound && std::env::var_os("CI").is_none() =>
        {
            eprintln!(
                "SKIPPED promtool check: promtool is not installed (apt-get install prometheus)"
            );
            return;
        }
        Err(error) => panic!("cannot run promtool: {error}"),
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let output = child.wait_with_output().expect("promtool");
    assert!(
        output.status.success(),
        "promtool check metrics failed: {}\n--- text ---\n{text}",
        crate::described(&output)
    );
}
