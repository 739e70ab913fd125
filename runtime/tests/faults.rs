//! Faults in displaced instructions reach the host as if nothing were
//! probed (issue 13, item 1): a host `SIGSEGV`/`SIGFPE` handler that
//! recognises its own faulting instruction by address sees RIP at the
//! original instruction and every other register as there, on the trap
//! path (an out-of-line stub, an emulated `push`) and on the fast path; and
//! whether it resumes past the instruction or at it again, the probe keeps
//! working. Each test runs in its own process.
#![allow(unsafe_code)]
// Test code calls assembly targets, libc and probert's unsafe attach on
// purpose; the safety premise of every such call is the test itself.
#![allow(clippy::undocumented_unsafe_blocks)]

mod common;

use std::arch::global_asm;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use common::counter;
use probert::{Action, Hit, Mode};

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

    FUNC f_load              // rax = [rdi + 0x100]: a 7-byte load
    mov rax, qword ptr [rdi + 0x100]
    .globl f_load_end
f_load_end:
    ret
    END f_load

    FUNC f_div               // rdi / rsi
    mov rax, rdi
    xor edx, edx
    .globl f_div_site
f_div_site:
    div rsi
    .globl f_div_end
f_div_end:
    ret
    END f_div

    FUNC f_push              // push rbx; pop rbx; ret → 7
    push rbx
    pop rbx
    .globl f_push_end
f_push_end:
    mov eax, 7
    ret
    END f_push

    FUNC f_gp                // push rbx; a load from rdi; pop rbx; ret
    push rbx
    .globl f_gp_load
f_gp_load:
    mov rax, qword ptr [rdi]
    .globl f_gp_after
f_gp_after:
    pop rbx
    ret
    END f_gp

    FUNC f_call_on           // calls rsi with rsp = rdi
    push rbx
    mov rbx, rsp
    mov rsp, rdi
    call rsi
    mov rsp, rbx
    pop rbx
    ret
    END f_call_on
"#
);

extern "C" {
    fn f_load(p: usize) -> u64;
    fn f_load_end();
    fn f_div(x: u64, d: u64) -> u64;
    fn f_div_site();
    fn f_div_end();
    fn f_push() -> u64;
    fn f_push_end();
    fn f_call_on(sp: usize, target: usize) -> u64;
    fn f_gp(p: usize) -> u64;
    fn f_gp_load();
    fn f_gp_after();
}

fn addr_of(f: unsafe extern "C" fn()) -> usize {
    f as *const () as usize
}

// ---- the host's fault handler ----------------------------------------------

/// What the host handler does: resume past the instruction (at `SKIP_TO`,
/// with rax = `SKIPPED`), or repair and resume at it again.
const SKIP: usize = 1;
const RETRY: usize = 2;
const SKIPPED: u64 = 0x55;
static ACTION: AtomicUsize = AtomicUsize::new(0);
static SKIP_TO: AtomicUsize = AtomicUsize::new(0);
/// For RETRY: the register to repair and its new value, or a page to make
/// writable.
static FIX_REG: AtomicUsize = AtomicUsize::new(0);
static FIX_VALUE: AtomicU64 = AtomicU64::new(0);
static FIX_PAGE: AtomicUsize = AtomicUsize::new(0);
static FAULTS: AtomicU64 = AtomicU64::new(0);
static SEEN_SIG: AtomicUsize = AtomicUsize::new(0);
static SEEN_ADDR: AtomicUsize = AtomicUsize::new(0);
static SEEN: [AtomicU64; 17] = [const { AtomicU64::new(0) }; 17];

/// `mcontext_t.gregs` indices in `probert::Regs::gpr` order, then RIP.
const GREGS: [i32; 17] = [
    libc::REG_RAX,
    libc::REG_RBX,
    libc::REG_RCX,
    libc::REG_RDX,
    libc::REG_RSI,
    libc::REG_RDI,
    libc::REG_RBP,
    libc::REG_RSP,
    libc::REG_R8,
    libc::REG_R9,
    libc::REG_R10,
    libc::REG_R11,
    libc::REG_R12,
    libc::REG_R13,
    libc::REG_R14,
    libc::REG_R15,
    libc::REG_RIP,
];

extern "C" fn host_handler(sig: i32, info: *mut libc::siginfo_t, uc: *mut std::ffi::c_void) {
    let uc = unsafe { &mut *uc.cast::<libc::ucontext_t>() };
    let g = &mut uc.uc_mcontext.gregs;
    for (i, &r) in GREGS.iter().enumerate() {
        SEEN[i].store(g[r as usize] as u64, Ordering::SeqCst);
    }
    SEEN_SIG.store(sig as usize, Ordering::SeqCst);
    SEEN_ADDR.store(unsafe { (*info).si_addr() } as usize, Ordering::SeqCst);
    FAULTS.fetch_add(1, Ordering::SeqCst);
    match ACTION.load(Ordering::SeqCst) {
        SKIP => {
            g[libc::REG_RIP as usize] = SKIP_TO.load(Ordering::SeqCst) as i64;
            g[libc::REG_RAX as usize] = SKIPPED as i64;
        }
        RETRY => {
            let page = FIX_PAGE.load(Ordering::SeqCst);
            if page != 0 {
                unsafe { libc::mprotect(page as *mut _, 4096, libc::PROT_READ | libc::PROT_WRITE) };
            } else {
                let r = GREGS[FIX_REG.load(Ordering::SeqCst)] as usize;
                g[r] = FIX_VALUE.load(Ordering::SeqCst) as i64;
            }
        }
        _ => unsafe {
            // Not the host's fault: die as the default would.
            libc::signal(sig, libc::SIG_DFL);
        },
    }
}

