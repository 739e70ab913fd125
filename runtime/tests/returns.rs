//! Return probes: entry and return hits paired per invocation — the
//! contract of API.md, "Additions of version 0.2", on code of exact shape
//! (assembly below), on JIT code and on real libraries nobody here wrote.
//! Abandonment by `longjmp`, C++ exceptions and thread exit, and the
//! unwinder checks, are in the C tests (`tests/c/test_returns.c`,
//! `tests/c/test_returns_cxx.cpp`).
#![allow(unsafe_code)]
#![allow(clippy::undocumented_unsafe_blocks)]

mod common;

use std::arch::global_asm;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use probert::{Action, AttachOptions, Error, Hit, Mode, Reg, RegionDesc};

#[inline(never)]
#[no_mangle]
extern "C" fn r_square(x: u64) -> u64 {
    std::hint::black_box(x) * x
}

global_asm!(
    r#"
    .text
    .macro FUNC name
    .p2align 4
    .globl \name
    .type \name,@function
\name:
    .endm
    .macro END name
    .size \name, .-\name
    .endm

    FUNC rt_leaf             // rdi + 100
    lea rax, [rdi + 100]
    ret
    END rt_leaf

    FUNC rt_tail             // rt_leaf(rdi + 1), a tail call → rdi + 101
    lea rdi, [rdi + 1]
    jmp rt_leaf
    END rt_tail

    FUNC rt_rec              // n == 0 ? 0 : rt_rec(n - 1) + 1 → n; two rets
    push rbx
    mov rbx, rdi
    test rdi, rdi
    jz 1f
    lea rdi, [rdi - 1]
    call rt_rec
    add rax, 1
    pop rbx
    ret
1:  xor eax, eax
    pop rbx
    ret
    END rt_rec

    FUNC rt_outer            // rt_leaf(x) + rt_tail(x) → 2x + 201
    push rbx
    push r12
    sub rsp, 8
    mov rbx, rdi
    call rt_leaf
    mov r12, rax
    mov rdi, rbx
    call rt_tail
    add rax, r12
    add rsp, 8
    pop r12
    pop rbx
    ret
    END rt_outer

    FUNC rt_selftail         // n == 0 ? 42 : rt_selftail(n - 1), a tail call to its own entry
    test rdi, rdi
    jz 1f
    lea rdi, [rdi - 1]
    jmp rt_selftail
1:  mov eax, 42
    ret
    END rt_selftail

    FUNC rt_small            // rdi + 7, in 10 bytes: the entry's run reaches the ret
    push rbp
    mov rbp, rsp
    lea rax, [rdi + 7]
    pop rbp
    ret
    END rt_small

    FUNC rt_split            // rdi + 5: jumps out to its cold part, which jumps back in
    jmp rt_split_cold
2:  lea rax, [rdi + 5]
    ret
    END rt_split

    FUNC rt_split_cold
    jmp 2b
    END rt_split_cold

    FUNC rt_endbr_ret        // endbr64; ret: its entry's jump and its ret are one address
    endbr64
    ret
    END rt_endbr_ret

    FUNC rt_call             // rt_call(f, x) = f(x) + 1
    sub rsp, 8
    mov rax, rdi
    mov rdi, rsi
    call rax
    add rsp, 8
    add rax, 1
    ret
    END rt_call

    FUNC rt_nest             // rt_nest(n, cb) = n == 0 ? cb(0) : rt_nest(n - 1, cb) + 1
    push rbx
    test rdi, rdi
    jz 1f
    lea rdi, [rdi - 1]
    call rt_nest
    add rax, 1
    pop rbx
    ret
1:  call rsi
    pop rbx
    ret
    END rt_nest
"#
);

extern "C" {
    fn rt_leaf(x: u64) -> u64;
    fn rt_tail(x: u64) -> u64;
    fn rt_rec(n: u64) -> u64;
    fn rt_outer(x: u64) -> u64;
    fn rt_selftail(n: u64) -> u64;
    fn rt_small(x: u64) -> u64;
    fn rt_split(x: u64) -> u64;
    fn rt_endbr_ret(x: u64) -> u64;
    fn rt_call(f: extern "C" fn(u64) -> u64, x: u64) -> u64;
    fn rt_nest(n: u64, cb: extern "C" fn(u64) -> u64) -> u64;
}

fn addr(f: unsafe extern "C" fn(u64) -> u64) -> usize {
    f as usize
}

/// What a pair of handlers checks and counts for one probed function: the
/// entry stores the first argument in the session, the return checks the
/// value returned against `expect(argument)`.
struct Spec {
    expect: fn(u64) -> u64,
    entries: AtomicU64,
    returns: AtomicU64,
    /// Return hits whose value, session, RIP or RSP was wrong.
    bad: AtomicU64,
    /// Set by the test once `detach`/`sync` returned.
    detached: AtomicBool,
    /// Handler calls that started after `detached` was set.
    late: AtomicU64,
    /// If not zero: the return handler writes this into RAX.
    rewrite: AtomicU64,
}

impl Spec {
    const fn new(expect: fn(u64) -> u64) -> Spec {
        Spec {
            expect,
            entries: AtomicU64::new(0),
            returns: AtomicU64::new(0),
            bad: AtomicU64::new(0),
            detached: AtomicBool::new(false),
            late: AtomicU64::new(0),
            rewrite: AtomicU64::new(0),
        }
    }

    fn reset(&self) {
        for c in [&self.entries, &self.returns, &self.bad, &self.late] {
            c.store(0, Ordering::SeqCst);
        }
        self.detached.store(false, Ordering::SeqCst);
        self.rewrite.store(0, Ordering::SeqCst);
    }

    fn counts(&self) -> (u64, u64, u64, u64) {
        (
            self.entries.load(Ordering::SeqCst),
            self.returns.load(Ordering::SeqCst),
            self.bad.load(Ordering::SeqCst),
            self.late.load(Ordering::SeqCst),
        )
    }

    fn ud(&'static self) -> *mut std::ffi::c_void {
        self as *const Spec as *mut std::ffi::c_void
    }

    /// Attaches the pair to `f` with `mode`.
    fn attach(&'static self, f: usize, mode: Mode) -> probert::ConsumerId {
        unsafe {
            probert::attach_with(
                f,
                spec_entry,
                self.ud(),
                AttachOptions {
                    mode,
                    on_return: Some(spec_return),
                },
            )
        }
        .unwrap_or_else(|e| panic!("attach {f:#x} ({mode:?}): {e}"))
    }
}

unsafe extern "C" fn spec_entry(hit: *mut Hit) -> u32 {
    let hit = unsafe { &mut *hit };
    let spec = unsafe { &*(hit.user_data as *const Spec) };
    if spec.detached.load(Ordering::SeqCst) {
        spec.late.fetch_add(1, Ordering::SeqCst);
    }
    spec.entries.fetch_add(1, Ordering::SeqCst);
    let arg = hit.regs().arg(0).unwrap();
    match hit.session() {
        Some(s) if *s == 0 => *s = arg,
        _ => {
            spec.bad.fetch_add(1, Ordering::SeqCst);
        }
    }
    Action::Continue as u32
}

unsafe extern "C" fn spec_return(hit: *mut Hit) -> u32 {
    let hit = unsafe { &mut *hit };
    let spec = unsafe { &*(hit.user_data as *const Spec) };
    if spec.detached.load(Ordering::SeqCst) {
        spec.late.fetch_add(1, Ordering::SeqCst);
    }
    spec.returns.fetch_add(1, Ordering::SeqCst);
    let arg = hit.session().map_or(u64::MAX, |s| *s);
    let regs = hit.regs();
    // Just after the `ret`: the word below RSP is the return address, the
    // one RIP holds now.
    let popped = unsafe { std::ptr::read_volatile((regs.sp() - 8) as *const usize) };
    if !hit.is_return() || regs.get(Reg::Rax) != (spec.expect)(arg) || popped != regs.pc() {
        spec.bad.fetch_add(1, Ordering::SeqCst);
    }
    let w = spec.rewrite.load(Ordering::SeqCst);
    if w != 0 {
        hit.regs_mut().set(Reg::Rax, w);
    }
    Action::Continue as u32
}

fn plus100(x: u64) -> u64 {
    x + 100
}
fn plus101(x: u64) -> u64 {
    x + 101
}
fn ident(x: u64) -> u64 {
    x
}
fn outer(x: u64) -> u64 {
    2 * x + 201
}

static LEAF: Spec = Spec::new(plus100);
static TAIL: Spec = Spec::new(plus101);
static REC: Spec = Spec::new(ident);
static OUTER: Spec = Spec::new(outer);

