//! Code lifecycle: memory the host reserves, reprotects, rewrites, frees or
//! unloads under probes. Each scenario in its own process; none may fault.
#![allow(unsafe_code)]
// Test code calls JIT code, libc and probert's unsafe attach on purpose; the
// safety premise of every such call is the test itself.
#![allow(clippy::undocumented_unsafe_blocks)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::{bytes, count, counter};
use probert::{AttachOptions, Error, Mode, RegionDesc, RegionOptions};

/// `mov eax, 1; add eax, edi; ret`: f(x) = x + 1; its first instruction is
/// long enough for a jump.
const CODE: [u8; 8] = [0xB8, 0x01, 0x00, 0x00, 0x00, 0x01, 0xF8, 0xC3];
const PAGE: usize = 4096;

fn mmap(len: usize, prot: i32) -> usize {
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    p as usize
}

fn protect(addr: usize, len: usize, prot: i32) {
    assert_eq!(unsafe { libc::mprotect(addr as *mut _, len, prot) }, 0);
}

/// Emits [`CODE`] at `at` (a page the host makes RW, then `prot`).
fn emit(at: usize, prot: i32) {
    let page = at & !(PAGE - 1);
    protect(page, PAGE, libc::PROT_READ | libc::PROT_WRITE);
    unsafe { std::ptr::copy_nonoverlapping(CODE.as_ptr(), at as *mut u8, CODE.len()) };
    protect(page, PAGE, prot);
}

const RX: i32 = libc::PROT_READ | libc::PROT_EXEC;
const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;

/// A fresh RX page holding [`CODE`] at its start.
fn jit_page() -> usize {
    let p = mmap(PAGE, RW);
    emit(p, RX);
    p
}

fn desc(start: usize, len: usize) -> RegionDesc {
    RegionDesc {
        start,
        len,
        name: "jit".into(),
        write: None,
    }
}

fn call(addr: usize, x: u32) -> u32 {
    let f: extern "C" fn(u32) -> u32 = unsafe { std::mem::transmute(addr) };
    f(x)
}

/// Recycles stubs and checks none is left retired (what freed probes left
/// behind went back to the pool).
fn stubs_recycled() {
    probert::recycle_stubs().unwrap();
    assert_eq!(probert::retired_stubs(), (0, 0), "stubs recycled");
}

isolated!(region_remove_after_munmap_retires_probes, {
    // Code freed before `region_remove`, after two threads ran it.
    static HITS: AtomicU64 = AtomicU64::new(0);
    let page = jit_page();
    let region = probert::region_add(desc(page, PAGE)).unwrap();
    let id = unsafe { probert::attach(page, count, counter(&HITS)) }.unwrap();
    let threads: Vec<_> = (0..2)
        .map(|_| std::thread::spawn(move || (0..1000).map(|i| call(page, i)).sum::<u32>()))
        .collect();
    let sums: Vec<u32> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(sums, [500_500, 500_500]);
    assert_eq!(HITS.load(Ordering::SeqCst), 2000);
    assert_eq!(unsafe { libc::munmap(page as *mut _, PAGE) }, 0);
    probert::region_remove(region).unwrap();
    assert_eq!(probert::probe_count(), 0);
    assert_eq!(probert::detach(id), Err(Error::NotFound));
    assert_eq!(probert::region_remove(region), Err(Error::NotFound));
    stubs_recycled();
});

isolated!(region_remove_gone_touches_nothing, {
    // The host says the memory is gone, and it was reused for other code:
    // nothing of it is read or written.
    static HITS: AtomicU64 = AtomicU64::new(0);
    let page = jit_page();
    let region = probert::region_add(desc(page, PAGE)).unwrap();
    let id = unsafe { probert::attach(page, count, counter(&HITS)) }.unwrap();
    // Reused: the host writes other code over the probe, trap and all.
    let other = [0xB8, 0x07, 0x00, 0x00, 0x00, 0xC3];
    protect(page, PAGE, RW);
    unsafe { std::ptr::copy_nonoverlapping(other.as_ptr(), page as *mut u8, other.len()) };
    protect(page, PAGE, RX);
    probert::region_remove_gone(region).unwrap();
    assert_eq!(bytes(page, other.len()), other, "nothing written");
    assert_eq!(call(page, 0), 7);
    assert_eq!(probert::detach(id), Err(Error::NotFound));
    assert_eq!(probert::probe_count(), 0);
    stubs_recycled();
});

