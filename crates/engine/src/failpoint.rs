//! Crash points for durability tests. With `KEEL_FAILPOINTS=<name>[,...]`
//! a debug build SIGKILLs its own process when it reaches a named point,
//! so a test can kill a real process exactly between two commits that no
//! timing from outside could separate (after one compensation's outcome is
//! committed and before the next one starts). Release builds compile the
//! points to nothing and ignore the variable.

/// After a compensation's outcome is committed, before anything else.
pub const COMPENSATION_DONE: &str = "compensation_done";

/// Kills this process with SIGKILL if `name` is among `KEEL_FAILPOINTS`
/// (debug builds only).
pub fn hit(name: &str) {
    #[cfg(debug_assertions)]
    {
        use std::sync::OnceLock;
        static POINTS: OnceLock<Vec<String>> = OnceLock::new();
        let points = POINTS.get_or_init(|| {
            std::env::var("KEEL_FAILPOINTS")
                .unwrap_or_default()
                .split(',')
                .map(|p| p.trim().to_string())
                .filter(|p| !p.is_empty())
                .collect()
        });
        if points.iter().any(|p| p == name) {
            tracing::warn!(failpoint = name, "failpoint reached: killing this process");
            let pid = std::process::id().to_string();
            // A real SIGKILL (no destructors, no flush), sent by `kill(1)`
            // to keep this crate free of `unsafe`; abort if that fails.
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid])
                .status();
            std::thread::sleep(std::time::Duration::from_secs(5));
            std::process::abort();
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = name;
}