const MODES: [Mode; 2] = [Mode::Trap, Mode::Auto];

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

isolated!(regs_after_return_and_a_rewritten_return_value, {
    for mode in MODES {
        LEAF.reset();
        let id = LEAF.attach(addr(rt_leaf), mode);
        assert_eq!(unsafe { rt_leaf(1) }, 101);
        // The return handler changes what the callers get, direct or
        // through a tail call.
        LEAF.rewrite.store(7777, Ordering::SeqCst);
        assert_eq!(unsafe { rt_leaf(1) }, 7777, "{mode:?}");
        assert_eq!(unsafe { rt_tail(1) }, 7777, "{mode:?}");
        assert_eq!(unsafe { rt_outer(1) }, 2 * 7777, "{mode:?}");
        assert_eq!(LEAF.counts(), (5, 5, 0, 0), "{mode:?}");
        let s = probert::stats(id).unwrap();
        assert_eq!((s.hits, s.returns, s.abandoned), (5, 5, 0));
        probert::detach(id).unwrap();
        LEAF.detached.store(true, Ordering::SeqCst);
        assert_eq!(unsafe { rt_outer(1) }, 203);
        assert_eq!(LEAF.counts(), (5, 5, 0, 0));
    }
});

static SPLIT: Spec = Spec::new(|x| x + 5);

isolated!(a_function_that_jumps_out_first_and_back_in_returns, {
    // `rt_split` begins with a jump to its cold part, which jumps back into
    // it: following that first jump alone must not mark `rt_split` itself
    // as decoded — its `ret` lies after the jump.
    for mode in MODES {
        SPLIT.reset();
        let id = SPLIT.attach(addr(rt_split), mode);
        for x in 0..100 {
            assert_eq!(unsafe { rt_split(x) }, x + 5);
        }
        assert_eq!(SPLIT.counts(), (100, 100, 0, 0), "{mode:?}");
        let s = probert::stats(id).unwrap();
        assert_eq!((s.hits, s.returns, s.abandoned), (100, 100, 0), "{mode:?}");
        probert::detach(id).unwrap();
    }
});

/// `f` is `endbr64; ret`, called by `call`: a return probe is refused in
/// each mode, nothing is left behind, and the entry alone counts every
/// call; a probe at the `ret` is refused beside it.
fn endbr_ret_refuses_returns(f: usize, call: fn()) {
    static N: AtomicU64 = AtomicU64::new(0);
    assert_eq!(common::bytes(f, 5), [0xf3, 0x0f, 0x1e, 0xfa, 0xc3]);
    let before = common::bytes(f, 16);
    let attach = |mode, on_return| unsafe {
        probert::attach_with(
            f,
            common::count,
            common::counter(&N),
            AttachOptions { mode, on_return },
        )
    };
    for mode in MODES {
        let e =
            attach(mode, Some(common::count)).expect_err("entry and return at one patch address");
        assert!(
            matches!(e, Error::UnsupportedInstruction { .. }) && e.to_string().contains("endbr64"),
            "{mode:?}: {e}"
        );
        assert_eq!(probert::probe_count(), 0, "{mode:?}");
        assert_eq!(common::bytes(f, 16), before, "{mode:?}");
        N.store(0, Ordering::SeqCst);
        let id = attach(mode, None).unwrap();
        for _ in 0..10 {
            call();
        }
        assert_eq!(N.load(Ordering::SeqCst), 10, "{mode:?}");
        // A probe of its own at the `ret` would patch the same byte.
        let e = unsafe { probert::attach(f + 4, common::count, common::counter(&N)) }
            .expect_err("the ret's probe and the entry's share a patch address");
        assert!(e.to_string().contains("endbr64"), "{e}");
        probert::detach(id).unwrap();
        assert_eq!(common::bytes(f, 16), before, "{mode:?}");
    }
}

isolated!(
    endbr64_then_ret_refuses_a_return_probe_and_keeps_its_entry,
    {
        // The probe of an `endbr64` entry goes after it: in `endbr64; ret` that
        // is the `ret`, where the return probe's exit would go too.
        endbr_ret_refuses_returns(addr(rt_endbr_ret), || unsafe {
            rt_endbr_ret(0);
        });
        // Real code of that shape: Debian's libatomic `atomic_signal_fence`.
        static FENCE: AtomicUsize = AtomicUsize::new(0);
        let Some(h) = dlopen("libatomic.so.1") else {
            eprintln!("no libatomic.so.1: the real-code half skipped");
            return;
        };
        let fence: usize = dlsym(h, "atomic_signal_fence");
        if common::bytes(fence, 5) != [0xf3, 0x0f, 0x1e, 0xfa, 0xc3] {
            eprintln!("atomic_signal_fence is not endbr64; ret here: the real-code half skipped");
            return;
        }
        FENCE.store(fence, Ordering::SeqCst);
        endbr_ret_refuses_returns(fence, || {
            let f: extern "C" fn(i32) =
                unsafe { std::mem::transmute(FENCE.load(Ordering::SeqCst)) };
            f(5);
        });
    }
);

static SMALL: Spec = Spec::new(|x| x + 7);

isolated!(a_small_function_returns_through_the_padding_after_it, {
    // The entry's run (`push rbp; mov rbp, rsp; lea`) ends where an exit
    // run before the `ret` would begin: the exit takes the padding after
    // the function instead, and its hits take no signal either.
    let f = addr(rt_small);
    let ret = f + 9;
    assert_eq!(common::bytes(ret, 1), [0xc3]);
    let before = common::bytes(f, 16);
    SMALL.reset();
    let id = SMALL.attach(f, Mode::Auto);
    assert_eq!(probert::probe_mode(f), Ok(Mode::Fast));
    assert_eq!(
        probert::probe_mode(ret),
        Ok(Mode::Fast),
        "the exit: {:?}",
        probert::fast_refusal(ret)
    );
    for x in 0..100 {
        assert_eq!(unsafe { rt_small(x) }, x + 7);
    }
    assert_eq!(SMALL.counts(), (100, 100, 0, 0));
    let s = probert::stats(id).unwrap();
    assert_eq!((s.hits, s.returns, s.abandoned), (100, 100, 0));
    // A rewrite by the return handler is what the caller gets.
    SMALL.rewrite.store(3, Ordering::SeqCst);
    assert_eq!(unsafe { rt_small(1) }, 3);
    SMALL.rewrite.store(0, Ordering::SeqCst);
    probert::detach(id).unwrap();
    SMALL.detached.store(true, Ordering::SeqCst);
    assert_eq!(common::bytes(f, 16), before, "the padding is restored too");
    assert_eq!(unsafe { rt_small(1) }, 8);
    assert_eq!(SMALL.counts().3, 0);
});

isolated!(a_tail_call_returns_when_its_callee_returns, {
    for mode in MODES {
        TAIL.reset();
        LEAF.reset();
        // The tail-calling function alone.
        let t = TAIL.attach(addr(rt_tail), mode);
        for x in 0..50 {
            assert_eq!(unsafe { rt_tail(x) }, x + 101);
        }
        assert_eq!(TAIL.counts(), (50, 50, 0, 0), "{mode:?}");
        // Both: one `ret` ends two invocations, innermost first, each
        // with the value the caller receives.
        let l = LEAF.attach(addr(rt_leaf), mode);
        for x in 0..50 {
            assert_eq!(unsafe { rt_tail(x) }, x + 101);
            assert_eq!(unsafe { rt_outer(x) }, 2 * x + 201);
        }
        assert_eq!(TAIL.counts(), (150, 150, 0, 0), "{mode:?}");
        assert_eq!(LEAF.counts(), (150, 150, 0, 0), "{mode:?}");
        // A rewrite by the inner return handler is what the outer one sees.
        LEAF.rewrite.store(5, Ordering::SeqCst);
        let before = TAIL.counts();
        assert_eq!(unsafe { rt_tail(10) }, 5);
        assert_eq!(TAIL.counts().2, before.2 + 1, "the tail's handler saw 5");
        probert::detach_batch(&[t, l]).unwrap();
        assert_eq!(probert::stats(t), Err(Error::NotFound));
        assert_eq!(unsafe { rt_tail(1) }, 102);
        assert_eq!(TAIL.counts().0, 151);
    }
});