fn install_host_handler(sig: i32) {
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = host_handler as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        assert_eq!(libc::sigaction(sig, &act, std::ptr::null_mut()), 0);
    }
}

// ---- a consumer that records the registers at the probe ---------------------

static AT_PROBE: [AtomicU64; 16] = [const { AtomicU64::new(0) }; 16];

unsafe extern "C" fn record(hit: *mut Hit) -> u32 {
    let regs = unsafe { &*(*hit).regs };
    for (i, v) in regs.gpr.iter().enumerate() {
        AT_PROBE[i].store(*v, Ordering::SeqCst);
    }
    unsafe { common::count(hit) };
    Action::Continue as u32
}

/// The host saw RIP at `rip` and every general-purpose register as the
/// probe's consumer saw it at the instruction.
fn assert_seen_as_at_the_instruction(rip: usize) {
    assert_eq!(
        SEEN[16].load(Ordering::SeqCst) as usize,
        rip,
        "the host's handler must see the original instruction's address"
    );
    for i in 0..16 {
        assert_eq!(
            SEEN[i].load(Ordering::SeqCst),
            AT_PROBE[i].load(Ordering::SeqCst),
            "register {:?} differs from the instruction's",
            probert::Reg::ALL[i]
        );
    }
}

/// A readable page whose start is a valid `f_load` argument minus 0x100.
fn readable_word() -> usize {
    static WORD: AtomicU64 = AtomicU64::new(0x1234_5678);
    std::ptr::addr_of!(WORD) as usize - 0x100
}

/// The scenario of a probed faulting load at `f_load`, in `mode`: the host
/// skips the faulting load once, then repairs the pointer and resumes at
/// the load, which hits the probe again.
fn faulting_load(mode: Mode) {
    install_host_handler(libc::SIGSEGV);
    probert::init().unwrap();
    static HITS: AtomicU64 = AtomicU64::new(0);
    let site = f_load as *const () as usize;
    let id = unsafe { probert::attach_ex(site, record, counter(&HITS), mode) }.unwrap();
    assert_eq!(probert::probe_mode(site), Ok(mode));
    let good = readable_word();
    assert_eq!(unsafe { f_load(good) }, 0x1234_5678);
    assert_eq!(HITS.load(Ordering::SeqCst), 1);

    // An implicit null check: the host resumes past the load.
    ACTION.store(SKIP, Ordering::SeqCst);
    SKIP_TO.store(addr_of(f_load_end), Ordering::SeqCst);
    assert_eq!(unsafe { f_load(8) }, SKIPPED);
    assert_eq!(FAULTS.load(Ordering::SeqCst), 1);
    assert_eq!(SEEN_SIG.load(Ordering::SeqCst), libc::SIGSEGV as usize);
    assert_eq!(SEEN_ADDR.load(Ordering::SeqCst), 0x108);
    assert_seen_as_at_the_instruction(site);
    assert_eq!(HITS.load(Ordering::SeqCst), 2);

    // The host repairs rdi and resumes at the load: the probe hits again.
    ACTION.store(RETRY, Ordering::SeqCst);
    FIX_REG.store(5, Ordering::SeqCst);
    FIX_VALUE.store(good as u64, Ordering::SeqCst);
    assert_eq!(unsafe { f_load(16) }, 0x1234_5678);
    assert_eq!(FAULTS.load(Ordering::SeqCst), 2);
    assert_eq!(
        HITS.load(Ordering::SeqCst),
        4,
        "the retried load hits again"
    );

    // And the probe works as before, and detaches.
    ACTION.store(0, Ordering::SeqCst);
    assert_eq!(unsafe { f_load(good) }, 0x1234_5678);
    assert_eq!(HITS.load(Ordering::SeqCst), 5);
    probert::detach(id).unwrap();
    assert_eq!(unsafe { f_load(good) }, 0x1234_5678);
    assert_eq!(HITS.load(Ordering::SeqCst), 5);
}

isolated!(
    a_faulting_load_run_out_of_line_reaches_the_host_at_its_address,
    {
        faulting_load(Mode::Trap);
    }
);

isolated!(
    a_faulting_load_displaced_by_a_fast_site_reaches_the_host_at_its_address,
    {
        faulting_load(Mode::Fast);
    }
);

