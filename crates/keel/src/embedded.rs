//! The embedded store: one SQLite file used by one `keel` process at a time.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use keel_store::sqlite::SqliteStore;

/// An open embedded store and the lock that makes this process its only user.
pub struct Embedded {
    /// The store.
    pub store: SqliteStore,
    /// Held for the life of the process: a second process on the same file is refused.
    _lock: File,
}

/// Opens (creating if needed) the SQLite file at `path`, in a folder that
/// must exist: a mistyped path is refused rather than starting an empty
/// store somewhere else. Because this process is now the only one using the
/// file, leases left by a process that died are given back at once instead
/// of waiting for them to expire.
pub async fn open(path: &Path) -> anyhow::Result<Embedded> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        bail!(
            "cannot open database {}: the folder {} does not exist (create it, or give another --db)",
            path.display(),
            dir.display()
        );
    }
    let lock_path = lock_path(path);
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open lock file {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        bail!(
            "{} is in use by another keel process (one process per embedded database; use PostgreSQL to share a store)",
            path.display()
        );
    }
    let store = SqliteStore::open(path)
        .await
        .with_context(|| format!("cannot open database {}", path.display()))?;
    let recovered = store
        .recover_leases(keel_engine::now())
        .await
        .context("cannot recover leases")?;
    if recovered > 0 {
        tracing::info!(recovered, "took over tasks left by a previous process");
    }
    Ok(Embedded { store, _lock: lock })
}

fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}