// A function that tail-jumps to its own entry (libsqlite3's
// sqlite3WhereSplit does) leaves a frame at the same stack pointer and
// return address as the new invocation, as one left by `longjmp` and
// entered again from the same call would: the exit analysis tells them
// apart, and each invocation of the chain returns when the last one does,
// innermost first, with the value the caller receives (API.md).
isolated!(a_tail_call_to_its_own_entry_returns_once_per_invocation, {
    static SELF: Spec = Spec::new(|_| 42);
    // A second consumer of the same function: the arguments its returns
    // see, in order.
    static ORDER: [AtomicU64; 128] = [const { AtomicU64::new(u64::MAX) }; 128];
    static SEEN: AtomicUsize = AtomicUsize::new(0);
    for mode in MODES {
        SELF.reset();
        SEEN.store(0, Ordering::SeqCst);
        let id = SELF.attach(addr(rt_selftail), mode);
        assert_eq!(unsafe { rt_selftail(5) }, 42);
        let s = probert::stats(id).unwrap();
        assert_eq!(
            (s.hits, s.returns, s.abandoned),
            (6, 6, 0),
            "{mode:?}: {s:?}"
        );
        assert_eq!(SELF.counts(), (6, 6, 0, 0), "{mode:?}");
        let order = unsafe {
            probert::probe_returns(
                addr(rt_selftail),
                |hit, n: &mut u64| {
                    *n = hit.regs().arg(0).unwrap();
                    Action::Continue
                },
                |_, n: &mut u64| {
                    let k = SEEN.fetch_add(1, Ordering::SeqCst);
                    if let Some(o) = ORDER.get(k) {
                        o.store(*n, Ordering::SeqCst);
                    }
                    Action::Continue
                },
            )
        }
        .unwrap();
        // Longer than any fixed batch of returns: 101 invocations, one
        // `ret`.
        assert_eq!(unsafe { rt_selftail(100) }, 42);
        assert_eq!(SELF.counts(), (107, 107, 0, 0), "{mode:?}");
        assert_eq!(SEEN.load(Ordering::SeqCst), 101, "{mode:?}");
        let got: Vec<u64> = ORDER[..101]
            .iter()
            .map(|o| o.load(Ordering::SeqCst))
            .collect();
        assert_eq!(
            got,
            (0..=100).collect::<Vec<u64>>(),
            "{mode:?}: innermost first"
        );
        let o = order.stats().unwrap();
        assert_eq!((o.hits, o.returns, o.abandoned), (101, 101, 0), "{mode:?}");
        // Rewriting the value: every invocation of the chain returns it.
        SELF.rewrite.store(9, Ordering::SeqCst);
        assert_eq!(unsafe { rt_selftail(3) }, 9, "{mode:?}");
        SELF.rewrite.store(0, Ordering::SeqCst);
        order.detach().unwrap();
        probert::detach(id).unwrap();
        SELF.detached.store(true, Ordering::SeqCst);
        assert_eq!(unsafe { rt_selftail(3) }, 42);
        assert_eq!(SELF.counts().3, 0, "{mode:?}: no call after detach");
    }
});

// Two consumers with return handlers on one function: one entry hit pushes
// a frame for each, at the same place, and neither takes the other's for
// an abandoned invocation.
isolated!(two_consumers_of_one_function_each_get_every_return, {
    static OTHER: Spec = Spec::new(plus100);
    for mode in MODES {
        LEAF.reset();
        OTHER.reset();
        let a = LEAF.attach(addr(rt_leaf), mode);
        let b = OTHER.attach(addr(rt_leaf), mode);
        for x in 0..20 {
            assert_eq!(unsafe { rt_leaf(x) }, x + 100);
            assert_eq!(unsafe { rt_tail(x) }, x + 101);
        }
        for (id, spec) in [(a, &LEAF), (b, &OTHER)] {
            let s = probert::stats(id).unwrap();
            assert_eq!(
                (s.hits, s.returns, s.abandoned),
                (40, 40, 0),
                "{mode:?}: {s:?}"
            );
            assert_eq!(spec.counts().0, 40, "{mode:?}");
        }
        probert::detach_batch(&[a, b]).unwrap();
    }
});

isolated!(recursion_ten_thousand_deep_pairs_every_invocation, {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static ORDER_BAD: AtomicU64 = AtomicU64::new(0);
    for mode in MODES {
        NEXT.store(0, Ordering::SeqCst);
        // Return hits come innermost first: n = 0, 1, 2, …
        let p = unsafe {
            probert::probe_returns(
                addr(rt_rec),
                |hit, n: &mut u64| {
                    *n = hit.regs().arg(0).unwrap();
                    Action::Continue
                },
                |hit, n: &mut u64| {
                    let want = NEXT.fetch_add(1, Ordering::SeqCst);
                    if *n != want || hit.regs().get(Reg::Rax) != want {
                        ORDER_BAD.fetch_add(1, Ordering::SeqCst);
                    }
                    Action::Continue
                },
            )
        }
        .unwrap();
        assert_eq!(unsafe { rt_rec(10_000) }, 10_000);
        assert_eq!(NEXT.load(Ordering::SeqCst), 10_001);
        assert_eq!(ORDER_BAD.load(Ordering::SeqCst), 0);
        let s = p.stats().unwrap();
        assert_eq!((s.hits, s.returns, s.abandoned), (10_001, 10_001, 0));
        p.detach().unwrap();
        // The same with the checking pair, in either mode.
        REC.reset();
        let id = REC.attach(addr(rt_rec), mode);
        assert_eq!(unsafe { rt_rec(10_000) }, 10_000);
        assert_eq!(REC.counts(), (10_001, 10_001, 0, 0), "{mode:?}");
        probert::detach(id).unwrap();
    }
});

isolated!(deeper_than_the_shadow_stack_counts_the_rest_abandoned, {
    REC.reset();
    let id = REC.attach(addr(rt_rec), Mode::Auto);
    // 300,000 frames of 16 bytes: a thread with a big stack.
    let depth = 300_000u64;
    let r = std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(move || unsafe { rt_rec(depth) })
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(r, depth);
    probert::sync().unwrap();
    let s = probert::stats(id).unwrap();
    assert_eq!(s.hits, depth + 1);
    assert_eq!(s.hits, s.returns + s.abandoned, "{s:?}");
    assert!(s.returns >= 100_000, "{s:?}");
    assert!(s.abandoned > 0, "{s:?}");
    let (e, r, bad, _) = REC.counts();
    assert_eq!((e, r, bad), (s.hits, s.returns, 0));
    probert::detach(id).unwrap();
});

