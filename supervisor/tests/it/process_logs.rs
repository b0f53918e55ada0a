//! A flood of output keeps the log buffer bounded and never blocks the writer.

use crate::process_support::{model, spec};
use gpuswap_supervisor::backend::{
    Backend,
    logs::{LogBuffer, MAX_LINE_BYTES},
};
use serde_json::json;
use testkit::{DEADLINE, free_port};

#[tokio::test]
async fn a_flood_stays_bounded_and_never_blocks_the_writer() {
    const CAPACITY: usize = 1000;
    // 100 MB of 100-byte lines, then one 50 MB line without a newline until its end.
    let script = "yes 012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678 | head -c 100000000; \
                  head -c 50000000 /dev/zero | tr '\\0' x; echo; echo flood-done >&2";
    let config = model("vllm", &["sh", "-c", script], free_port(), json!({}));
    let logs = LogBuffer::new("flood", CAPACITY);
    // A follower that never reads: it must lag, not hold the writer back.
    let mut idle_follower = logs.subscribe();
    let backend = Backend::spawn(&spec("flood", config), logs.clone()).expect("spawn");
    let info = tokio::time::timeout(DEADLINE, backend.exited())
        .await
        .expect("the writer finished: it was never blocked");
    assert_eq!(info.code, Some(0), "{info}");

    let kept = logs.tail(usize::MAX);
    assert!(kept.len() <= CAPACITY, "{} lines kept", kept.len());
    let longest = kept.iter().map(|e| e.line.len()).max().unwrap_or(0);
    assert!(
        longest <= MAX_LINE_BYTES + 64,
        "a line of {longest} bytes was kept"
    );
    let lines: Vec<&str> = kept.iter().map(|e| e.line.as_str()).collect();
    let truncated = format!(" …[truncated {} bytes]", 50_000_000 - MAX_LINE_BYTES);
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("xxxx") && l.ends_with(&truncated)),
        "the huge line keeps its prefix and says how much was cut"
    );
    assert!(lines.contains(&"flood-done"), "the last lines are kept");
    assert!(
        lines.iter().any(|l| l.starts_with("0123456789")),
        "flood lines are kept whole"
    );
    assert!(
        matches!(
            idle_follower.try_recv(),
            Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_))
        ),
        "the idle follower lost lines"
    );
}
