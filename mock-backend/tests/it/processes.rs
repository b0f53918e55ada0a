//! Worker processes: in the server's process group by default, outside it
//! with --worker-escape; the server kills its own on a clean exit.

use crate::common::{Mock, proc_ids};
use testkit::DEADLINE;

async fn workers_of(mock: &Mock, count: usize) -> Vec<u32> {
    testkit::wait_for("workers started", DEADLINE, || async {
        let mut found = testkit::processes_with_marker(&mock.marker);
        found.retain(|pid| *pid != mock.pid());
        (found.len() == count).then_some(found)
    })
    .await
}

#[tokio::test]
async fn workers_share_the_group_and_die_with_a_clean_exit() {
    let mut mock = Mock::start("sglang", &["--load-time", "10ms", "--workers", "2"]);
    let workers = workers_of(&mock, 2).await;
    for worker in &workers {
        let (ppid, pgid, _) = proc_ids(*worker).expect("worker stat");
        assert_eq!(ppid, mock.pid());
        assert_eq!(pgid, mock.pid(), "a worker stays in the server's group");
    }
    mock.wait_log("fired up").await;
    mock.signal(libc::SIGTERM);
    assert_eq!(mock.wait_exit().code(), Some(0));
    for worker in workers {
        assert!(
            !testkit::alive(worker),
            "worker {worker} outlived a clean exit"
        );
    }
}

#[tokio::test]
async fn escaped_workers_leave_the_group_and_survive() {
    let mut mock = Mock::start(
        "sglang",
        &["--load-time", "10ms", "--workers", "1", "--worker-escape"],
    );
    let workers = workers_of(&mock, 1).await;
    let worker = workers[0];
    // setsid() runs in the worker after exec: wait for it.
    let (_, pgid, sid) = testkit::wait_for("worker in its own session", DEADLINE, || async {
        proc_ids(worker).filter(|(_, _, sid)| *sid == worker)
    })
    .await;
    assert_eq!(pgid, worker);
    assert_eq!(sid, worker);
    mock.wait_log("fired up").await;
    mock.signal(libc::SIGTERM);
    assert_eq!(mock.wait_exit().code(), Some(0));
    let survived = testkit::alive(worker);
    // SAFETY: plain kill(2) of the worker this test started.
    unsafe { libc::kill(worker as i32, libc::SIGKILL) };
    assert!(
        survived,
        "an escaped worker outlives its server (the case supervisors must handle)"
    );
    testkit::wait_for("escaped worker killed", DEADLINE, || async {
        (!testkit::alive(worker)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn workers_are_orphaned_by_a_crash() {
    let mut mock = Mock::start("vllm", &["--load-time", "10ms", "--workers", "1"]);
    let workers = workers_of(&mock, 1).await;
    mock.wait_log("Application startup complete.").await;
    mock.signal(libc::SIGKILL);
    mock.wait_exit();
    // No parent-death signal: the worker lives on until its group is killed.
    let reparented = testkit::wait_for("worker re-parented", DEADLINE, || async {
        proc_ids(workers[0])
            .map(|(ppid, _, _)| ppid)
            .filter(|ppid| *ppid != mock.pid())
    })
    .await;
    assert_ne!(reparented, mock.pid());
    assert!(testkit::alive(workers[0]));
    // Dropping the mock kills its process group, workers included.
}
