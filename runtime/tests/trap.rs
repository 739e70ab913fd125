//! The trap path end to end. Every test patches code, so each runs in its own
//! process (`isolated!`).
#![allow(unsafe_code)]
// Test code calls assembly targets, libc and probert's unsafe attach on
// purpose; the safety premise of every such call is the test itself.
#![allow(clippy::undocumented_unsafe_blocks)]

mod common;
mod targets;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use common::{bytes, count, counter};
use probert::{Action, ConsumerId, Error, Hit, Mode, Reg};
use targets::*;

/// Attaches a counting consumer at `addr` on the trap path, then with the
/// default mode (the fast path where the site allows it); each time checks
/// `call` returns `expect` `n` times with exactly `n` hits, detaches, and
/// checks the bytes restored and no more hits.
/// `auto` is the mechanism the default mode must pick for this site.
fn probe_and_check(addr: usize, n: u64, call: impl Fn() -> u64, expect: u64, auto: Mode) {
    FAST_CAPABLE.store(auto == Mode::Fast, Ordering::SeqCst);
    probe_and_check_mode(addr, n, &call, expect, Mode::Trap, Mode::Trap);
    probe_and_check_mode(addr, n, &call, expect, Mode::Auto, auto);
    if auto == Mode::Fast {
        probe_and_check_mode(addr, n, &call, expect, Mode::Fast, Mode::Fast);
    } else {
        let err = unsafe { probert::attach_ex(addr, count, std::ptr::null_mut(), Mode::Fast) };
        assert!(
            matches!(err, Err(Error::UnsupportedInstruction { .. })),
            "{err:?}"
        );
    }
}

/// Whether a site served by `served` after a request for `mode` is a
/// fast-capable one (the test's targets that are fast-capable are fast in
/// AUTO).
fn auto_capable(served: Mode, mode: Mode) -> bool {
    served == Mode::Fast || mode == Mode::Trap && FAST_CAPABLE.load(Ordering::SeqCst)
}

/// Set by `probe_and_check` for a target AUTO makes fast.
static FAST_CAPABLE: AtomicBool = AtomicBool::new(false);

fn probe_and_check_mode(
    addr: usize,
    n: u64,
    call: &impl Fn() -> u64,
    expect: u64,
    mode: Mode,
    served_expected: Mode,
) {
    static HITS: AtomicU64 = AtomicU64::new(0);
    HITS.store(0, Ordering::SeqCst);
    let before = bytes(addr, 16);
    assert_eq!(call(), expect, "unprobed result");
    // SAFETY: a target of this test; `count` is async-signal-safe.
    let id = unsafe { probert::attach_ex(addr, count, counter(&HITS), mode) }.expect("attach");
    let served = probert::probe_mode(addr).unwrap();
    // At a fast-capable `endbr64` entry the trap, and the jump, go after it.
    let endbr = before[..4] == [0xF3, 0x0F, 0x1E, 0xFA];
    let patch = if endbr && auto_capable(served, mode) {
        addr + 4
    } else {
        addr
    };
    match served {
        Mode::Trap => assert_eq!(bytes(patch, 1), [0xCC]),
        Mode::Fast => assert_eq!(bytes(patch, 1), [0xE9]),
        Mode::Auto => panic!("probe_mode never answers Auto"),
    }
    assert_eq!(served, served_expected, "mechanism for {mode:?}");
    for _ in 0..n {
        assert_eq!(call(), expect, "probed result");
    }
    assert_eq!(HITS.load(Ordering::SeqCst), n);
    assert_eq!(probert::stats(id).unwrap().hits, n);
    probert::detach(id).expect("detach");
    assert_eq!(bytes(addr, 16), before, "code restored byte for byte");
    assert_eq!(call(), expect);
    assert_eq!(HITS.load(Ordering::SeqCst), n, "no hit after detach");
    assert_eq!(probert::detach(id), Err(Error::NotFound));
}

isolated!(push_rbp, {
    // `push rbp; mov rbp, rsp; lea`: a run of three instructions.
    probe_and_check(
        addr!(t_push_rbp),
        10,
        || unsafe { t_push_rbp(41) },
        42,
        Mode::Fast,
    );
});

