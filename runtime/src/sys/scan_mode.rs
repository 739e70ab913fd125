//! How thread scans reach the host's threads: a real-time signal, and
//! which one, or no signal at all (the host's quiescent points).
//!
//! The choice is made before initialisation and fixed by it
//! ([`freeze`], called by `threads::scan_init`):
//!
//! - [`set_scan_signal`]: the signal, `SIGRTMIN..=SIGRTMAX`. A host that
//!   owns some real-time signals (a VM, a runtime using them for its own
//!   safepoints or profiling) gives probert one it does not use. Refused if
//!   the host already has a handler there.
//! - otherwise the environment variable `PROBERT_SCAN_SIGNAL`: a number, or
//!   `SIGRTMIN+n` / `SIGRTMAX-n` (`RTMIN+n`, `RTMAX-n`, case-insensitive), for
//!   hosts that cannot be changed (an agent injected with `LD_PRELOAD`). A
//!   value that names no real-time signal makes initialisation fail.
//! - otherwise `SIGRTMAX - 1`.
//! - [`use_quiescent_points`]: no scan signal at all. Thread scans (and,
//!   where `membarrier` is missing, the memory barrier of grace periods) are
//!   completed by the threads the host registered passing its quiescent
//!   points (`sys::quiescent`); probert sends no signal, installs no handler
//!   but its `SIGTRAP` one, and never lists `/proc/self/task`.
//!
//! The API call wins over the environment: the host knows its signals.
//!
//! # Safety
//!
//! One `sigaction` query (null new action) per [`set_scan_signal`].
#![allow(unsafe_code)]

use std::sync::Mutex;

use crate::error::{Error, Result};

/// The chosen mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanMode {
    /// Scans signal every thread with this real-time signal.
    Signal(i32),
    /// Scans wait for the registered threads' quiescent points.
    QuiescentPoints,
}

/// The choice so far, and whether initialisation fixed it.
#[derive(Debug)]
struct Choice {
    /// `None`: not chosen by the API (the environment, then the default).
    chosen: Option<ScanMode>,
    /// The mode initialisation fixed.
    frozen: Option<ScanMode>,
}

static CHOICE: Mutex<Choice> = Mutex::new(Choice {
    chosen: None,
    frozen: None,
});

/// The environment variable naming the scan signal.
pub const ENV: &str = "PROBERT_SCAN_SIGNAL";