isolated!(nested_probed_functions_on_four_threads_pair_exactly, {
    const THREADS: u64 = 4;
    const CALLS: u64 = 20_000;
    for mode in MODES {
        for s in [&LEAF, &TAIL, &OUTER, &REC] {
            s.reset();
        }
        let ids = [
            LEAF.attach(addr(rt_leaf), mode),
            TAIL.attach(addr(rt_tail), mode),
            OUTER.attach(addr(rt_outer), mode),
            REC.attach(addr(rt_rec), mode),
        ];
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                std::thread::spawn(move || {
                    for i in 0..CALLS {
                        let x = t * 1_000_000 + i;
                        assert_eq!(unsafe { rt_outer(x) }, 2 * x + 201);
                        assert_eq!(unsafe { rt_rec(i % 8) }, i % 8);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let n = THREADS * CALLS;
        let rec_calls: u64 = THREADS * (0..CALLS).map(|i| i % 8 + 1).sum::<u64>();
        assert_eq!(OUTER.counts(), (n, n, 0, 0), "{mode:?}");
        assert_eq!(TAIL.counts(), (n, n, 0, 0), "{mode:?}");
        assert_eq!(LEAF.counts(), (2 * n, 2 * n, 0, 0), "{mode:?}");
        assert_eq!(REC.counts(), (rec_calls, rec_calls, 0, 0), "{mode:?}");
        for id in ids {
            let s = probert::stats(id).unwrap();
            assert_eq!(s.hits, s.returns, "{mode:?} {s:?}");
            assert_eq!((s.missed, s.abandoned), (0, 0), "{mode:?} {s:?}");
        }
        probert::detach_batch(&ids).unwrap();
    }
});

isolated!(no_return_and_remove_from_either_handler, {
    static E: AtomicU64 = AtomicU64::new(0);
    static R: AtomicU64 = AtomicU64::new(0);
    static ODD_RETURNS: AtomicU64 = AtomicU64::new(0);
    // NO_RETURN for odd arguments.
    let p = unsafe {
        probert::probe_returns(
            addr(rt_leaf),
            |hit, _: &mut u64| {
                E.fetch_add(1, Ordering::SeqCst);
                if hit.regs().arg(0).unwrap() % 2 == 1 {
                    Action::NoReturn
                } else {
                    Action::Continue
                }
            },
            |hit, _: &mut u64| {
                R.fetch_add(1, Ordering::SeqCst);
                if hit.regs().get(Reg::Rax) % 2 == 1 {
                    ODD_RETURNS.fetch_add(1, Ordering::SeqCst);
                }
                Action::Continue
            },
        )
    }
    .unwrap();
    for x in 0..100 {
        assert_eq!(unsafe { rt_leaf(x) }, x + 100);
    }
    assert_eq!(E.load(Ordering::SeqCst), 100);
    assert_eq!(R.load(Ordering::SeqCst), 50);
    assert_eq!(ODD_RETURNS.load(Ordering::SeqCst), 0);
    let s = p.stats().unwrap();
    assert_eq!((s.hits, s.returns, s.abandoned), (100, 50, 0));
    p.detach().unwrap();

    // Remove from the entry handler at the 5th call: that invocation gets
    // no return, and nothing more is called.
    E.store(0, Ordering::SeqCst);
    R.store(0, Ordering::SeqCst);
    let p = unsafe {
        probert::probe_returns(
            addr(rt_leaf),
            |_, _: &mut u64| {
                if E.fetch_add(1, Ordering::SeqCst) == 4 {
                    Action::Remove
                } else {
                    Action::Continue
                }
            },
            |_, _: &mut u64| {
                R.fetch_add(1, Ordering::SeqCst);
                Action::Continue
            },
        )
    }
    .unwrap();
    for x in 0..20 {
        assert_eq!(unsafe { rt_leaf(x) }, x + 100);
    }
    assert_eq!((E.load(Ordering::SeqCst), R.load(Ordering::SeqCst)), (5, 4));
    assert_eq!(p.stats(), Err(Error::NotFound));
    drop(p);

    // Remove from the return handler, at the innermost return of a
    // recursion: the outer invocations, still running, get no return.
    E.store(0, Ordering::SeqCst);
    R.store(0, Ordering::SeqCst);
    let p = unsafe {
        probert::probe_returns(
            addr(rt_rec),
            |_, _: &mut u64| {
                E.fetch_add(1, Ordering::SeqCst);
                Action::Continue
            },
            |_, _: &mut u64| {
                R.fetch_add(1, Ordering::SeqCst);
                Action::Remove
            },
        )
    }
    .unwrap();
    assert_eq!(unsafe { rt_rec(10) }, 10);
    assert_eq!(unsafe { rt_rec(10) }, 10);
    assert_eq!(
        (E.load(Ordering::SeqCst), R.load(Ordering::SeqCst)),
        (11, 1)
    );
    probert::sync().unwrap();
    assert_eq!(p.stats(), Err(Error::NotFound));
    assert_eq!(unsafe { rt_rec(3) }, 3);
    assert_eq!(
        (E.load(Ordering::SeqCst), R.load(Ordering::SeqCst)),
        (11, 1)
    );
});

/// A thread's alternate signal stack placed just *above* its own stack (the
/// case where "deeper" and "shallower" by address mean nothing).
fn alt_stack_above_this_thread() -> (usize, usize) {
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        assert_eq!(libc::pthread_getattr_np(libc::pthread_self(), &mut attr), 0);
        let (mut lo, mut len) = (std::ptr::null_mut(), 0usize);
        assert_eq!(libc::pthread_attr_getstack(&attr, &mut lo, &mut len), 0);
        libc::pthread_attr_destroy(&mut attr);
        let top = lo as usize + len;
        let size = 256 << 10;
        let want = top + (1 << 20);
        let p = libc::mmap(
            want as *mut _,
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        (p as usize, size)
    }
}

static IN_SIGNAL: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_usr1(_: libc::c_int) {
    // The probed functions again, while the interrupted code has return
    // probes pending.
    let ok = unsafe { rt_leaf(5) } == 105
        && unsafe { rt_outer(1) } == 203
        && unsafe { rt_call(plus1, 7) } == 9;
    IN_SIGNAL.fetch_add(if ok { 1 } else { 1000 }, Ordering::SeqCst);
}

extern "C" fn plus1(x: u64) -> u64 {
    x + 1
}

extern "C" fn raise_usr1(x: u64) -> u64 {
    unsafe { libc::raise(libc::SIGUSR1) };
    x * 10
}

static CALL: Spec = Spec::new(|x| x * 10 + 1);
static CALL_ANY: AtomicU64 = AtomicU64::new(0);

unsafe extern "C" fn call_entry(hit: *mut Hit) -> u32 {
    let hit = unsafe { &mut *hit };
    CALL.entries.fetch_add(1, Ordering::SeqCst);
    let x = hit.regs().arg(1).unwrap();
    if let Some(s) = hit.session() {
        *s = x;
    }
    Action::Continue as u32
}

unsafe extern "C" fn call_return(hit: *mut Hit) -> u32 {
    let hit = unsafe { &mut *hit };
    CALL.returns.fetch_add(1, Ordering::SeqCst);
    let x = hit.session().map_or(0, |s| *s);
    // The outer call (x = 3) returns 31, the one in the handler 9.
    let rax = hit.regs().get(Reg::Rax);
    if rax != x * 10 + 1 && !(x == 7 && rax == 9) {
        CALL.bad.fetch_add(1, Ordering::SeqCst);
    }
    CALL_ANY.fetch_add(1, Ordering::SeqCst);
    Action::Continue as u32
}

isolated!(
    a_signal_handler_calls_the_probed_functions_while_returns_are_pending,
    {
        let call = unsafe {
            probert::attach_with(
                rt_call as *const () as usize,
                call_entry,
                std::ptr::null_mut(),
                AttachOptions {
                    mode: Mode::Auto,
                    on_return: Some(call_return),
                },
            )
        }
        .unwrap();
        let ids = [
            LEAF.attach(addr(rt_leaf), Mode::Auto),
            OUTER.attach(addr(rt_outer), Mode::Trap),
        ];
        // On the thread's stack, then on an alternate stack below the thread's
        // stack and one above it.
        for variant in 0..3 {
            let r = std::thread::spawn(move || unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_usr1 as *const () as usize;
                sa.sa_flags = if variant == 0 { 0 } else { libc::SA_ONSTACK };
                assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
                if variant > 0 {
                    let (sp, size) = if variant == 1 {
                        let size = 256 << 10;
                        let p = libc::mmap(
                            std::ptr::null_mut(),
                            size,
                            libc::PROT_READ | libc::PROT_WRITE,
                            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                            -1,
                            0,
                        );
                        assert_ne!(p, libc::MAP_FAILED);
                        (p as usize, size)
                    } else {
                        alt_stack_above_this_thread()
                    };
                    let ss = libc::stack_t {
                        ss_sp: sp as *mut _,
                        ss_flags: 0,
                        ss_size: size,
                    };
                    assert_eq!(libc::sigaltstack(&ss, std::ptr::null_mut()), 0);
                }
                rt_call(raise_usr1, 3)
            })
            .join()
            .unwrap();
            assert_eq!(r, 31, "variant {variant}");
            assert_eq!(IN_SIGNAL.load(Ordering::SeqCst), variant + 1);
            // Every invocation paired: the outer rt_call (pending while the
            // handler ran) included.
            let n = variant + 1;
            assert_eq!(
                (
                    CALL.entries.load(Ordering::SeqCst),
                    CALL.returns.load(Ordering::SeqCst),
                    CALL.bad.load(Ordering::SeqCst)
                ),
                (2 * n, 2 * n, 0),
                "variant {variant}"
            );
            assert_eq!(LEAF.counts(), (3 * n, 3 * n, 0, 0), "variant {variant}");
            assert_eq!(OUTER.counts(), (n, n, 0, 0), "variant {variant}");
            let s = probert::stats(call).unwrap();
            assert_eq!((s.returns, s.abandoned), (2 * n, 0), "variant {variant}");
        }
        probert::detach_batch(&[call, ids[0], ids[1]]).unwrap();
    }
);

isolated!(fork_with_returns_pending_in_the_parent, {
    static FORKED: AtomicU64 = AtomicU64::new(0);
    extern "C" fn fork_in_the_middle(x: u64) -> u64 {
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            FORKED.store(1, Ordering::SeqCst);
            return x * 10;
        }
        common::expect_child_success(pid);
        x * 10
    }
    CALL.reset();
    let id = unsafe {
        probert::attach_with(
            rt_call as *const () as usize,
            call_entry,
            std::ptr::null_mut(),
            AttachOptions {
                mode: Mode::Auto,
                on_return: Some(call_return),
            },
        )
    }
    .unwrap();
    let r = unsafe { rt_call(fork_in_the_middle, 4) };
    assert_eq!(r, 41);
    if FORKED.load(Ordering::SeqCst) == 1 {
        // The child: the pending invocation either returned (with the right
        // value) or is counted abandoned — never both, never lost, and the
        // child goes on calling the function normally.
        probert::sync().unwrap();
        let s = probert::stats(id).unwrap();
        let ok =
            s.hits == 1 && s.returns + s.abandoned == 1 && CALL.bad.load(Ordering::SeqCst) == 0;
        let again = unsafe { rt_call(plus1, 1) } == 3;
        let s2 = probert::stats(id).unwrap();
        let ok2 = s2.hits == 2 && s2.returns == s.returns + 1;
        unsafe { libc::_exit(if ok && again && ok2 { 0 } else { 1 }) };
    }
    let s = probert::stats(id).unwrap();
    assert_eq!((s.hits, s.returns, s.abandoned), (1, 1, 0));
    assert_eq!(CALL.bad.load(Ordering::SeqCst), 0);
    probert::detach(id).unwrap();
});

/// Threads parked inside `rt_nest`'s innermost callback, `DEPTH + 1`
/// invocations pending each.
const PARK_THREADS: usize = 8;
const PARK_DEPTH: u64 = 124;
static PARKED: AtomicUsize = AtomicUsize::new(0);
static RELEASE: AtomicBool = AtomicBool::new(false);

extern "C" fn park(_: u64) -> u64 {
    PARKED.fetch_add(1, Ordering::SeqCst);
    while !RELEASE.load(Ordering::SeqCst) {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    1000
}

fn nest_spec_expect(n: u64) -> u64 {
    n + 1000
}
static NEST: Spec = Spec::new(nest_spec_expect);
static NEST2: Spec = Spec::new(nest_spec_expect);

isolated!(
    detach_while_a_thousand_invocations_are_pending_on_other_threads,
    {
        for (round, mode) in MODES.into_iter().enumerate() {
            NEST.reset();
            NEST2.reset();
            PARKED.store(0, Ordering::SeqCst);
            RELEASE.store(false, Ordering::SeqCst);
            let id = NEST.attach(rt_nest as *const () as usize, mode);
            let threads: Vec<_> = (0..PARK_THREADS)
                .map(|_| std::thread::spawn(|| unsafe { rt_nest(PARK_DEPTH, park) }))
                .collect();
            while PARKED.load(Ordering::SeqCst) < PARK_THREADS {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let pending = PARK_THREADS as u64 * (PARK_DEPTH + 1);
            assert!(pending >= 1000);
            assert_eq!(NEST.counts(), (pending, 0, 0, 0));
            if round == 0 {
                probert::detach(id).unwrap();
            } else {
                probert::detach_nosync(id).unwrap();
                probert::sync().unwrap();
            }
            NEST.detached.store(true, Ordering::SeqCst);
            // A new consumer on the same function (and perhaps the same
            // record): the old invocations' returns are not its returns.
            let id2 = NEST2.attach(rt_nest as *const () as usize, mode);
            RELEASE.store(true, Ordering::SeqCst);
            for t in threads {
                assert_eq!(t.join().unwrap(), PARK_DEPTH + 1000);
            }
            assert_eq!(NEST.counts(), (pending, 0, 0, 0), "{mode:?}");
            assert_eq!(NEST2.counts(), (0, 0, 0, 0), "{mode:?}");
            // It works for new invocations, and drops the old frames.
            assert_eq!(unsafe { rt_nest(3, nest_cb) }, 1003);
            assert_eq!(NEST2.counts(), (4, 4, 0, 0), "{mode:?}");
            probert::detach(id2).unwrap();
        }
    }
);

extern "C" fn nest_cb(_: u64) -> u64 {
    1000
}

isolated!(
    no_handler_call_after_detach_with_threads_calling_all_along,
    {
        static STOP: AtomicBool = AtomicBool::new(false);
        for mode in MODES {
            for s in [&LEAF, &OUTER] {
                s.reset();
            }
            STOP.store(false, Ordering::SeqCst);
            let ids = [
                LEAF.attach(addr(rt_leaf), mode),
                OUTER.attach(addr(rt_outer), mode),
            ];
            let threads: Vec<_> = (0..3)
                .map(|_| {
                    std::thread::spawn(|| {
                        let mut n = 0u64;
                        while !STOP.load(Ordering::Relaxed) {
                            assert_eq!(unsafe { rt_outer(n) }, 2 * n + 201);
                            n += 1;
                        }
                    })
                })
                .collect();
            while OUTER.returns.load(Ordering::SeqCst) < 2000 {
                std::thread::yield_now();
            }
            probert::detach(ids[0]).unwrap();
            LEAF.detached.store(true, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(20));
            probert::detach(ids[1]).unwrap();
            OUTER.detached.store(true, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(20));
            STOP.store(true, Ordering::SeqCst);
            for t in threads {
                t.join().unwrap();
            }
            for s in [&LEAF, &OUTER] {
                let (e, r, bad, late) = s.counts();
                assert_eq!((bad, late), (0, 0), "{mode:?}");
                // Invocations running at detach may end without a return hit;
                // a return hit never comes without its entry.
                assert!(r <= e && e - r <= 3, "{mode:?}: {e} entries, {r} returns");
            }
        }
    }
);

/// `lea rax, [rdi + 1]; ret` at +0 and, at +16, `sub rsp, 8; call +0;
/// add rsp, 8; add rax, rax; ret`: g(x) = 2 (x + 1).
fn jit_code() -> Vec<u8> {
    let mut c = vec![0xCCu8; 64];
    c[..5].copy_from_slice(&[0x48, 0x8D, 0x47, 0x01, 0xC3]);
    let g = [
        0x48, 0x83, 0xEC, 0x08, // sub rsp, 8
        0xE8, 0, 0, 0, 0, // call f (patched below)
        0x48, 0x83, 0xC4, 0x08, // add rsp, 8
        0x48, 0x01, 0xC0, // add rax, rax
        0xC3, // ret
    ];
    c[16..16 + g.len()].copy_from_slice(&g);
    let rel = 0i32 - (16 + 9);
    c[21..25].copy_from_slice(&rel.to_le_bytes());
    c
}

isolated!(
    return_probes_on_jit_functions_once_their_bounds_are_known,
    {
        let code = jit_code();
        let mut page = region::alloc(4096, region::Protection::READ_WRITE).unwrap();
        let p = page.as_mut_ptr::<u8>();
        unsafe {
            std::ptr::copy_nonoverlapping(code.as_ptr(), p, code.len());
            region::protect(p, 4096, region::Protection::READ_EXECUTE).unwrap();
        }
        std::mem::forget(page);
        let (f, g) = (p as usize, p as usize + 16);
        let call = |a: usize, x: u64| {
            let h: extern "C" fn(u64) -> u64 = unsafe { std::mem::transmute(a) };
            h(x)
        };
        assert_eq!(call(g, 20), 42);
        let region = probert::region_add(RegionDesc {
            start: f,
            len: 4096,
            name: "jit-returns".into(),
            write: None,
        })
        .unwrap();
        probert::region_functions(region, &[(f, 5), (g, 17)]).unwrap();
        static JF: Spec = Spec::new(|x| x + 1);
        static JG: Spec = Spec::new(|x| 2 * (x + 1));
        for mode in MODES {
            JF.reset();
            JG.reset();
            let ids = [JF.attach(f, mode), JG.attach(g, mode)];
            for x in 0..100 {
                assert_eq!(call(g, x), 2 * (x + 1));
                assert_eq!(call(f, x), x + 1);
            }
            assert_eq!(JF.counts(), (200, 200, 0, 0), "{mode:?}");
            assert_eq!(JG.counts(), (100, 100, 0, 0), "{mode:?}");
            JF.rewrite.store(10, Ordering::SeqCst);
            assert_eq!(call(g, 1), 20, "{mode:?}");
            probert::detach_batch(&ids).unwrap();
        }
        // Not a function entry: refused.
        let err = unsafe {
            probert::attach_with(
                g + 4,
                spec_entry,
                JG.ud(),
                AttachOptions {
                    mode: Mode::Auto,
                    on_return: Some(spec_return),
                },
            )
        }
        .unwrap_err();
        assert!(matches!(err, Error::Misaligned { .. }), "{err:?}");
        probert::region_remove(region).unwrap();
        assert_eq!(call(g, 20), 42);
        assert_eq!(&common::bytes(f, code.len())[..], &code[..]);
    }
);

// ---- real code: every function of a dlopen'ed system library ----------

/// Per-library counters shared by every function's consumer.
struct Totals {
    entries: AtomicU64,
    returns: AtomicU64,
}

static TOTALS: Totals = Totals {
    entries: AtomicU64::new(0),
    returns: AtomicU64::new(0),
};

unsafe extern "C" fn total_entry(_: *mut Hit) -> u32 {
    TOTALS.entries.fetch_add(1, Ordering::Relaxed);
    Action::Continue as u32
}

unsafe extern "C" fn total_return(hit: *mut Hit) -> u32 {
    let hit = unsafe { &mut *hit };
    if !hit.is_return() || hit.session.is_null() {
        TOTALS.returns.fetch_add(1 << 40, Ordering::Relaxed);
    }
    TOTALS.returns.fetch_add(1, Ordering::Relaxed);
    Action::Continue as u32
}

/// Attaches entry + return to every function of `module` that takes a
/// return probe; returns the handles and how many were refused (and why).
fn probe_every_function(module: &str, mode: Mode) -> (Vec<(probert::ConsumerId, usize)>, usize) {
    let funcs = probert::functions(module).unwrap();
    assert!(!funcs.is_empty(), "{module}: no functions");
    let mut ids = Vec::new();
    let mut refused = std::collections::BTreeMap::<String, usize>::new();
    for f in &funcs {
        match unsafe {
            probert::attach_with(
                f.start,
                total_entry,
                std::ptr::null_mut(),
                AttachOptions {
                    mode,
                    on_return: Some(total_return),
                },
            )
        } {
            Ok(id) => ids.push((id, f.start)),
            Err(e) => {
                let why = format!("{e}");
                let key = why.split(':').next().unwrap_or("").to_owned();
                *refused.entry(key).or_default() += 1;
            }
        }
    }
    let n_refused: usize = refused.values().sum();
    eprintln!(
        "{module} ({mode:?}): {} of {} functions probed; refused: {refused:?}",
        ids.len(),
        funcs.len()
    );
    (ids, n_refused)
}

fn dlopen(name: &str) -> Option<*mut std::ffi::c_void> {
    let c = std::ffi::CString::new(name).unwrap();
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    (!h.is_null()).then_some(h)
}

fn dlsym<T: Copy>(h: *mut std::ffi::c_void, name: &str) -> T {
    assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<usize>());
    let c = std::ffi::CString::new(name).unwrap();
    let p = unsafe { libc::dlsym(h, c.as_ptr()) };
    assert!(!p.is_null(), "no {name}");
    unsafe { std::mem::transmute_copy(&p) }
}

/// `addr` as `file+offset`, for messages.
fn in_module(addr: usize) -> String {
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    if unsafe { libc::dladdr(addr as *const libc::c_void, &mut info) } == 0
        || info.dli_fname.is_null()
    {
        return "not in a module".into();
    }
    let name = unsafe { std::ffi::CStr::from_ptr(info.dli_fname) }.to_string_lossy();
    format!("{name}+{:#x}", addr - info.dli_fbase as usize)
}

/// Checks the totals after a workload: every entry returned or was
/// abandoned, nothing else.
fn check_totals(ids: &[(probert::ConsumerId, usize)], what: &str) {
    probert::sync().unwrap();
    let (mut hits, mut returns, mut abandoned) = (0, 0, 0);
    for &(id, start) in ids {
        let s = probert::stats(id).unwrap();
        assert!(s.returns + s.abandoned <= s.hits, "{what}: {s:?}");
        // No `longjmp`, exception or thread exit in these workloads: every
        // invocation returns (a function that tail-jumps to its own entry,
        // as sqlite3WhereSplit does, too).
        assert_eq!(
            s.abandoned,
            0,
            "{what}: {s:?} abandoned in the function at {start:#x} ({})",
            in_module(start)
        );
        hits += s.hits;
        returns += s.returns;
        abandoned += s.abandoned;
    }
    let e = TOTALS.entries.load(Ordering::SeqCst);
    let r = TOTALS.returns.load(Ordering::SeqCst);
    eprintln!("{what}: {hits} entries, {returns} returns, {abandoned} abandoned");
    assert!(hits > 1000, "{what}: the workload ran probed code ({hits})");
    assert_eq!(
        (e, r),
        (hits, returns),
        "{what}: handler calls and stats agree"
    );
    assert_eq!(hits, returns + abandoned, "{what}");
}

fn detach_all(ids: &[(probert::ConsumerId, usize)]) {
    let ids: Vec<_> = ids.iter().map(|p| p.0).collect();
    probert::detach_batch(&ids).unwrap();
}

type Compress2 =
    unsafe extern "C" fn(*mut u8, *mut libc::c_ulong, *const u8, libc::c_ulong, i32) -> i32;
type Uncompress =
    unsafe extern "C" fn(*mut u8, *mut libc::c_ulong, *const u8, libc::c_ulong) -> i32;
type Crc32 = unsafe extern "C" fn(libc::c_ulong, *const u8, u32) -> libc::c_ulong;

fn zlib_workload(h: *mut std::ffi::c_void) -> (Vec<u8>, u64) {
    let compress2: Compress2 = dlsym(h, "compress2");
    let uncompress: Uncompress = dlsym(h, "uncompress");
    let crc32: Crc32 = dlsym(h, "crc32");
    let adler32: Crc32 = dlsym(h, "adler32");
    let mut input = Vec::new();
    let mut x = 12345u32;
    for i in 0..20_000u32 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        input.extend_from_slice(format!("line {i} value {} ", x >> 20).as_bytes());
    }
    let mut out = Vec::new();
    let mut sum = 0u64;
    for level in [1, 6, 9] {
        let mut z = vec![0u8; input.len() + 1024];
        let mut zlen = z.len() as libc::c_ulong;
        assert_eq!(
            unsafe {
                compress2(
                    z.as_mut_ptr(),
                    &mut zlen,
                    input.as_ptr(),
                    input.len() as _,
                    level,
                )
            },
            0
        );
        z.truncate(zlen as usize);
        let mut back = vec![0u8; input.len()];
        let mut blen = back.len() as libc::c_ulong;
        assert_eq!(
            unsafe { uncompress(back.as_mut_ptr(), &mut blen, z.as_ptr(), zlen) },
            0
        );
        assert_eq!(back, input);
        out.extend_from_slice(&z);
        sum += unsafe { crc32(0, z.as_ptr(), z.len() as u32) } as u64;
        sum += unsafe { adler32(1, input.as_ptr(), input.len() as u32) } as u64;
    }
    (out, sum)
}

/// Every function of `lib` probed with entry and return in each mode (at
/// least `min` of them), `workload` run on two threads at once: results
/// identical to unprobed, and the totals pair up (`check_totals`).
fn every_function_in_a_real_workload<T>(
    lib: &'static str,
    min: usize,
    workload: fn(*mut std::ffi::c_void) -> T,
    check: impl Fn(&T),
) where
    T: PartialEq + std::fmt::Debug + Send + 'static,
{
    let Some(h) = dlopen(lib) else {
        eprintln!("no {lib}: skipped");
        return;
    };
    let want = workload(h);
    check(&want);
    for mode in MODES {
        TOTALS.entries.store(0, Ordering::SeqCst);
        TOTALS.returns.store(0, Ordering::SeqCst);
        let (ids, _) = probe_every_function(lib, mode);
        assert!(
            ids.len() >= min,
            "{mode:?}: only {} functions probed",
            ids.len()
        );
        // Two threads at once, and the results byte for byte.
        let t = std::thread::spawn(move || workload(dlopen(lib).unwrap()));
        assert_eq!(workload(h), want, "{mode:?}");
        assert_eq!(t.join().unwrap(), want, "{mode:?}");
        check_totals(&ids, &format!("{lib} {mode:?}"));
        detach_all(&ids);
        assert_eq!(workload(h), want);
    }
}

isolated!(every_function_of_libz_in_a_real_workload, {
    every_function_in_a_real_workload("libz.so.1", 50, zlib_workload, |_| {});
});

type Open = unsafe extern "C" fn(*const libc::c_char, *mut *mut libc::c_void) -> i32;
type Exec = unsafe extern "C" fn(
    *mut libc::c_void,
    *const libc::c_char,
    Option<
        unsafe extern "C" fn(
            *mut libc::c_void,
            i32,
            *mut *mut libc::c_char,
            *mut *mut libc::c_char,
        ) -> i32,
    >,
    *mut libc::c_void,
    *mut *mut libc::c_char,
) -> i32;
type Close = unsafe extern "C" fn(*mut libc::c_void) -> i32;

unsafe extern "C" fn collect_row(
    out: *mut libc::c_void,
    n: i32,
    vals: *mut *mut libc::c_char,
    _: *mut *mut libc::c_char,
) -> i32 {
    let out = unsafe { &mut *(out as *mut String) };
    for i in 0..n as usize {
        let v = unsafe { *vals.add(i) };
        if v.is_null() {
            out.push_str("NULL");
        } else {
            out.push_str(&unsafe { std::ffi::CStr::from_ptr(v) }.to_string_lossy());
        }
        out.push('|');
    }
    out.push('\n');
    0
}

fn sqlite_workload(h: *mut std::ffi::c_void) -> String {
    let open: Open = dlsym(h, "sqlite3_open");
    let exec: Exec = dlsym(h, "sqlite3_exec");
    let close: Close = dlsym(h, "sqlite3_close");
    let mut db = std::ptr::null_mut();
    let name = std::ffi::CString::new(":memory:").unwrap();
    assert_eq!(unsafe { open(name.as_ptr(), &mut db) }, 0);
    let mut out = String::new();
    let sql = "CREATE TABLE t(a INTEGER PRIMARY KEY, b TEXT, c REAL);
        WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000)
        INSERT INTO t SELECT i, printf('row %d', i * 7 % 1000), i * 0.5 FROM n;
        CREATE INDEX tb ON t(b);
        SELECT count(*), sum(a), total(c) FROM t;
        SELECT b, count(*) FROM t GROUP BY b ORDER BY count(*) DESC, b LIMIT 5;
        SELECT a FROM t WHERE b = 'row 7' ORDER BY a;
        UPDATE t SET c = c * 2 WHERE a % 3 = 0;
        SELECT total(c) FROM t;
        SELECT no_such_function(1);";
    let sql = std::ffi::CString::new(sql).unwrap();
    let mut err = std::ptr::null_mut();
    let rc = unsafe {
        exec(
            db,
            sql.as_ptr(),
            Some(collect_row),
            &mut out as *mut String as *mut _,
            &mut err,
        )
    };
    // The last statement fails, on purpose: error paths run too.
    out.push_str(&format!("rc {rc}"));
    assert_ne!(rc, 0);
    let free: unsafe extern "C" fn(*mut libc::c_void) = dlsym(h, "sqlite3_free");
    unsafe { free(err.cast()) };
    assert_eq!(unsafe { close(db) }, 0);
    out
}