isolated!(push_rbp_emulated, {
    // A branch lands after the `push`: trap only, emulated.
    probe_and_check(
        addr!(t_push_emul),
        10,
        || unsafe { t_push_emul(41) },
        42,
        Mode::Trap,
    );
});

isolated!(call_reg_emulated, {
    let site = addr!(t_call_reg_emul) + 7;
    let expect = site as u64 + 2;
    probe_and_check(
        site,
        10,
        || unsafe { t_call_reg_emul() },
        expect,
        Mode::Trap,
    );
});

isolated!(endbr64, {
    // The jump goes after the `endbr64`, which stays.
    probe_and_check(
        addr!(t_endbr),
        10,
        || unsafe { t_endbr(40) },
        42,
        Mode::Fast,
    );
});

isolated!(rip_relative_mov, {
    probe_and_check(
        addr!(t_riprel_mov),
        10,
        || unsafe { t_riprel_mov(5) },
        1005,
        Mode::Fast,
    );
});

isolated!(rip_relative_cmp, {
    probe_and_check(
        addr!(t_riprel_cmp),
        5,
        || unsafe { t_riprel_cmp(999) },
        0,
        Mode::Fast,
    );
    probe_and_check(
        addr!(t_riprel_cmp),
        5,
        || unsafe { t_riprel_cmp(1000) },
        1,
        Mode::Fast,
    );
});

isolated!(call_rel32_callee_sees_original_return_address, {
    let expect = addr!(t_call) as u64 + 5;
    probe_and_check(
        addr!(t_call),
        10,
        || unsafe { t_call() },
        expect,
        Mode::Fast,
    );
});

isolated!(jmp_rel32, {
    probe_and_check(addr!(t_jmp), 10, || unsafe { t_jmp(39) }, 42, Mode::Fast);
});

isolated!(jcc_taken_and_not_taken, {
    for (f, name) in [
        (t_jcc as unsafe extern "C" fn(u64) -> u64, "rel32"),
        (t_jcc8, "rel8"),
        (t_jcc8_emul, "rel8, a branch after it"),
    ] {
        let site = f as *const () as usize + 3;
        // jz rel32 is 6 bytes (fast); jz rel8 with the `mov` after it is 7
        // (fast, a run); with a branch landing after it, trap only.
        let auto = if name.contains("branch") {
            Mode::Trap
        } else {
            Mode::Fast
        };
        probe_and_check(site, 5, || unsafe { f(0) }, 2, auto);
        probe_and_check(site, 5, || unsafe { f(1) }, 1, auto);
    }
});

isolated!(sub_rsp, {
    probe_and_check(
        addr!(t_sub_rsp),
        10,
        || unsafe { t_sub_rsp(37) },
        42,
        Mode::Fast,
    );
});

isolated!(rsp_read, {
    // One call site, so the return address `t_rsp_read` reads is the same on
    // every call (a closure could be inlined at several sites in release).
    #[inline(never)]
    fn call() -> u64 {
        std::hint::black_box(unsafe { t_rsp_read() })
    }
    let unprobed = call();
    // `mov rax, [rsp]; ret`: a run ending in the `ret`.
    probe_and_check(addr!(t_rsp_read), 3, call, unprobed, Mode::Fast);
});

isolated!(lock_prefixed_rip_relative, {
    let before = unsafe { std::ptr::read_volatile(std::ptr::addr_of!(t_counter)) };
    probe_and_check(addr!(t_lock), 10, || unsafe { t_lock(42) }, 42, Mode::Fast);
    let after = unsafe { std::ptr::read_volatile(std::ptr::addr_of!(t_counter)) };
    // Three mechanisms: one unprobed call before, ten probed, one after.
    assert_eq!(after - before, 36);
});

isolated!(nop5_site, {
    probe_and_check(addr!(t_nop5), 10, || unsafe { t_nop5(33) }, 42, Mode::Fast);
});

isolated!(register_writes_are_observed, {
    unsafe extern "C" fn set_rdi(hit: *mut Hit) -> u32 {
        let hit = unsafe { &mut *hit };
        assert_eq!(hit.regs().rip, hit.addr as u64);
        hit.regs_mut().set(Reg::Rdi, 100);
        Action::Continue as u32
    }
    let id = unsafe { probert::attach(addr!(t_push_rbp), set_rdi, std::ptr::null_mut()) }.unwrap();
    assert_eq!(unsafe { t_push_rbp(1) }, 101);
    probert::detach(id).unwrap();
    assert_eq!(unsafe { t_push_rbp(1) }, 2);
});