isolated!(detach_after_munmap_without_region_remove, {
    static HITS: AtomicU64 = AtomicU64::new(0);
    let page = jit_page();
    let _region = probert::region_add(desc(page, PAGE)).unwrap();
    let id = unsafe { probert::attach(page, count, counter(&HITS)) }.unwrap();
    assert_eq!(call(page, 1), 2);
    assert_eq!(unsafe { libc::munmap(page as *mut _, PAGE) }, 0);
    probert::detach(id).unwrap();
    assert_eq!(probert::probe_count(), 0);
    assert_eq!(HITS.load(Ordering::SeqCst), 1);
});

isolated!(detach_under_prot_none_restores_for_later, {
    for mode in [Mode::Trap, Mode::Auto] {
        static HITS: AtomicU64 = AtomicU64::new(0);
        let page = jit_page();
        let _region = probert::region_add(desc(page, PAGE)).unwrap();
        let opts = AttachOptions {
            mode,
            ..Default::default()
        };
        let id = unsafe { probert::attach_with(page, count, counter(&HITS), opts) }.unwrap();
        assert_eq!(call(page, 1), 2);
        protect(page, PAGE, libc::PROT_NONE);
        probert::detach(id).unwrap();
        // The host makes it executable again: the code is the original.
        protect(page, PAGE, RX);
        assert_eq!(bytes(page, CODE.len()), CODE, "{mode:?}");
        assert_eq!(call(page, 2), 3);
    }
});

isolated!(reserved_arena_attach_in_uncommitted_part_fails_cleanly, {
    static HITS: AtomicU64 = AtomicU64::new(0);
    let arena = mmap(16 * PAGE, libc::PROT_NONE);
    emit(arena, RX);
    // Holes: a page unmapped at the end.
    assert_eq!(
        unsafe { libc::munmap((arena + 15 * PAGE) as *mut _, PAGE) },
        0
    );
    let region = probert::region_add(desc(arena, 16 * PAGE)).unwrap();
    probert::region_functions(region, &[(arena, CODE.len()), (arena + 4 * PAGE, 16)]).unwrap();
    for at in [arena + 4 * PAGE, arena + 15 * PAGE] {
        let err = unsafe { probert::attach(at, count, counter(&HITS)) }.unwrap_err();
        assert!(matches!(err, Error::Protect { .. }), "{at:#x}: {err}");
    }
    assert_eq!(probert::probe_count(), 0, "nothing attached");
    // Committed later, it works.
    emit(arena + 4 * PAGE, RX);
    let a = unsafe { probert::attach(arena, count, counter(&HITS)) }.unwrap();
    let b = unsafe { probert::attach(arena + 4 * PAGE, count, counter(&HITS)) }.unwrap();
    assert_eq!(call(arena, 1) + call(arena + 4 * PAGE, 1), 4);
    assert_eq!(HITS.load(Ordering::SeqCst), 2);
    probert::detach(a).unwrap();
    probert::detach(b).unwrap();
    assert_eq!(bytes(arena + 4 * PAGE, CODE.len()), CODE);
    probert::region_remove(region).unwrap();
});

isolated!(region_add_limits_and_non_executable_memory, {
    static HITS: AtomicU64 = AtomicU64::new(0);
    let page = mmap(PAGE, RW);
    // 64 TiB, or a range where nothing is mapped: refused.
    for (s, l) in [
        (page, 64usize << 40),
        (0x10_0000, PAGE),
        (usize::MAX - PAGE, PAGE),
    ] {
        let err = probert::region_add(desc(s, l)).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument(_)),
            "{s:#x}+{l:#x}: {err}"
        );
    }
    // A buffer the JIT still emits into read-write: registered, but nothing
    // is written into it until it is executable (W^X: RW while emitting).
    emit(page, RW);
    let region = probert::region_add(desc(page, PAGE)).unwrap();
    let err = unsafe { probert::attach(page, count, counter(&HITS)) }.unwrap_err();
    assert!(matches!(err, Error::Protect { .. }), "{err}");
    assert_eq!(bytes(page, CODE.len()), CODE, "nothing written");
    protect(page, PAGE, RX);
    let id = unsafe { probert::attach(page, count, counter(&HITS)) }.unwrap();
    assert_eq!(call(page, 1), 2);
    // The JIT flips the page RW to emit more code after it, then RX again.
    protect(page, PAGE, RW);
    unsafe { std::ptr::copy_nonoverlapping(CODE.as_ptr(), (page + 64) as *mut u8, CODE.len()) };
    protect(page, PAGE, RX);
    assert_eq!(call(page, 2) + call(page + 64, 2), 6);
    assert_eq!(HITS.load(Ordering::SeqCst), 2);
    probert::detach(id).unwrap();
    assert_eq!(bytes(page, CODE.len()), CODE);
    probert::region_remove(region).unwrap();
    // Asked for: probes in memory that is not executable.
    let data = mmap(PAGE, RW);
    emit(data, RW);
    let r = probert::region_add_with(
        desc(data, PAGE),
        RegionOptions {
            any_protection: true,
        },
    )
    .unwrap();
    let id = unsafe { probert::attach(data, count, counter(&HITS)) }.unwrap();
    assert_ne!(bytes(data, 1), CODE[..1], "probed");
    probert::detach(id).unwrap();
    assert_eq!(bytes(data, CODE.len()), CODE);
    probert::region_remove(r).unwrap();
});

