//! Return probes: entry and return hits paired per invocation.
#![allow(unsafe_code)]
#![allow(clippy::undocumented_unsafe_blocks)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};

use probert::{Action, Reg};

#[inline(never)]
#[no_mangle]
extern "C" fn r_square(x: u64) -> u64 {
    std::hint::black_box(x) * x
}

isolated!(entry_and_return_pair_with_the_value_returned, {
    static ENTRIES: AtomicU64 = AtomicU64::new(0);
    static RETURNS: AtomicU64 = AtomicU64::new(0);
    static LAST: AtomicU64 = AtomicU64::new(0);
    let f = r_square as *const () as usize;
    let probe = unsafe {
        probert::probe_returns(
            f,
            |hit, arg: &mut u64| {
                ENTRIES.fetch_add(1, Ordering::SeqCst);
                *arg = hit.regs().arg(0).unwrap();
                Action::Continue
            },
            |hit, arg: &mut u64| {
                RETURNS.fetch_add(1, Ordering::SeqCst);
                assert_eq!(hit.regs().get(Reg::Rax), *arg * *arg);
                LAST.store(hit.regs().get(Reg::Rax), Ordering::SeqCst);
                Action::Continue
            },
        )
    }
    .unwrap();
    for x in 0..100u64 {
        assert_eq!(r_square(std::hint::black_box(x)), x * x);
    }
    assert_eq!(ENTRIES.load(Ordering::SeqCst), 100);
    assert_eq!(RETURNS.load(Ordering::SeqCst), 100);
    assert_eq!(LAST.load(Ordering::SeqCst), 99 * 99);
    let s = probe.stats().unwrap();
    assert_eq!((s.hits, s.returns, s.abandoned), (100, 100, 0));
    probe.detach().unwrap();
    assert_eq!(r_square(3), 9);
    assert_eq!(RETURNS.load(Ordering::SeqCst), 100);
});