isolated!(registers_and_arguments_are_read, {
    static SEEN: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];
    let probe = unsafe {
        probert::probe(addr!(t_push_rbp), |hit: &mut Hit| {
            let r = hit.regs();
            SEEN[0].store(r.arg(0).unwrap(), Ordering::Relaxed);
            SEEN[1].store(r.get(Reg::Rip), Ordering::Relaxed);
            SEEN[2].store(r.get(Reg::Rsp), Ordering::Relaxed);
            Action::Continue
        })
    }
    .unwrap();
    assert_eq!(unsafe { t_push_rbp(77) }, 78);
    assert_eq!(SEEN[0].load(Ordering::Relaxed), 77);
    assert_eq!(SEEN[1].load(Ordering::Relaxed), addr!(t_push_rbp) as u64);
    assert_ne!(SEEN[2].load(Ordering::Relaxed), 0);
    assert_eq!(probe.stats().unwrap().hits, 1);
});

isolated!(rip_write_redirects, {
    // A handler that sends `t_push_rbp` to `t_endbr` instead.
    unsafe extern "C" fn redirect(hit: *mut Hit) -> u32 {
        let hit = unsafe { &mut *hit };
        hit.regs_mut().rip = targets::t_endbr as *const () as usize as u64;
        Action::Continue as u32
    }
    let id = unsafe { probert::attach(addr!(t_push_rbp), redirect, std::ptr::null_mut()) }.unwrap();
    assert_eq!(unsafe { t_push_rbp(40) }, 42);
    probert::detach(id).unwrap();
});

isolated!(two_consumers_on_one_address, {
    static A: AtomicU64 = AtomicU64::new(0);
    static B: AtomicU64 = AtomicU64::new(0);
    let addr = addr!(t_riprel_mov);
    let a = unsafe { probert::attach(addr, count, counter(&A)) }.unwrap();
    let b = unsafe { probert::attach(addr, count, counter(&B)) }.unwrap();
    assert_ne!(a, b);
    for _ in 0..7 {
        assert_eq!(unsafe { t_riprel_mov(1) }, 1001);
    }
    probert::detach(a).unwrap();
    assert_eq!(
        probert::probe_mode(addr),
        Ok(Mode::Fast),
        "b still attached"
    );
    assert_eq!(unsafe { t_riprel_mov(1) }, 1001);
    probert::detach(b).unwrap();
    assert_eq!((A.load(Ordering::SeqCst), B.load(Ordering::SeqCst)), (7, 8));
    assert_ne!(bytes(addr, 1), [0xCC]);
});

isolated!(handler_returning_remove, {
    static HITS: AtomicU64 = AtomicU64::new(0);
    unsafe extern "C" fn once(hit: *mut Hit) -> u32 {
        unsafe { count(hit) };
        Action::Remove as u32
    }
    let addr = addr!(t_push_rbp);
    let before = bytes(addr, 8);
    let id = unsafe { probert::attach(addr, once, counter(&HITS)) }.unwrap();
    for _ in 0..5 {
        assert_eq!(unsafe { t_push_rbp(1) }, 2);
    }
    assert_eq!(HITS.load(Ordering::SeqCst), 1);
    assert_eq!(probert::stats(id), Err(Error::NotFound), "handle is stale");
    assert_eq!(probert::detach(id), Err(Error::NotFound));
    probert::sync().unwrap();
    assert_eq!(bytes(addr, 8), before, "the last consumer removed itself");
    assert_eq!(probert::probe_count(), 0);
});