/// A memfd mapped RW and RX, with a write callback into the RW view that
/// fails while `FAIL` is set, or on the write numbered `FAIL_AT` (1-based).
struct Dual {
    rx: usize,
    region: probert::RegionId,
}

static FAIL: AtomicBool = AtomicBool::new(false);
static FAIL_AT: AtomicU64 = AtomicU64::new(0);
static WRITES: AtomicU64 = AtomicU64::new(0);

fn dual() -> Dual {
    let (rw, rx) = unsafe {
        let fd = libc::memfd_create(c"probert-life".as_ptr(), 0);
        assert!(fd >= 0);
        assert_eq!(libc::ftruncate(fd, PAGE as i64), 0);
        let map = |prot| libc::mmap(std::ptr::null_mut(), PAGE, prot, libc::MAP_SHARED, fd, 0);
        let (rw, rx) = (map(RW), map(RX));
        assert!(rw != libc::MAP_FAILED && rx != libc::MAP_FAILED);
        std::ptr::copy_nonoverlapping(CODE.as_ptr(), rw.cast(), CODE.len());
        (rw as usize, rx as usize)
    };
    let region = probert::region_add(RegionDesc {
        start: rx,
        len: PAGE,
        name: "dual".into(),
        write: Some(Box::new(move |dst: usize, src: &[u8]| {
            let n = WRITES.fetch_add(1, Ordering::SeqCst) + 1;
            if FAIL.load(Ordering::SeqCst) || FAIL_AT.load(Ordering::SeqCst) == n {
                return Err("refused by the test".into());
            }
            let off = dst - rx;
            unsafe {
                std::ptr::copy_nonoverlapping(src.as_ptr(), (rw + off) as *mut u8, src.len())
            };
            Ok(())
        })),
    })
    .unwrap();
    Dual { rx, region }
}

isolated!(failed_write_during_detach_keeps_the_probe, {
    static HITS: AtomicU64 = AtomicU64::new(0);
    for mode in [Mode::Trap, Mode::Auto] {
        HITS.store(0, Ordering::SeqCst);
        let d = dual();
        let opts = AttachOptions {
            mode,
            ..Default::default()
        };
        let id = unsafe { probert::attach_with(d.rx, count, counter(&HITS), opts) }.unwrap();
        let before = bytes(d.rx, CODE.len());
        assert_ne!(before, CODE);
        FAIL.store(true, Ordering::SeqCst);
        let err = probert::detach(id).unwrap_err();
        assert!(matches!(err, Error::Protect { .. }), "{err}");
        // Still attached, still called: the code and the probe agree.
        assert_eq!(call(d.rx, 1), 2);
        assert_eq!(HITS.load(Ordering::SeqCst), 1, "{mode:?}");
        assert_eq!(probert::stats(id).unwrap().hits, 1);
        assert_eq!(bytes(d.rx, 1), before[..1]);
        let err = probert::region_remove(d.region).unwrap_err();
        assert!(matches!(err, Error::Protect { .. }), "{err}");
        assert_eq!(call(d.rx, 1), 2);
        assert_eq!(HITS.load(Ordering::SeqCst), 2);
        FAIL.store(false, Ordering::SeqCst);
        probert::detach(id).unwrap();
        assert_eq!(bytes(d.rx, CODE.len()), CODE);
        probert::region_remove(d.region).unwrap();
    }
});

