//! `profile-worker migrate`: pending migrations and the runtime role's grants,
//! as the schema's owner; `--status` lists every migration and changes nothing.

use anyhow::Context;
use profile_worker::config::DatabaseSettings;
use profile_worker::store::MigrationState;

#[derive(clap::Args)]
pub struct MigrateArgs {
    /// List each migration (applied when, pending, or changed since it was
    /// applied) and change nothing; exits 1 if one is pending or changed.
    #[arg(long)]
    pub status: bool,
    #[command(flatten)]
    pub db: DatabaseSettings,
}

pub async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let MigrateArgs { status, db } = args;
    let store = super::connect_database(&db).await?;
    if status {
        return print_status(&store).await;
    }
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

async fn print_status(store: &profile_worker::store::Store) -> anyhow::Result<()> {
    let all = store
        .migration_status()
        .await
        .context("DATABASE_URL: reading schema_migrations")?;
    let mut behind = 0;
    for m in &all {
        let state = match &m.state {
            MigrationState::Pending => {
                behind += 1;
                "pending".to_string()
            }
            MigrationState::Applied { at, checksum } => match checksum {
                Some(true) => format!("applied {at}"),
                Some(false) => {
                    behind += 1;
                    format!("applied {at}, CHANGED since: its file is not what was applied")
                }
                None => format!("applied {at} (checksum recorded by the next migrate)"),
            },
        };
        println!("{:04} {:<24} {state}", m.version, m.name);
    }
    if behind > 0 {
        anyhow::bail!("{behind} migration(s) pending or changed");
    }
    Ok(())
}