/// Thread B is inside the handler when another call returns `Remove`: the
/// handle is stale, but `detach` (as `detach_batch`, for a batch holding
/// it) must still not return before B's call has: its user data may be
/// freed after it.
fn removed_consumer_waits_for_its_running_calls(detach: fn(ConsumerId) -> probert::Result<()>) {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    static IN_B: AtomicBool = AtomicBool::new(false);
    static RELEASE: AtomicBool = AtomicBool::new(false);
    unsafe extern "C" fn h(_: *mut Hit) -> u32 {
        if CALLS.fetch_add(1, Ordering::SeqCst) == 0 {
            IN_B.store(true, Ordering::SeqCst);
            while !RELEASE.load(Ordering::SeqCst) {
                std::hint::spin_loop();
            }
            Action::Continue as u32
        } else {
            Action::Remove as u32
        }
    }
    let id = unsafe { probert::attach(addr!(t_push_rbp), h, std::ptr::null_mut()) }.unwrap();
    let b = std::thread::spawn(|| unsafe { t_push_rbp(1) });
    while !IN_B.load(Ordering::SeqCst) {
        std::hint::spin_loop();
    }
    assert_eq!(unsafe { t_push_rbp(1) }, 2, "this call returns Remove");
    let d = std::thread::spawn(move || {
        let r = detach(id);
        (r, RELEASE.load(Ordering::SeqCst))
    });
    // Give a wrong `detach` time to return early; a right one waits anyway.
    std::thread::sleep(std::time::Duration::from_millis(50));
    RELEASE.store(true, Ordering::SeqCst);
    assert_eq!(b.join().unwrap(), 2);
    let (r, released) = d.join().unwrap();
    assert_eq!(r, Err(Error::NotFound));
    assert!(released, "detach returned while a call was still running");
}

isolated!(detach_of_a_removed_consumer_waits_for_its_running_calls, {
    removed_consumer_waits_for_its_running_calls(probert::detach);
});

isolated!(
    detach_batch_holding_a_removed_consumer_waits_for_its_running_calls,
    {
        static OTHER: AtomicU64 = AtomicU64::new(0);
        static OTHER_ID: std::sync::OnceLock<ConsumerId> = std::sync::OnceLock::new();
        // A valid handle beside the stale one: all or nothing, so it stays
        // attached (and counts the calls below).
        let other = unsafe { probert::attach(addr!(t_sub_rsp), count, counter(&OTHER)) }.unwrap();
        OTHER_ID.set(other).unwrap();
        removed_consumer_waits_for_its_running_calls(|id| {
            probert::detach_batch(&[*OTHER_ID.get().unwrap(), id])
        });
        assert_eq!(unsafe { t_sub_rsp(1) }, 6);
        assert_eq!(
            OTHER.load(Ordering::SeqCst),
            1,
            "the valid handle stayed attached"
        );
        probert::detach(other).unwrap();
    }
);

isolated!(recursion_is_counted_as_missed, {
    unsafe extern "C" fn recurse(hit: *mut Hit) -> u32 {
        // Calls the probed function from inside the handler.
        let r = unsafe { targets::t_push_rbp(5) };
        assert_eq!(r, 6);
        let _ = hit;
        Action::Continue as u32
    }
    let id = unsafe { probert::attach(addr!(t_push_rbp), recurse, std::ptr::null_mut()) }.unwrap();
    for _ in 0..3 {
        assert_eq!(unsafe { t_push_rbp(1) }, 2);
    }
    let s = probert::stats(id).unwrap();
    assert_eq!((s.hits, s.missed), (3, 3));
    probert::detach(id).unwrap();
});

isolated!(foreign_int3_is_chained_to_the_previous_handler, {
    static CHAINED: AtomicU64 = AtomicU64::new(0);
    extern "C" fn previous(_: i32, _: *mut libc::siginfo_t, _: *mut std::ffi::c_void) {
        CHAINED.fetch_add(1, Ordering::SeqCst);
    }
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = previous as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        assert_eq!(
            libc::sigaction(libc::SIGTRAP, &act, std::ptr::null_mut()),
            0
        );
    }
    assert_eq!(unsafe { t_foreign(1) }, 8);
    assert_eq!(CHAINED.load(Ordering::SeqCst), 1);
    probert::init().unwrap();
    // A probe elsewhere, so probert's handler is really in the path.
    static HITS: AtomicU64 = AtomicU64::new(0);
    let id = unsafe { probert::attach(addr!(t_push_rbp), count, counter(&HITS)) }.unwrap();
    assert_eq!(unsafe { t_foreign(1) }, 8);
    assert_eq!(unsafe { t_push_rbp(1) }, 2);
    assert_eq!(CHAINED.load(Ordering::SeqCst), 2);
    assert_eq!(HITS.load(Ordering::SeqCst), 1);
    // The foreign int3 itself cannot be probed.
    let err = unsafe { probert::attach(addr!(t_foreign), count, counter(&HITS)) }.unwrap_err();
    assert_eq!(
        err,
        Error::Conflict {
            addr: addr!(t_foreign)
        }
    );
    probert::detach(id).unwrap();
});