isolated!(fast_attach_whose_later_write_fails_fails, {
    static HITS: AtomicU64 = AtomicU64::new(0);
    // The first write is the trap; each later one is a step of the jump.
    for n in 2..=3 {
        let d = dual();
        let start = WRITES.load(Ordering::SeqCst);
        FAIL_AT.store(start + n, Ordering::SeqCst);
        let opts = AttachOptions {
            mode: Mode::Fast,
            ..Default::default()
        };
        let r = unsafe { probert::attach_with(d.rx, count, counter(&HITS), opts) };
        FAIL_AT.store(0, Ordering::SeqCst);
        assert!(r.is_err(), "write {n}: {r:?}");
        assert_eq!(bytes(d.rx, CODE.len()), CODE, "write {n}");
        assert_eq!(probert::probe_count(), 0);
        assert_eq!(call(d.rx, 1), 2);
        assert_eq!(HITS.load(Ordering::SeqCst), 0);
        probert::region_remove(d.region).unwrap();
    }
});

isolated!(code_rewritten_behind_our_back_is_left_alone, {
    static HITS: AtomicU64 = AtomicU64::new(0);
    for mode in [Mode::Trap, Mode::Auto] {
        let page = jit_page();
        let region = probert::region_add(desc(page, PAGE)).unwrap();
        let opts = AttachOptions {
            mode,
            ..Default::default()
        };
        let id = unsafe { probert::attach_with(page, count, counter(&HITS), opts) }.unwrap();
        // Deoptimised: the host writes new code over the probed instruction.
        let other = [0xB8, 0x07, 0x00, 0x00, 0x00, 0xC3];
        protect(page, PAGE, RW);
        unsafe { std::ptr::copy_nonoverlapping(other.as_ptr(), page as *mut u8, other.len()) };
        protect(page, PAGE, RX);
        probert::detach(id).unwrap();
        assert_eq!(bytes(page, other.len()), other, "{mode:?}: not overwritten");
        assert_eq!(call(page, 0), 7);
        probert::region_remove(region).unwrap();
    }
});

/// `dlopen`s `path`, returning the handle.
fn dlopen(path: &std::ffi::CStr) -> *mut libc::c_void {
    let h = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!h.is_null(), "dlopen {path:?}");
    h
}

