//! `profile-worker migrate`: pending migrations and the runtime role's grants,
//! as the schema's owner.

use anyhow::Context;
use profile_worker::config::DatabaseSettings;

pub async fn migrate(db: DatabaseSettings) -> anyhow::Result<()> {
    let store = super::connect_database(&db).await?;
    let applied = store
        .migrate()
        .await
        .context("DATABASE_URL: migration failed")?;
    if !db.runtime_role.is_empty() {
        store
            .grant_runtime(&db.runtime_role)
            .await
            .context("DATABASE_RUNTIME_ROLE")?;
        println!("row rights granted to {}", db.runtime_role);
    }
    println!(
        "migrations applied: {}",
        if applied.is_empty() {
            "none pending".to_string()
        } else {
            format!("{applied:?}")
        }
    );
    Ok(())
}