isolated!(foreign_int3_with_default_action_still_kills, {
    // In a child: with SIG_DFL before probert, a foreign int3 must still
    // terminate the process with SIGTRAP, as it would without probert.
    probert::init().unwrap();
    match unsafe { libc::fork() } {
        0 => {
            unsafe { t_foreign(1) };
            unsafe { libc::_exit(0) };
        }
        pid => {
            let mut status = 0;
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            assert!(libc::WIFSIGNALED(status), "status {status:#x}");
            assert_eq!(libc::WTERMSIG(status), libc::SIGTRAP);
        }
    }
});

isolated!(mid_instruction_is_refused, {
    static HITS: AtomicU64 = AtomicU64::new(0);
    let f = addr!(t_push_rbp);
    // push rbp (1) | mov rbp, rsp (3) | lea rax, [rdi + 1] (4)
    for off in [2usize, 3, 5, 6] {
        let err = unsafe { probert::attach(f + off, count, counter(&HITS)) }.unwrap_err();
        assert_eq!(
            err,
            Error::Misaligned {
                addr: f + off,
                func: f
            },
            "offset {off}"
        );
    }
    assert_eq!(bytes(f, 9), {
        // Nothing was written.
        let mut v = bytes(f, 9);
        v.truncate(9);
        v
    });
    assert_eq!(probert::probe_count(), 0);
    // The boundaries themselves are fine.
    for off in [0usize, 1, 4] {
        let id = unsafe { probert::attach(f + off, count, counter(&HITS)) }.unwrap();
        probert::detach(id).unwrap();
    }
});

isolated!(bad_input, {
    static HITS: AtomicU64 = AtomicU64::new(0);
    let err = unsafe { probert::attach(0, count, counter(&HITS)) }.unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    let heap = Box::into_raw(Box::new([0x90u8; 64])) as usize;
    let err = unsafe { probert::attach(heap, count, counter(&HITS)) }.unwrap_err();
    assert_eq!(err, Error::NoRegion { addr: heap });
    assert_eq!(probert::detach(ConsumerId(0)), Err(Error::NotFound));
    assert_eq!(probert::detach(ConsumerId(12345)), Err(Error::NotFound));
    assert_eq!(probert::detach(ConsumerId(u64::MAX)), Err(Error::NotFound));
    assert_eq!(probert::stats(ConsumerId(7)), Err(Error::NotFound));
    let id = unsafe { probert::attach(addr!(t_endbr), count, counter(&HITS)) }.unwrap();
    probert::detach(id).unwrap();
    assert_eq!(probert::detach(id), Err(Error::NotFound), "twice");
    assert_eq!(probert::detach_nosync(id), Err(Error::NotFound));
    // A handle reused by a new consumer keeps the old one stale.
    let id2 = unsafe { probert::attach(addr!(t_endbr), count, counter(&HITS)) }.unwrap();
    assert_ne!(id, id2);
    assert_eq!(probert::detach(id), Err(Error::NotFound));
    probert::detach(id2).unwrap();
    // probert's own code is refused.
    let own = probert::sync as *const () as usize;
    let err = unsafe { probert::attach(own, count, counter(&HITS)) }.unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
});

isolated!(attach_batch_is_all_or_nothing, {
    static HITS: AtomicU64 = AtomicU64::new(0);
    let good = probert::AttachReq {
        addr: addr!(t_push_rbp),
        handler: count,
        user_data: counter(&HITS),
    };
    let bad = probert::AttachReq {
        addr: addr!(t_push_rbp) + 2,
        ..good
    };
    let before = bytes(addr!(t_push_rbp), 8);
    let (i, err) = probert::attach_batch(&[good, good, bad]).unwrap_err();
    assert_eq!(i, 2);
    assert!(matches!(err, Error::Misaligned { .. }));
    assert_eq!(bytes(addr!(t_push_rbp), 8), before);
    assert_eq!(probert::probe_count(), 0);
    let other = probert::AttachReq {
        addr: addr!(t_endbr),
        ..good
    };
    let ids = probert::attach_batch(&[good, other, good]).unwrap();
    assert_eq!(ids.len(), 3);
    unsafe { t_push_rbp(1) };
    unsafe { t_endbr(1) };
    assert_eq!(HITS.load(Ordering::SeqCst), 3);
    assert_eq!(
        probert::detach_batch(&[ids[0], ids[0]]),
        Err(Error::InvalidArgument(
            "a handle appears twice in the batch".into()
        ))
    );
    assert_eq!(
        probert::probe_count(),
        2,
        "a failed batch detach changes nothing"
    );
    probert::detach_batch(&ids).unwrap();
    assert_eq!(probert::probe_count(), 0);
    assert_eq!(bytes(addr!(t_push_rbp), 8), before);
});