isolated!(dlclose_retires_probes_and_reload_gets_no_stale_bytes, {
    static HITS: AtomicU64 = AtomicU64::new(0);
    let lib = c"libz.so.1";
    let mut last: Option<(probert::ConsumerId, usize)> = None;
    for round in 0..3 {
        let h = dlopen(lib);
        let f = unsafe { libc::dlsym(h, c"zlibVersion".as_ptr()) } as usize;
        assert_ne!(f, 0);
        let orig = bytes(f, 16);
        if let Some((prev_id, prev)) = last.take() {
            if prev == f {
                // Reloaded where it was: the old probe never wrote here, and
                // the new code is probed once the old one is detached.
                assert_ne!(orig[0], 0xCC, "round {round}: stale trap");
                assert_eq!(
                    probert::probe_mode(f),
                    Err(Error::CodeChanged { addr: f }),
                    "round {round}"
                );
                let again = unsafe { probert::attach(f, count, counter(&HITS)) };
                assert_eq!(again.unwrap_err(), Error::CodeChanged { addr: f });
            }
            assert_eq!(probert::stats(prev_id).unwrap().hits, 1, "stats work");
            probert::detach(prev_id).unwrap();
            assert_eq!(bytes(f, 16), orig, "round {round}: detach wrote nothing");
        }
        let id = unsafe { probert::attach(f, count, counter(&HITS)) }.unwrap();
        let version: extern "C" fn() -> *const libc::c_char = unsafe { std::mem::transmute(f) };
        assert!(!version().is_null());
        assert_eq!(HITS.load(Ordering::SeqCst), round + 1);
        assert!(probert::probe_mode(f).is_ok());
        assert_eq!(unsafe { libc::dlclose(h) }, 0);
        let still = unsafe { libc::dlopen(lib.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
        assert!(still.is_null(), "libz stayed loaded");
        // Unloaded, with the probe attached: the next control call retires it.
        assert_eq!(
            probert::probe_mode(f),
            Err(Error::CodeChanged { addr: f }),
            "round {round}"
        );
        last = Some((id, f));
    }
    // Loaded again, then the last probe detached: nothing written.
    let h = dlopen(lib);
    let f = unsafe { libc::dlsym(h, c"zlibVersion".as_ptr()) } as usize;
    let fresh = bytes(f, 16);
    probert::detach(last.unwrap().0).unwrap();
    assert_eq!(bytes(f, 16), fresh);
    assert_ne!(fresh[0], 0xCC);
    assert_eq!(probert::probe_count(), 0);
    stubs_recycled();
    assert_eq!(unsafe { libc::dlclose(h) }, 0);
});

isolated!(code_write_under_probes_while_threads_run_it, {
    static HITS: AtomicU64 = AtomicU64::new(0);
    static CALLS: AtomicU64 = AtomicU64::new(0);
    static STOP: AtomicBool = AtomicBool::new(false);
    let page = jit_page();
    let region = probert::region_add(desc(page, PAGE)).unwrap();
    let id = unsafe { probert::attach(page, count, counter(&HITS)) }.unwrap();
    let threads: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || {
                let mut bad = 0u64;
                let mut x = 0u32;
                while !STOP.load(Ordering::SeqCst) {
                    let r = call(page, x);
                    CALLS.fetch_add(1, Ordering::SeqCst);
                    // The immediate is 1 or 2: never anything else.
                    if r != x + 1 && r != x + 2 {
                        bad += 1;
                    }
                    x = x.wrapping_add(1) % 1_000_000;
                }
                bad
            })
        })
        .collect();
    for round in 0..20u32 {
        // The threads run the code between rewrites.
        let seen = CALLS.load(Ordering::SeqCst);
        while CALLS.load(Ordering::SeqCst) < seen + 200 {
            std::thread::yield_now();
        }
        let imm = 1 + (round % 2 == 0) as u8;
        // mov eax, imm: the probed instruction's immediate.
        let got = probert::code_write(page + 1, &[imm, 0, 0, 0]).unwrap();
        assert_eq!(got, [probert::Rewritten::Rederived { probe: page }]);
        // From here every call sees the new code, and is still counted.
        assert_eq!(call(page, 10), 10 + u32::from(imm), "round {round}");
    }
    STOP.store(true, Ordering::SeqCst);
    let bad: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(bad, 0, "a thread saw a torn instruction");
    let calls = CALLS.load(Ordering::SeqCst) + 20;
    probert::sync().unwrap();
    assert_eq!(HITS.load(Ordering::SeqCst), calls, "every call counted");
    assert_eq!(probert::stats(id).unwrap().hits, calls);
    probert::detach(id).unwrap();
    // Detach restores the host's latest code, not the code first probed.
    assert_eq!(
        bytes(page, CODE.len()),
        [0xB8, 1, 0, 0, 0, 0x01, 0xF8, 0xC3]
    );
    probert::region_remove(region).unwrap();
});

isolated!(code_write_that_unprobeable_code_retires_the_probe, {
    static HITS: AtomicU64 = AtomicU64::new(0);
    let page = jit_page();
    let region = probert::region_add(desc(page, PAGE)).unwrap();
    // A probe at the `add`.
    let id = unsafe { probert::attach(page + 5, count, counter(&HITS)) }.unwrap();
    assert_eq!(call(page, 1), 2);
    // mov rax, 1 (10 bytes): +5 is now inside an instruction.
    let new = [0x48, 0xB8, 1, 0, 0, 0, 0, 0, 0, 0, 0x01, 0xF8, 0xC3];
    let got = probert::code_write(page, &new).unwrap();
    assert_eq!(got, [probert::Rewritten::Retired { probe: page + 5 }]);
    assert_eq!(bytes(page, new.len()), new, "the host's bytes, no trap");
    assert_eq!(call(page, 1), 2);
    assert_eq!(HITS.load(Ordering::SeqCst), 1);
    assert_eq!(
        probert::probe_mode(page + 5),
        Err(Error::CodeChanged { addr: page + 5 })
    );
    assert_eq!(probert::stats(id).unwrap().hits, 1);
    probert::detach(id).unwrap();
    assert_eq!(bytes(page, new.len()), new);
    // Outside JIT regions: refused.
    let f = probert::symbol_addr(Some("libc.so.6"), "abs").unwrap();
    assert_eq!(
        probert::code_write(f, &[0x90]),
        Err(Error::NoRegion { addr: f })
    );
    probert::region_remove(region).unwrap();
});
