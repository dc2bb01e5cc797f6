//! `profile-worker seed`: tenants and profiles from a file (CONTRACT §8).

use anyhow::Context;
use profile_worker::config::DatabaseSettings;
use profile_worker::store::SeedFile;
use std::path::PathBuf;

pub async fn seed(file: PathBuf, db: DatabaseSettings) -> anyhow::Result<()> {
    let name = file.display().to_string();
    let text = std::fs::read_to_string(&file).with_context(|| name.clone())?;
    let seed = SeedFile::parse(&text).with_context(|| name.clone())?;
    let store = super::connect_database(&db).await?;
    store
        .migrate()
        .await
        .context("DATABASE_URL: migration failed")?;
    let r = store.seed(&seed).await.with_context(|| name.clone())?;
    println!(
        "seeded {} tenants, {} access tokens, {} profiles from {}",
        r.tenants,
        r.access_tokens,
        r.profiles,
        file.display()
    );
    Ok(())
}
