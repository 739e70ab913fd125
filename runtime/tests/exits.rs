//! Fast exits: a return probe's `ret` served without a signal, by an *exit
//! run* — the instructions before the `ret`, with it, displaced into a stub
//! that calls the consumers at the `ret` and returns. What the handlers
//! see, the trap path through the same stub, probes that meet an exit run,
//! and byte-exact removal. Every test patches code, so each runs in its own
//! process (`isolated!`).
#![allow(unsafe_code)]
#![allow(clippy::undocumented_unsafe_blocks)]

mod common;

use std::arch::global_asm;
use std::sync::atomic::{AtomicU64, Ordering};

use common::{bytes, count, counter};
use probert::{Action, AttachOptions, Error, Hit, Mode, Reg};

global_asm!(
    r#"
    .text
    .p2align 4
    .globl xr_add
    .type xr_add,@function
xr_add:                         // rdi + rsi + 1, with a frame
    push rbp                    // +0: the entry run, 8 bytes
    mov rbp, rsp
    lea rax, [rdi + rsi]
    .globl xr_add_exit
xr_add_exit:
    add rax, 1                  // +8: the exit run, 6 bytes
    pop rbp
    .globl xr_add_ret
xr_add_ret:
    ret
    .size xr_add, .-xr_add

    .p2align 4
    .globl xr_keep
    .type xr_keep,@function
xr_keep:                        // callee-saved registers set, restored
    push rbx
    push r12
    mov rbx, 0x1111
    mov r12, 0x2222
    lea rax, [rdi + 3]
    .globl xr_keep_exit
xr_keep_exit:
    pop r12
    pop rbx
    nop dword ptr [rax]
    .globl xr_keep_ret
xr_keep_ret:
    ret
    .size xr_keep, .-xr_keep

    // The places inside as offsets from the starts: an address in data
    // would need a relocation, which names an entry point (a jump through
    // a pointer may arrive there), and no run may hold one.
    .pushsection .rodata
    .p2align 3
    .globl xr_offsets
xr_offsets:
    .quad xr_add_exit - xr_add
    .quad xr_add_ret - xr_add
    .quad xr_keep_ret - xr_keep
    .popsection
"#
);

extern "C" {
    fn xr_add(a: u64, b: u64) -> u64;
    fn xr_keep(x: u64) -> u64;
    static xr_offsets: [usize; 3];
}

/// `xr_add`'s exit run.
fn add_exit() -> usize {
    xr_add as *const () as usize + unsafe { xr_offsets[0] }
}

/// `xr_add`'s `ret`.
fn add_ret() -> usize {
    xr_add as *const () as usize + unsafe { xr_offsets[1] }
}

/// `xr_keep`'s `ret`.
fn keep_ret() -> usize {
    xr_keep as *const () as usize + unsafe { xr_offsets[2] }
}

static ENTRIES: AtomicU64 = AtomicU64::new(0);
static RETURNS: AtomicU64 = AtomicU64::new(0);
/// Return hits whose registers were not those just after the `ret`.
static BAD: AtomicU64 = AtomicU64::new(0);
/// If not zero: the return handler writes it into RAX.
static REWRITE: AtomicU64 = AtomicU64::new(0);
/// The return handler's view: RSP minus the caller's RSP before the call.
static RSP_SEEN: AtomicU64 = AtomicU64::new(0);

unsafe extern "C" fn on_entry(hit: *mut Hit) -> u32 {
    let hit = unsafe { &mut *hit };
    ENTRIES.fetch_add(1, Ordering::SeqCst);
    let sp = hit.regs().sp() as u64;
    if let Some(s) = hit.session() {
        *s = sp;
    }
    Action::Continue as u32
}

