//! Waiting for something the server does in the background: poll until it
//! holds, within a bound, instead of sleeping for a guessed while.

use std::time::Duration;

use tokio::time::Instant;

/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(20);

/// Polls `check` until it holds; panics naming `what` once `within` has
/// passed without it.
pub async fn eventually(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    eventually_ok(what, within, async || {
        if check().await {
            Ok(())
        } else {
            Err(String::new())
        }
    })
    .await
}

/// Polls `check` until it gives `Ok`, and returns what it gave; panics
/// naming `what`, with the last `Err` (what was seen instead), once `within`
/// has passed.
pub async fn eventually_ok<T>(
    what: &str,
    within: Duration,
    mut check: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        match check().await {
            Ok(t) => return t,
            Err(seen) => assert!(
                Instant::now() < deadline,
                "{what}: not within {within:?}{}{seen}",
                if seen.is_empty() { "" } else { "; seen: " }
            ),
        }
        tokio::time::sleep(POLL).await;
    }
}