isolated!(every_function_of_libsqlite3_in_a_real_workload, {
    every_function_in_a_real_workload("libsqlite3.so.0", 500, sqlite_workload, |want| {
        assert!(want.contains("3000|4501500|"), "{want}")
    });
});

// ---- Lua: a whole interpreter, whose errors and yields are `longjmp`s ----

/// Times the script below raises an error with `error()` (each through
/// `lua_error`; once more from nested frames), with a bad argument to a library function (each through
/// `luaL_argerror`, `luaL_error` and `lua_error`), and yields from a
/// coroutine (each through `lua_yieldk`): each of those invocations leaves
/// by `longjmp`, never returning.
const LUA_ERRORS: u64 = 40;
const LUA_ARGERRORS: u64 = 25;
const LUA_YIELDS: u64 = 30;

fn lua_script() -> String {
    format!(
        r#"
        local out = {{}}
        local function add(s) out[#out + 1] = tostring(s) end
        -- Closures, recursion, tables, sorting, strings.
        local function fib(n) if n < 2 then return n end return fib(n - 1) + fib(n - 2) end
        add(fib(20))
        local t = {{}}
        for i = 1, 2000 do t[i] = (i * 7919) % 1009 end
        table.sort(t)
        add(t[1] .. "," .. t[1000] .. "," .. t[2000])
        local words = {{}}
        for w in ("the quick brown fox jumps over the lazy dog"):gmatch("%a+") do
            words[#words + 1] = w:upper():reverse()
        end
        add(table.concat(words, " "))
        add(string.format("%5.2f|%x|%q", math.pi, 48879, "a\nb"))
        add(("x"):rep(10, "-"):gsub("x", "y"))
        -- Errors raised and caught: error() ({errors} times, each with
        -- the count), a bad argument ({argerrors} times), arithmetic on
        -- nil (the VM raises it itself).
        local caught = 0
        for i = 1, {errors} do
            local ok, msg = pcall(error, "boom " .. i, 0)
            if not ok and msg == "boom " .. i then caught = caught + 1 end
        end
        for i = 1, {argerrors} do
            local ok, msg = pcall(string.rep, "x", "many")
            if not ok and msg:find("bad argument") then caught = caught + 1 end
        end
        for i = 1, 10 do
            local ok = pcall(function() local x = nil; return x + i end)
            if not ok then caught = caught + 1 end
        end
        -- An error through nested Lua and C frames, caught with a handler.
        local function deep(n) if n == 0 then error({{code = 7}}) end return deep(n - 1) + 1 end
        local ok, e = xpcall(deep, function(m) return m.code * 6 end, 30)
        add(tostring(ok) .. " " .. tostring(e))
        add(caught)
        -- A coroutine yielding {yields} times.
        local co = coroutine.wrap(function()
            for i = 1, {yields} do coroutine.yield(i * i) end
            return -1
        end)
        local sum = 0
        for i = 1, {yields} do sum = sum + co() end
        add(sum .. " " .. co())
        return table.concat(out, "\n")
        "#,
        errors = LUA_ERRORS,
        argerrors = LUA_ARGERRORS,
        yields = LUA_YIELDS,
    )
}

type LuaNew = unsafe extern "C" fn() -> *mut libc::c_void;
type LuaOpenLibs = unsafe extern "C" fn(*mut libc::c_void);
type LuaLoadString = unsafe extern "C" fn(*mut libc::c_void, *const libc::c_char) -> i32;
type LuaPcallK = unsafe extern "C" fn(*mut libc::c_void, i32, i32, i32, isize, usize) -> i32;
type LuaToLString = unsafe extern "C" fn(*mut libc::c_void, i32, *mut usize) -> *const libc::c_char;

/// Runs the script in a new Lua state: what it returns.
fn lua_workload(h: *mut std::ffi::c_void) -> String {
    let new: LuaNew = dlsym(h, "luaL_newstate");
    let open: LuaOpenLibs = dlsym(h, "luaL_openlibs");
    let load: LuaLoadString = dlsym(h, "luaL_loadstring");
    let pcall: LuaPcallK = dlsym(h, "lua_pcallk");
    let tostr: LuaToLString = dlsym(h, "lua_tolstring");
    let close: LuaOpenLibs = dlsym(h, "lua_close");
    let src = std::ffi::CString::new(lua_script()).unwrap();
    unsafe {
        let l = new();
        assert!(!l.is_null());
        open(l);
        assert_eq!(load(l, src.as_ptr()), 0, "the script compiles");
        let rc = pcall(l, 0, 1, 0, 0, 0);
        let s = tostr(l, -1, std::ptr::null_mut());
        let out = std::ffi::CStr::from_ptr(s).to_string_lossy().into_owned();
        assert_eq!(rc, 0, "the script failed: {out}");
        close(l);
        out
    }
}

isolated!(every_function_of_liblua_with_errors_and_yields, {
    let Some(h) = dlopen("liblua5.4.so.0") else {
        eprintln!("no liblua5.4.so.0: skipped");
        return;
    };
    let want = lua_workload(h);
    let caught = LUA_ERRORS + LUA_ARGERRORS + 10;
    assert!(want.contains("false 42"), "{want}");
    assert!(want.contains(&format!("\n{caught}\n")), "{want}");
    // The functions whose invocations are known to leave by `longjmp`
    // (each run of the workload: how many times), and one that never does.
    let longjmps: [(&str, u64); 4] = [
        // And the error the nested frames raise.
        ("lua_error", LUA_ERRORS + LUA_ARGERRORS + 1),
        ("luaL_error", LUA_ARGERRORS),
        ("luaL_argerror", LUA_ARGERRORS),
        ("lua_yieldk", LUA_YIELDS),
    ];
    let named = |name: &str| dlsym::<usize>(h, name);
    for mode in MODES {
        TOTALS.entries.store(0, Ordering::SeqCst);
        TOTALS.returns.store(0, Ordering::SeqCst);
        let (ids, _) = probe_every_function("liblua5.4.so.0", mode);
        assert!(
            ids.len() >= 300,
            "{mode:?}: only {} functions probed",
            ids.len()
        );
        let stats_of = |name: &str| {
            let at = named(name);
            let id = ids
                .iter()
                .find(|&&(_, start)| start == at)
                .unwrap_or_else(|| panic!("{mode:?}: {name} was not probed"))
                .0;
            probert::stats(id).unwrap()
        };
        // Two threads at once, each with its own state; the results
        // identical to the unprobed run.
        let t = std::thread::spawn(move || lua_workload(dlopen("liblua5.4.so.0").unwrap()));
        assert_eq!(lua_workload(h), want, "{mode:?}");
        assert_eq!(t.join().unwrap(), want, "{mode:?}");
        probert::sync().unwrap();
        for (name, n) in longjmps {
            let s = stats_of(name);
            assert_eq!(
                (s.hits, s.returns, s.abandoned),
                (2 * n, 0, 2 * n),
                "{mode:?}: {name}"
            );
        }
        let s = stats_of("lua_pcallk");
        assert!(s.hits >= 2 * caught, "{mode:?}: lua_pcallk {s:?}");
        assert_eq!(
            (s.returns, s.abandoned),
            (s.hits, 0),
            "{mode:?}: lua_pcallk"
        );
        // Every entry returned or was abandoned, and handlers and stats
        // agree.
        let (mut hits, mut returns, mut abandoned) = (0, 0, 0);
        for &(id, _) in &ids {
            let s = probert::stats(id).unwrap();
            assert!(s.returns + s.abandoned <= s.hits, "{mode:?}: {s:?}");
            hits += s.hits;
            returns += s.returns;
            abandoned += s.abandoned;
        }
        eprintln!("liblua {mode:?}: {hits} entries, {returns} returns, {abandoned} abandoned");
        assert!(
            hits > 10_000,
            "{mode:?}: the workload ran probed code ({hits})"
        );
        assert_eq!(
            (
                TOTALS.entries.load(Ordering::SeqCst),
                TOTALS.returns.load(Ordering::SeqCst)
            ),
            (hits, returns),
            "{mode:?}: handler calls and stats agree"
        );
        assert_eq!(hits, returns + abandoned, "{mode:?}");
        assert!(
            abandoned >= 2 * (2 * LUA_ERRORS + 4 * LUA_ARGERRORS + LUA_YIELDS),
            "{mode:?}: {abandoned} abandoned"
        );
        detach_all(&ids);
        assert_eq!(lua_workload(h), want);
    }
});

isolated!(
    a_return_consumer_removed_by_its_first_hit_takes_its_exits_with_it,
    {
        // A return consumer's entry handler returns `Remove` on its first hit,
        // which another thread makes as soon as the probe's list is published —
        // before the writer has counted the consumer among its exits' users.
        // The exits must still go when the consumer is reaped: nothing stays
        // patched, no exit consumer lingers.
        unsafe extern "C" fn remove(_hit: *mut Hit) -> u32 {
            Action::Remove as u32
        }
        unsafe extern "C" fn ret(_hit: *mut Hit) -> u32 {
            Action::Continue as u32
        }
        // On the project's own leaf, then on real code: zlib's `adler32_combine`
        // (its own `ret`s, no tail call).
        fn churn(f: usize, call: fn(u64) -> u64) {
            static STOP: AtomicBool = AtomicBool::new(false);
            STOP.store(false, Ordering::SeqCst);
            let before = common::bytes(f, 16);
            let want = call(7);
            let hammer = std::thread::spawn(move || {
                while !STOP.load(Ordering::Relaxed) {
                    assert_eq!(call(7), want);
                }
            });
            let opts = AttachOptions {
                mode: Mode::Auto,
                on_return: Some(ret),
            };
            for _ in 0..200 {
                let id =
                    unsafe { probert::attach_with(f, remove, std::ptr::null_mut(), opts) }.unwrap();
                // Until its handler has asked to be removed (its stale handle).
                while probert::stats(id).is_ok() {
                    std::thread::yield_now();
                }
                probert::sync().unwrap();
                assert_eq!(
                    probert::probe_count(),
                    0,
                    "a probe outlived its consumer at {f:#x}"
                );
            }
            STOP.store(true, Ordering::SeqCst);
            hammer.join().unwrap();
            probert::sync().unwrap();
            assert_eq!(probert::probe_count(), 0);
            assert_eq!(
                common::bytes(f, 16),
                before,
                "the code at {f:#x} is restored"
            );
        }
        churn(addr(rt_leaf), |n| unsafe { rt_leaf(n) });
        static COMBINE: AtomicUsize = AtomicUsize::new(0);
        let h = unsafe { libc::dlopen(c"libz.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if h.is_null() {
            eprintln!("no libz.so.1: the real-code half skipped");
            return;
        }
        let combine = unsafe { libc::dlsym(h, c"adler32_combine".as_ptr()) } as usize;
        assert_ne!(combine, 0, "adler32_combine");
        COMBINE.store(combine, Ordering::SeqCst);
        churn(combine, |n| {
            type Combine =
                unsafe extern "C" fn(libc::c_ulong, libc::c_ulong, libc::c_long) -> libc::c_ulong;
            let f: Combine = unsafe { std::mem::transmute(COMBINE.load(Ordering::Relaxed)) };
            unsafe { f(0x1234_5678, 0x0abc_def0 + n as libc::c_ulong, 1000) }
        });
    }
);

isolated!(
    a_tail_call_through_the_plt_returns_when_its_callee_returns,
    {
        // zlib's `adler32` is `mov edx, edx; jmp adler32_z@plt`: its exits are
        // `adler32_z`'s, reached through the PLT stub and the GOT slot it
        // jumps through — not the next PLT entry's (whose slot points into
        // libc), which decoding past the stub's end would follow.
        static CALLS: AtomicU64 = AtomicU64::new(0);
        static RETURNS: AtomicU64 = AtomicU64::new(0);
        /// adler32(1, "probert").
        const SUM: u64 = 0x0bfd_02ff;
        unsafe extern "C" fn entry(_hit: *mut Hit) -> u32 {
            CALLS.fetch_add(1, Ordering::Relaxed);
            Action::Continue as u32
        }
        unsafe extern "C" fn ret(hit: *mut Hit) -> u32 {
            // Counted only with the value the caller receives.
            if unsafe { &*hit }.regs().get(Reg::Rax) == SUM {
                RETURNS.fetch_add(1, Ordering::Relaxed);
            }
            Action::Continue as u32
        }
        // Bound lazily, as a program linked with zlib has it: the PLT slot
        // holds its stub's second half until the first call binds it.
        let h = unsafe { libc::dlopen(c"libz.so.1".as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL) };
        if h.is_null() {
            eprintln!("no libz.so.1: skipped");
            return;
        }
        type Adler = unsafe extern "C" fn(libc::c_ulong, *const u8, u32) -> libc::c_ulong;
        let adler32: Adler = dlsym(h, "adler32");
        let adler32_z: usize = dlsym(h, "adler32_z");
        let f = adler32 as usize;
        let before = common::bytes(adler32_z, 64);
        if std::env::var_os("LD_BIND_NOW").is_none_or(|v| v.is_empty()) {
            let opts = AttachOptions {
                mode: Mode::Auto,
                on_return: Some(ret),
            };
            let e = unsafe { probert::attach_with(f, entry, std::ptr::null_mut(), opts) }
                .expect_err("the exits of an unbound PLT entry are not known yet");
            assert!(
                matches!(e, Error::UnsupportedInstruction { .. })
                    && e.to_string().contains("LD_BIND_NOW"),
                "{e}"
            );
            assert_eq!(probert::probe_count(), 0);
        }
        let run = || unsafe { adler32(1, b"probert".as_ptr(), 7) };
        // The first call binds the slot.
        assert_eq!(run(), SUM as libc::c_ulong);
        for mode in MODES {
            CALLS.store(0, Ordering::SeqCst);
            RETURNS.store(0, Ordering::SeqCst);
            let id = unsafe {
                probert::attach_with(
                    f,
                    entry,
                    std::ptr::null_mut(),
                    AttachOptions {
                        mode,
                        on_return: Some(ret),
                    },
                )
            }
            .unwrap_or_else(|e| panic!("{mode:?}: a return probe on adler32: {e}"));
            for _ in 0..100 {
                assert_eq!(run(), SUM as libc::c_ulong);
            }
            let s = probert::stats(id).unwrap();
            assert_eq!((s.hits, s.returns, s.abandoned), (100, 100, 0), "{mode:?}");
            assert_eq!(CALLS.load(Ordering::SeqCst), 100);
            assert_eq!(RETURNS.load(Ordering::SeqCst), 100);
            probert::detach(id).unwrap();
            probert::sync().unwrap();
            assert_eq!(common::bytes(adler32_z, 64), before, "{mode:?}");
        }
    }
);