unsafe extern "C" fn on_return(hit: *mut Hit) -> u32 {
    let hit = unsafe { &mut *hit };
    RETURNS.fetch_add(1, Ordering::SeqCst);
    let entry_sp = hit.session().map_or(0, |s| *s) as usize;
    let regs = hit.regs();
    // After the `ret`: RIP is the return address, popped from just below
    // RSP, which is the entry's RSP plus the return address's 8 bytes.
    let popped = unsafe { std::ptr::read_volatile((regs.sp() - 8) as *const usize) };
    if !hit.is_return() || popped != regs.pc() || regs.sp() != entry_sp + 8 {
        BAD.fetch_add(1, Ordering::SeqCst);
    }
    RSP_SEEN.store((regs.sp() - entry_sp) as u64, Ordering::SeqCst);
    let w = REWRITE.load(Ordering::SeqCst);
    if w != 0 {
        hit.regs_mut().set(Reg::Rax, w);
    }
    Action::Continue as u32
}

fn attach_returns(f: usize) -> probert::ConsumerId {
    unsafe {
        probert::attach_with(
            f,
            on_entry,
            std::ptr::null_mut(),
            AttachOptions {
                mode: Mode::Auto,
                on_return: Some(on_return),
            },
        )
    }
    .unwrap_or_else(|e| panic!("attach {f:#x}: {e}"))
}