isolated!(detach_waits_for_a_running_handler, {
    static IN: AtomicBool = AtomicBool::new(false);
    static RELEASE: AtomicBool = AtomicBool::new(false);
    static FINISHED: AtomicBool = AtomicBool::new(false);
    unsafe extern "C" fn slow(_: *mut Hit) -> u32 {
        IN.store(true, Ordering::SeqCst);
        while !RELEASE.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
        FINISHED.store(true, Ordering::SeqCst);
        Action::Continue as u32
    }
    let id = unsafe { probert::attach(addr!(t_push_rbp), slow, std::ptr::null_mut()) }.unwrap();
    let hitter = std::thread::spawn(|| unsafe { t_push_rbp(1) });
    while !IN.load(Ordering::SeqCst) {
        std::hint::spin_loop();
    }
    let releaser = std::thread::spawn(|| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        RELEASE.store(true, Ordering::SeqCst);
    });
    probert::detach(id).unwrap();
    assert!(
        FINISHED.load(Ordering::SeqCst),
        "detach returned while the handler ran"
    );
    assert_eq!(hitter.join().unwrap(), 2);
    releaser.join().unwrap();
});

isolated!(handlers_change_only_status_flags, {
    // Setting TF (a system flag) from a handler must not turn on single-step
    // tracing (which would deliver a trap the process does not expect); CF
    // (a status flag) does take effect.
    unsafe extern "C" fn set_flags(hit: *mut Hit) -> u32 {
        let hit = unsafe { &mut *hit };
        hit.regs_mut().rflags |= 0x100 | 0x1;
        Action::Continue as u32
    }
    // `t_riprel_cmp` returns 1 when rdi >= t_data, computed by `jae` from the
    // flags of its cmp; probing the `jae` (after the cmp) with CF forced set
    // makes it not taken.
    let jae = addr!(t_riprel_cmp) + 7;
    let id =
        unsafe { probert::attach_ex(jae, set_flags, std::ptr::null_mut(), Mode::Trap) }.unwrap();
    assert_eq!(
        unsafe { t_riprel_cmp(2000) },
        0,
        "CF set by the handler took effect"
    );
    assert_eq!(unsafe { t_riprel_cmp(2000) }, 0);
    probert::detach(id).unwrap();
    assert_eq!(unsafe { t_riprel_cmp(2000) }, 1);
});

isolated!(
    control_calls_from_a_handler_are_refused_and_change_nothing,
    {
        static ID: AtomicU64 = AtomicU64::new(0);
        static RESULT: AtomicUsize = AtomicUsize::new(0);
        unsafe extern "C" fn h(_: *mut Hit) -> u32 {
            let r = probert::detach(ConsumerId(ID.load(Ordering::SeqCst)));
            RESULT.store(
                if matches!(r, Err(Error::InvalidArgument(_))) {
                    1
                } else {
                    2
                },
                Ordering::SeqCst,
            );
            Action::Continue as u32
        }
        let id = unsafe { probert::attach(addr!(t_push_rbp), h, std::ptr::null_mut()) }.unwrap();
        ID.store(id.0, Ordering::SeqCst);
        unsafe { t_push_rbp(1) };
        assert_eq!(RESULT.load(Ordering::SeqCst), 1);
        // Still attached: the refused detach changed nothing.
        assert_eq!(probert::stats(id).unwrap().hits, 1);
        probert::detach(id).unwrap();
    }
);