fn lock() -> std::sync::MutexGuard<'static, Choice> {
    CHOICE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The default: `SIGRTMAX - 1` (the top of the range, because libcs and
/// runtimes reserve its bottom — glibc takes 32–33, musl 32–34 — and
/// `SIGRTMAX` itself is the one applications most often pick).
pub fn default_signal() -> i32 {
    libc::SIGRTMAX() - 1
}

/// Chooses `sig` as the scan signal. Before initialisation only (then the
/// same signal again is accepted); [`Error::InvalidArgument`] for a signal
/// outside `SIGRTMIN..=SIGRTMAX`, after [`use_quiescent_points`], or after
/// initialisation fixed another mode; [`Error::Signal`] if the host has a
/// handler for `sig`. Normal context.
pub fn set_scan_signal(sig: i32) -> Result<()> {
    if !(libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(&sig) {
        return Err(Error::InvalidArgument(
            format!(
                "the scan signal must be a real-time signal ({}..={}), not {sig}",
                libc::SIGRTMIN(),
                libc::SIGRTMAX()
            )
            .into(),
        ));
    }
    let mut c = lock();
    let want = ScanMode::Signal(sig);
    match c.frozen {
        Some(m) if m == want => return Ok(()),
        Some(m) => {
            return Err(Error::InvalidArgument(
                format!("probert is initialised already, with thread scans by {m:?}").into(),
            ))
        }
        None => {}
    }
    if c.chosen == Some(ScanMode::QuiescentPoints) {
        return Err(Error::InvalidArgument(
            "quiescent points were chosen: thread scans send no signal".into(),
        ));
    }
    if has_foreign_handler(sig)? {
        return Err(Error::Signal(
            format!("signal {sig} already has a handler: the host uses it").into(),
        ));
    }
    c.chosen = Some(want);
    Ok(())
}

/// Chooses quiescent points: no scan signal (see the module docs). Before
/// initialisation only; idempotent. Normal context.
pub fn use_quiescent_points() -> Result<()> {
    let mut c = lock();
    match c.frozen {
        Some(ScanMode::QuiescentPoints) => return Ok(()),
        Some(m) => {
            return Err(Error::InvalidArgument(
                format!("probert is initialised already, with thread scans by {m:?}").into(),
            ))
        }
        None => {}
    }
    c.chosen = Some(ScanMode::QuiescentPoints);
    Ok(())
}

/// Fixes the mode (idempotent): the API's choice, else the environment's,
/// else the default. Normal context.
pub fn freeze() -> Result<ScanMode> {
    let mut c = lock();
    if let Some(m) = c.frozen {
        return Ok(m);
    }
    let mode = match c.chosen {
        Some(m) => m,
        None => match std::env::var(ENV) {
            Ok(v) => ScanMode::Signal(parse_signal(&v).ok_or_else(|| {
                Error::InvalidArgument(
                    format!(
                        "{ENV}={v:?} names no real-time signal ({}..={}; e.g. 40, SIGRTMIN+3, \
                         SIGRTMAX-2)",
                        libc::SIGRTMIN(),
                        libc::SIGRTMAX()
                    )
                    .into(),
                )
            })?),
            Err(_) => ScanMode::Signal(default_signal()),
        },
    };
    c.frozen = Some(mode);
    Ok(mode)
}

/// Parses `40`, `SIGRTMIN+3`, `rtmax-2`, `SIGRTMAX`: a real-time signal.
fn parse_signal(v: &str) -> Option<i32> {
    let v = v.trim().to_ascii_uppercase();
    let v = v.strip_prefix("SIG").unwrap_or(&v);
    let (min, max) = (libc::SIGRTMIN(), libc::SIGRTMAX());
    let sig = if let Some(rest) = v.strip_prefix("RTMIN") {
        min.checked_add(offset(rest, '+')?)?
    } else if let Some(rest) = v.strip_prefix("RTMAX") {
        max.checked_sub(offset(rest, '-')?)?
    } else {
        v.parse().ok()?
    };
    (min..=max).contains(&sig).then_some(sig)
}

/// `""` → 0, `"+3"` (with `sign` `'+'`) → 3.
fn offset(rest: &str, sign: char) -> Option<i32> {
    if rest.is_empty() {
        return Some(0);
    }
    rest.strip_prefix(sign)?.trim().parse().ok()
}

/// Whether `sig` has a handler (not `SIG_DFL`/`SIG_IGN`) that is not the
/// thread scan's.
fn has_foreign_handler(sig: i32) -> Result<bool> {
    // SAFETY: `sigaction` is plain data; all-zero is valid.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a query (null new action) writing only `old`.
    if unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) } != 0 {
        return Err(Error::Signal(
            format!(
                "sigaction({sig}) query: {}",
                std::io::Error::last_os_error()
            )
            .into(),
        ));
    }
    let h = old.sa_sigaction;
    Ok(h != libc::SIG_DFL && h != libc::SIG_IGN && h != super::threads::scan_handler())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_signal_names() {
        let (min, max) = (libc::SIGRTMIN(), libc::SIGRTMAX());
        assert_eq!(parse_signal("SIGRTMIN+3"), Some(min + 3));
        assert_eq!(parse_signal(" rtmax-2 "), Some(max - 2));
        assert_eq!(parse_signal("SIGRTMAX"), Some(max));
        assert_eq!(parse_signal("RTMIN"), Some(min));
        assert_eq!(parse_signal(&(min + 1).to_string()), Some(min + 1));
        for bad in [
            "",
            "10",
            "SIGUSR1",
            "SIGRTMIN-1",
            "SIGRTMAX+1",
            "RTMIN+x",
            "64x",
        ] {
            assert_eq!(parse_signal(bad), None, "{bad:?}");
        }
    }
}