isolated!(a_return_probe_exit_is_fast_and_pairs_on_two_threads, {
    let f = xr_add as *const () as usize;
    let before = bytes(f, 16);
    let id = attach_returns(f);
    assert_eq!(probert::probe_mode(f), Ok(Mode::Fast), "the entry");
    assert_eq!(
        probert::probe_mode(add_ret()),
        Ok(Mode::Fast),
        "the exit: its run's jump"
    );
    let exit = add_exit();
    assert_eq!(bytes(exit, 1), [0xE9], "the jump at the exit run");
    assert_eq!(&bytes(f, 16)[14..], &before[14..], "nothing past the ret");
    let threads: Vec<_> = (0..2u64)
        .map(|t| {
            std::thread::spawn(move || {
                for x in 0..20_000u64 {
                    assert_eq!(unsafe { xr_add(x, t) }, x + t + 1);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(ENTRIES.load(Ordering::SeqCst), 40_000);
    assert_eq!(RETURNS.load(Ordering::SeqCst), 40_000);
    assert_eq!(BAD.load(Ordering::SeqCst), 0);
    assert_eq!(RSP_SEEN.load(Ordering::SeqCst), 8);
    let s = probert::stats(id).unwrap();
    assert_eq!((s.hits, s.returns, s.abandoned), (40_000, 40_000, 0));
    // A return handler's RAX is what the caller gets.
    REWRITE.store(77, Ordering::SeqCst);
    assert_eq!(unsafe { xr_add(1, 2) }, 77);
    REWRITE.store(0, Ordering::SeqCst);
    probert::detach(id).unwrap();
    assert_eq!(bytes(f, 16), before, "byte-exact");
    assert_eq!(unsafe { xr_add(1, 2) }, 4);
    assert_eq!(RETURNS.load(Ordering::SeqCst), 40_001);
});

isolated!(registers_the_epilogue_restores_reach_the_caller, {
    let f = xr_keep as *const () as usize;
    let id = attach_returns(f);
    assert_eq!(probert::probe_mode(keep_ret()), Ok(Mode::Fast));
    let (rbx, r12, out): (u64, u64, u64);
    unsafe {
        std::arch::asm!(
            "push rbx",
            "push r12",
            "mov rbx, 0x5151",
            "mov r12, 0x6262",
            "call {f}",
            "mov r8, rbx",
            "mov r9, r12",
            "pop r12",
            "pop rbx",
            f = in(reg) f,
            out("r8") rbx,
            out("r9") r12,
            in("rdi") 10u64,
            lateout("rax") out,
            clobber_abi("C"),
        );
    }
    assert_eq!((rbx, r12, out), (0x5151, 0x6262, 13));
    assert_eq!(RETURNS.load(Ordering::SeqCst), 1);
    assert_eq!(BAD.load(Ordering::SeqCst), 0);
    probert::detach(id).unwrap();
});

isolated!(a_trap_pin_at_the_ret_goes_through_the_exit_stub, {
    // A TRAP consumer at the `ret` keeps the exit run on its trap: the
    // trap at the run's start resumes in the exit stub, which calls every
    // consumer at the `ret` once.
    static PLAIN: AtomicU64 = AtomicU64::new(0);
    static RIP: AtomicU64 = AtomicU64::new(0);
    unsafe extern "C" fn at_ret(hit: *mut Hit) -> u32 {
        let hit = unsafe { &*hit };
        RIP.store(hit.regs().rip, Ordering::SeqCst);
        PLAIN.fetch_add(1, Ordering::SeqCst);
        Action::Continue as u32
    }
    let f = xr_add as *const () as usize;
    let ret = add_ret();
    let exit = add_exit();
    let before = bytes(f, 16);
    let id = attach_returns(f);
    let pin = unsafe { probert::attach_ex(ret, at_ret, std::ptr::null_mut(), Mode::Trap) }.unwrap();
    assert_eq!(probert::probe_mode(ret), Ok(Mode::Trap));
    assert_eq!(bytes(exit, 1), [0xCC], "the trap at the run's start");
    for x in 0..100 {
        assert_eq!(unsafe { xr_add(x, 1) }, x + 2);
    }
    assert_eq!(PLAIN.load(Ordering::SeqCst), 100);
    assert_eq!(RIP.load(Ordering::SeqCst), ret as u64, "hits at the ret");
    assert_eq!(RETURNS.load(Ordering::SeqCst), 100);
    assert_eq!(BAD.load(Ordering::SeqCst), 0);
    // The pin gone, the run is a jump again.
    probert::detach(pin).unwrap();
    assert_eq!(probert::probe_mode(ret), Ok(Mode::Fast));
    assert_eq!(unsafe { xr_add(1, 1) }, 3);
    assert_eq!(RETURNS.load(Ordering::SeqCst), 101);
    assert_eq!(PLAIN.load(Ordering::SeqCst), 100);
    probert::detach(id).unwrap();
    assert_eq!(bytes(f, 16), before);
});

isolated!(a_probe_inside_an_exit_run_is_refused_until_it_goes, {
    static HITS: AtomicU64 = AtomicU64::new(0);
    let f = xr_add as *const () as usize;
    let exit = add_exit();
    let id = attach_returns(f);
    match unsafe { probert::attach(exit + 4, count, counter(&HITS)) } {
        Err(Error::UnsupportedInstruction { reason, .. }) => {
            assert!(reason.contains("detach the return probe first"), "{reason}")
        }
        other => panic!("a probe inside the exit run: {other:?}"),
    }
    assert_eq!(unsafe { xr_add(2, 2) }, 5);
    assert_eq!(
        RETURNS.load(Ordering::SeqCst),
        1,
        "the refusal changed nothing"
    );
    probert::detach(id).unwrap();
    let inner = unsafe { probert::attach(exit + 4, count, counter(&HITS)) }.unwrap();
    assert_eq!(unsafe { xr_add(2, 2) }, 5);
    assert_eq!(HITS.load(Ordering::SeqCst), 1);
    // The other order: the exit takes the trap path at its `ret`.
    let id = attach_returns(f);
    let ret = add_ret();
    assert_eq!(probert::probe_mode(ret), Ok(Mode::Trap));
    assert_eq!(unsafe { xr_add(2, 3) }, 6);
    assert_eq!(HITS.load(Ordering::SeqCst), 2);
    assert_eq!(RETURNS.load(Ordering::SeqCst), 2);
    assert_eq!(BAD.load(Ordering::SeqCst), 0);
    probert::detach_batch(&[id, inner]).unwrap();
});
