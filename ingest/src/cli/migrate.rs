//! `ingest migrate`: apply pending migrations and exit.

use clap::Args;

use super::serve::StorageArgs;
use crate::storage::Store;

#[derive(Debug, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    storage: StorageArgs,
}

pub async fn run(args: MigrateArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.storage.data_dir)?;
    let store = Store::open(&args.storage.database()?).await?;
    println!("schema is up to date ({})", store.backend_name());
    store.close().await;
    Ok(())
}