isolated!(a_stub_is_not_reused_while_a_thread_is_inside_it, {
    // A thread blocked in a probed `syscall` sits inside its out-of-line
    // stub. Detaching retires the stub; recycling must keep it (the thread
    // scan sees the thread inside) until the thread has left. A stub reused
    // early would be poisoned with ud2 and crash the thread.
    static HITS: AtomicU64 = AtomicU64::new(0);
    let mut fds = [0i32; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // On the trap path (the `syscall; ret` and the alignment after it could
    // be displaced by a jump): its out-of-line stub is what this is about.
    let id =
        unsafe { probert::attach_ex(addr!(t_read_syscall), count, counter(&HITS), Mode::Trap) }
            .unwrap();
    assert_eq!(probert::probe_mode(addr!(t_read_syscall)), Ok(Mode::Trap));
    let reader = std::thread::spawn(move || {
        let mut byte = 0u8;
        let n = unsafe { t_read_byte(fds[0], &mut byte) };
        (n, byte)
    });
    // Wait until the reader has trapped (and so is in, or entering, the stub).
    while HITS.load(Ordering::SeqCst) == 0 {
        std::thread::yield_now();
    }
    probert::detach(id).unwrap();
    probert::recycle_stubs().unwrap();
    let (pending, retiring) = probert::retired_stubs();
    assert_eq!(
        pending + retiring,
        1,
        "the stub the reader is in stays retired"
    );
    assert_eq!(unsafe { libc::write(fds[1], b"x".as_ptr().cast(), 1) }, 1);
    assert_eq!(
        reader.join().unwrap(),
        (1, b'x'),
        "the reader left the stub intact"
    );
    probert::recycle_stubs().unwrap();
    assert_eq!(
        probert::retired_stubs(),
        (0, 0),
        "reusable once the reader left"
    );
});

isolated!(sync_from_a_handler_is_refused, {
    static RESULT: AtomicUsize = AtomicUsize::new(0);
    unsafe extern "C" fn h(_: *mut Hit) -> u32 {
        let r = probert::sync();
        RESULT.store(
            if matches!(r, Err(Error::InvalidArgument(_))) {
                1
            } else {
                2
            },
            Ordering::SeqCst,
        );
        Action::Continue as u32
    }
    let id = unsafe { probert::attach(addr!(t_push_rbp), h, std::ptr::null_mut()) }.unwrap();
    unsafe { t_push_rbp(1) };
    assert_eq!(RESULT.load(Ordering::SeqCst), 1);
    probert::detach(id).unwrap();
});

isolated!(probes_work_in_a_forked_child, {
    static HITS: AtomicU64 = AtomicU64::new(0);
    let original = bytes(addr!(t_push_rbp), 8);
    let id = unsafe { probert::attach(addr!(t_push_rbp), count, counter(&HITS)) }.unwrap();
    unsafe { t_push_rbp(1) };
    let probed = bytes(addr!(t_push_rbp), 8);
    assert_ne!(probed, original);
    let before = bytes(addr!(t_riprel_mov), 8);
    match unsafe { libc::fork() } {
        0 => {
            let ok = (|| {
                unsafe { t_push_rbp(1) };
                if HITS.load(Ordering::SeqCst) != 2 {
                    return None;
                }
                // New probes and detaches work in the child, and write the
                // child's memory, not the parent's.
                let id2 =
                    unsafe { probert::attach(addr!(t_riprel_mov), count, counter(&HITS)) }.ok()?;
                unsafe { t_riprel_mov(1) };
                probert::detach(id2).ok()?;
                probert::detach(id).ok()?;
                Some(HITS.load(Ordering::SeqCst) == 3 && bytes(addr!(t_push_rbp), 8) == original)
            })()
            .unwrap_or(false);
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        pid => common::expect_child_success(pid),
    }
    // The parent is untouched by the child's writes.
    assert_eq!(bytes(addr!(t_push_rbp), 8), probed);
    assert_eq!(bytes(addr!(t_riprel_mov), 8), before);
    unsafe { t_push_rbp(1) };
    assert_eq!(HITS.load(Ordering::SeqCst), 2);
    probert::detach(id).unwrap();
});

isolated!(no_writable_executable_mapping_is_left, {
    static HITS: AtomicU64 = AtomicU64::new(0);
    let addrs = [
        addr!(t_push_rbp),
        addr!(t_riprel_mov),
        addr!(t_sub_rsp),
        addr!(t_lock),
    ];
    let ids: Vec<_> = addrs
        .iter()
        .map(|&a| unsafe { probert::attach(a, count, counter(&HITS)) }.unwrap())
        .collect();
    assert_eq!(common::has_wx_mapping(), None);
    probert::detach_batch(&ids).unwrap();
    probert::recycle_stubs().unwrap();
    assert_eq!(common::has_wx_mapping(), None);
});

isolated!(hammering_threads_get_exact_counts_while_others_churn, {
    // Each hammer makes at least CALLS calls and keeps going until the churn
    // thread has completed MIN_CYCLES cycles, so the churn overlaps the
    // hammering however fast either side runs on this machine.
    const CALLS: u64 = 200_000;
    const MIN_CYCLES: u64 = 50;
    static STEADY: AtomicU64 = AtomicU64::new(0);
    static CHURN: AtomicU64 = AtomicU64::new(0);
    static CYCLES: AtomicU64 = AtomicU64::new(0);
    static STOP: AtomicBool = AtomicBool::new(false);
    let steady = unsafe { probert::attach(addr!(t_push_rbp), count, counter(&STEADY)) }.unwrap();
    let hammer = |f: unsafe extern "C" fn(u64) -> u64, k: u64| {
        std::thread::spawn(move || {
            let mut i = 0u64;
            while i < CALLS || CYCLES.load(Ordering::SeqCst) < MIN_CYCLES {
                assert_eq!(unsafe { f(i) }, i + k);
                i += 1;
            }
            i
        })
    };
    let h1 = hammer(t_push_rbp, 1);
    let h2 = hammer(t_push_rbp, 1);
    let h3 = hammer(t_riprel_mov, 1000);
    let churn = std::thread::spawn(|| {
        while !STOP.load(Ordering::SeqCst) {
            let a = unsafe { probert::attach(addr!(t_push_rbp), count, counter(&CHURN)) }.unwrap();
            let b =
                unsafe { probert::attach(addr!(t_riprel_mov), count, counter(&CHURN)) }.unwrap();
            probert::detach_nosync(a).unwrap();
            probert::detach_batch(&[b]).unwrap();
            CYCLES.fetch_add(1, Ordering::SeqCst);
        }
    });
    let calls = h1.join().unwrap() + h2.join().unwrap();
    h3.join().unwrap();
    STOP.store(true, Ordering::SeqCst);
    churn.join().unwrap();
    let cycles = CYCLES.load(Ordering::SeqCst);
    assert!(cycles >= MIN_CYCLES);
    assert_eq!(
        STEADY.load(Ordering::SeqCst),
        calls,
        "exactly once per call"
    );
    assert_eq!(probert::stats(steady).unwrap().hits, calls);
    probert::detach(steady).unwrap();
    assert_eq!(probert::probe_count(), 0);
    eprintln!(
        "calls: {calls}, churn cycles: {cycles}, churn hits: {}",
        CHURN.load(Ordering::SeqCst)
    );
});

isolated!(functions_probert_handlers_may_call_are_refused, {
    // memcpy & co. are what compiled code calls for a copy; probert's own
    // handlers are compiled code. A probe there would trap inside the
    // handler serving it (in a debug build, at once). Their resolved
    // implementations are refused, at the entry and inside, and so is a
    // return probe whose function tail-jumps into them.
    static HITS: AtomicU64 = AtomicU64::new(0);
    for name in [c"memcpy", c"memset", c"memmove"] {
        let f = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) } as usize;
        assert_ne!(f, 0);
        let before = bytes(f, 8);
        for at in [f, f + 4] {
            match unsafe { probert::attach(at, count, counter(&HITS)) } {
                Err(Error::InvalidArgument(why)) => {
                    assert!(why.contains("handlers may call"), "{name:?}: {why}")
                }
                other => panic!("{name:?} at {at:#x}: {other:?}"),
            }
        }
        assert_eq!(bytes(f, 8), before, "nothing written");
    }
    // The handlers still run, copying as they like.
    let id = unsafe { probert::attach(t_push_rbp as *const () as usize, count, counter(&HITS)) }
        .unwrap();
    assert_eq!(unsafe { t_push_rbp(1) }, 2);
    assert_eq!(HITS.load(Ordering::SeqCst), 1);
    probert::detach(id).unwrap();
});
