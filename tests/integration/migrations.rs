//! The embedded migrations (listed from migrations/ by build.rs) with their
//! checksums: `migrate --status` says what is applied, pending or changed;
//! a migration changed after it was applied stops `migrate` and the worker;
//! a table from before checksums has them recorded by the next `migrate`.

use profile_worker_testkit::*;

async fn run(env: &Env, args: &[&str]) -> (bool, String, String) {
    let out = cli(env, args).output().await.expect("run the CLI");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn files() -> usize {
    std::fs::read_dir(format!("{}/migrations", env!("CARGO_MANIFEST_DIR")))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "sql")
        })
        .count()
}

#[tokio::test]
async fn migrate_status_tells_applied_pending_and_changed_migrations_apart() {
    let env = Env::prepare().await;
    let (ok, out, err) = run(&env, &["migrate", "--status"]).await;
    assert!(ok, "{out}{err}");
    assert_eq!(out.lines().count(), files(), "{out}");
    assert!(out.lines().all(|l| l.contains(" applied ")), "{out}");
    assert!(out.contains("0008 drop_unused_row_types"), "{out}");

    // A table written before checksums were kept: the next migrate records them.
    env.db
        .execute("UPDATE schema_migrations SET checksum = NULL", &[])
        .await
        .unwrap();
    let (ok, out, _) = run(&env, &["migrate", "--status"]).await;
    assert!(ok);
    assert!(
        out.contains("checksum recorded by the next migrate"),
        "{out}"
    );
    let (ok, out, err) = run(&env, &["migrate"]).await;
    assert!(ok, "{out}{err}");
    let recorded: i64 = env
        .db
        .query_one(
            "SELECT count(*) AS n FROM schema_migrations WHERE checksum IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get("n");
    assert_eq!(recorded as usize, files());

    // A migration that is not what was applied: status says so, migrate and
    // the worker refuse.
    env.db
        .execute(
            "UPDATE schema_migrations SET checksum = '\\x00' WHERE version = 2",
            &[],
        )
        .await
        .unwrap();
    let (ok, out, _) = run(&env, &["migrate", "--status"]).await;
    assert!(!ok);
    assert!(
        out.lines()
            .any(|l| l.starts_with("0002 outbox_traceparent") && l.contains("CHANGED")),
        "{out}"
    );
    let (ok, _, err) = run(&env, &["migrate"]).await;
    assert!(!ok);
    assert!(
        err.contains("migration 2 (outbox_traceparent) was applied from a different file"),
        "{err}"
    );

    // A pending one: listed, and status exits 1.
    env.db
        .execute(
            "UPDATE schema_migrations SET checksum = NULL WHERE version = 2",
            &[],
        )
        .await
        .unwrap();
    env.db
        .execute("DELETE FROM schema_migrations WHERE version = 8", &[])
        .await
        .unwrap();
    let (ok, out, _) = run(&env, &["migrate", "--status"]).await;
    assert!(!ok);
    assert!(
        out.lines()
            .any(|l| l.starts_with("0008 ") && l.ends_with("pending")),
        "{out}"
    );
    env.teardown().await;
}
