//! SIGINT/SIGTERM: the first one asks the conversion to stop at the next entry boundary
//! (the staging folder stays, so rerunning the command resumes); a second one exits at once.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Installs the handler; call once, from the binary.
pub fn install() {
    let _ = ctrlc::set_handler(|| {
        if REQUESTED.swap(true, Ordering::SeqCst) {
            eprintln!("interrupted again: exiting now (rerun the same command to resume)");
            std::process::exit(130);
        }
        eprintln!("interrupt received: stopping after the current items (interrupt again to exit at once)");
    });
}

pub fn requested() -> bool {
    REQUESTED.load(Ordering::Relaxed)
}

/// Fails with `Error::Interrupted` once a stop was requested.
pub fn check() -> Result<()> {
    if requested() {
        Err(Error::Interrupted)
    } else {
        Ok(())
    }
}
