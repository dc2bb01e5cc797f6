//! The harness itself: a test that panics half-way leaves nothing behind on
//! the shared servers (no database, no queue, no exchange), as one that ends
//! with `Env::teardown` does.

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use profile_worker_testkit::*;

#[tokio::test]
async fn a_panicking_test_leaves_nothing_behind() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let test = tokio::spawn(async move {
        let env = Env::prepare().await;
        // A worker of its own process: one in this process would count the
        // broker errors of losing its queues in the metrics other tests read.
        let _worker = WorkerProcess::start(worker_process(&env), None).await;
        let r = env
            .call("create-ticket", ticket(ADMIN_TOKEN, ENABLED_PROFILE))
            .await;
        assert_eq!(r.status, 200);
        let b = &env.settings.broker;
        let _ = tx.send((
            env.db_name.clone(),
            [
                b.command_queue.clone(),
                b.dead_letter_queue.clone(),
                b.email_queue.clone(),
                b.email_dead_letter_queue(),
            ],
        ));
        panic!("a test failing half-way, its worker running");
    });
    assert!(test.await.unwrap_err().is_panic());
    let (db, queues) = rx.await.expect("the test got as far as its names");
    let left: i64 = admin_client()
        .await
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = $1",
            &[&db],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "database {db} left behind");
    let conn = Servers::from_env().broker().await;
    for q in queues {
        let ch = conn.create_channel().await.unwrap();
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        assert!(
            ch.queue_declare(q.as_str().into(), passive, FieldTable::default())
                .await
                .is_err(),
            "queue {q} left behind"
        );
    }
}