isolated!(a_probed_division_by_zero_reaches_the_host_at_its_address, {
    install_host_handler(libc::SIGFPE);
    probert::init().unwrap();
    static HITS: AtomicU64 = AtomicU64::new(0);
    let site = addr_of(f_div_site);
    let id = unsafe { probert::attach_ex(site, record, counter(&HITS), Mode::Trap) }.unwrap();
    assert_eq!(unsafe { f_div(42, 6) }, 7);
    ACTION.store(SKIP, Ordering::SeqCst);
    SKIP_TO.store(addr_of(f_div_end), Ordering::SeqCst);
    assert_eq!(unsafe { f_div(42, 0) }, SKIPPED);
    assert_eq!(SEEN_SIG.load(Ordering::SeqCst), libc::SIGFPE as usize);
    assert_seen_as_at_the_instruction(site);
    ACTION.store(RETRY, Ordering::SeqCst);
    FIX_REG.store(4, Ordering::SeqCst);
    FIX_VALUE.store(2, Ordering::SeqCst);
    assert_eq!(unsafe { f_div(42, 0) }, 21);
    assert_eq!(HITS.load(Ordering::SeqCst), 4);
    probert::detach(id).unwrap();
});

isolated!(
    an_emulated_push_faulting_on_a_guard_page_reaches_the_host_at_its_address,
    {
        install_host_handler(libc::SIGSEGV);
        probert::init().unwrap();
        static HITS: AtomicU64 = AtomicU64::new(0);
        let site = f_push as *const () as usize;
        let id = unsafe { probert::attach_ex(site, record, counter(&HITS), Mode::Trap) }.unwrap();
        // A stack whose guard page starts right below the target's rsp: the
        // push faults (and so would the trap's signal frame).
        let region = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8 * 4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        } as usize;
        assert_ne!(region as *mut libc::c_void, libc::MAP_FAILED);
        let guard = region + 4 * 4096;
        let sp = guard + 4096 + 8; // the call pushes its return address at guard + 4096
        let protect = || unsafe {
            assert_eq!(libc::mprotect(guard as *mut _, 4096, libc::PROT_NONE), 0);
        };
        protect();
        let target = f_push as *const () as usize;
        ACTION.store(SKIP, Ordering::SeqCst);
        SKIP_TO.store(addr_of(f_push_end), Ordering::SeqCst);
        // Skipping `push rbx; pop rbx` leaves the stack as it was.
        assert_eq!(unsafe { f_call_on(sp, target) }, 7);
        assert_eq!(FAULTS.load(Ordering::SeqCst), 1);
        assert_eq!(SEEN_SIG.load(Ordering::SeqCst), libc::SIGSEGV as usize);
        assert_eq!(SEEN_ADDR.load(Ordering::SeqCst), guard + 4096 - 8);
        assert_seen_as_at_the_instruction(site);
        assert_eq!(SEEN[7].load(Ordering::SeqCst) as usize, guard + 4096, "rsp");
        // The host maps the page and resumes at the push: the probe hits again.
        ACTION.store(RETRY, Ordering::SeqCst);
        FIX_PAGE.store(guard, Ordering::SeqCst);
        assert_eq!(unsafe { f_call_on(sp, target) }, 7);
        assert_eq!(FAULTS.load(Ordering::SeqCst), 2);
        assert_eq!(
            HITS.load(Ordering::SeqCst),
            3,
            "the first call, and the retried push twice"
        );
        probert::detach(id).unwrap();
    }
);

isolated!(
    a_general_protection_fault_right_after_a_one_byte_site_is_the_hosts,
    {
        // A non-canonical load faults with #GP: SIGSEGV, SI_KERNEL, address
        // 0 — as the kernel reports a trap whose frame did not fit. At the
        // instruction right after a probed 1-byte `push`, it must not be
        // taken for the trap again (its handlers would run twice and the
        // push be emulated twice).
        install_host_handler(libc::SIGSEGV);
        probert::init().unwrap();
        static HITS: AtomicU64 = AtomicU64::new(0);
        let site = f_gp as *const () as usize;
        assert_eq!(addr_of(f_gp_load), site + 1);
        let id = unsafe { probert::attach_ex(site, record, counter(&HITS), Mode::Trap) }.unwrap();
        ACTION.store(SKIP, Ordering::SeqCst);
        SKIP_TO.store(addr_of(f_gp_after), Ordering::SeqCst);
        let bad = 0x8000_0000_0000_0000usize;
        assert_eq!(unsafe { f_gp(bad) }, SKIPPED, "skipped, popped, returned");
        assert_eq!(FAULTS.load(Ordering::SeqCst), 1);
        assert_eq!(SEEN_SIG.load(Ordering::SeqCst), libc::SIGSEGV as usize);
        assert_eq!(SEEN[16].load(Ordering::SeqCst) as usize, addr_of(f_gp_load));
        assert_eq!(
            SEEN[7].load(Ordering::SeqCst),
            AT_PROBE[7].load(Ordering::SeqCst) - 8,
            "rsp: one push"
        );
        assert_eq!(HITS.load(Ordering::SeqCst), 1, "the probe ran once");
        probert::detach(id).unwrap();
    }
);
