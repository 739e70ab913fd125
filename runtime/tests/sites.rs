//! Multi-instruction sites: which runs of instructions a fast site may
//! displace (the flow analysis of the whole function: branches, jump
//! tables, landing pads, calls), when the jump's tail may be written
//! (thread scans that see threads inside the run, in a system call or in a
//! signal frame), `endbr64` entries, stubs retired under load, and
//! demotion. Every test patches code, so each runs in its own process
//! (`isolated!`).
#![allow(unsafe_code)]
// Test code calls assembly targets, libc and probert's unsafe attach on
// purpose; the safety premise of every such call is the test itself.
#![allow(clippy::undocumented_unsafe_blocks)]

mod common;

use std::arch::global_asm;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{bytes, count, counter};
use probert::{ConsumerId, Error, Hit, Mode};

// The targets. Labels inside functions are `.L` labels: a symbol there
// would be an entry of its own (see `switch_jump_table_targets_...`).
global_asm!(
    r#"
    .text
    .macro SFUNC name
    .p2align 4
    .globl \name
    .type \name,@function
\name:
    .endm
    .macro SEND name
    .size \name, .-\name
    .endm

    // The loop branches back into the entry's 5 bytes: sum 1..=rdi.
    SFUNC s_loop
    xor eax, eax                    // +0, 2 bytes
.Ls_loop_top:
    add rax, rdi                    // +2: the jg lands here
    sub rdi, 1
    jg .Ls_loop_top
    ret
    SEND s_loop

    // A PIC switch: 0 → 10, 1 → 21, 2 → 35, 3 → 15, else 99. Case 2 is
    // `add edi, 5` falling into case 3, a jump-table target 3 bytes later.
    SFUNC s_switch
    cmp rdi, 3                      // +0
    ja .Ls_sw_default               // +4
    lea rcx, [rip + .Ls_sw_table]   // +6
    movsxd rax, dword ptr [rcx + rdi*4] // +13
    add rax, rcx                    // +17
    jmp rax                         // +20
.Ls_sw_c0:
    mov eax, 10                     // +22
    ret                             // +27
.Ls_sw_c1:
    lea eax, [rdi + 20]             // +28
    ret                             // +31
.Ls_sw_c2:
    add edi, 5                      // +32
.Ls_sw_c3:
    lea eax, [rdi + rdi*4]          // +35
    ret                             // +38
.Ls_sw_default:
    mov eax, 99                     // +39
    ret                             // +44
    SEND s_switch
    .pushsection .rodata
    .p2align 2
.Ls_sw_table:
    .long .Ls_sw_c0 - .Ls_sw_table
    .long .Ls_sw_c1 - .Ls_sw_table
    .long .Ls_sw_c2 - .Ls_sw_table
    .long .Ls_sw_c3 - .Ls_sw_table
    .popsection
    .pushsection .data
    .p2align 3
    .globl s_switch_c2
s_switch_c2: .quad .Ls_sw_c2
    .popsection

    // A call in the entry's run, not its last instruction: rsi(rdi).
    SFUNC s_call_in
    push rbp
    call rsi
    pop rbp
    ret
    SEND s_call_in

    // read(rdi, rsi, rdx), the `syscall` inside the entry's run.
    SFUNC s_read
    xor eax, eax
    syscall
    nop
    ret
    SEND s_read

    // An endbr64 entry with a run of three instructions after it: rdi + 5.
    SFUNC s_endbr
    endbr64
    push rbp
    mov rbp, rsp
    lea rax, [rdi + 5]
    pop rbp
    ret
    SEND s_endbr

    // Entry runs of three instructions: rdi + 3 and rdi + 4.
    SFUNC s_run
    push rbp
    mov rbp, rsp
    lea rax, [rdi + 3]
    pop rbp
    ret
    SEND s_run

    SFUNC s_demote
    push rbp
    mov rbp, rsp
    lea rax, [rdi + 4]
    pop rbp
    ret
    SEND s_demote

    // A tail call through a function pointer in memory: (*s_tail_slot)(rdi
    // + 1). The entry's run is the lea and the mov, 7 bytes.
    SFUNC s_tail
    lea rax, [rdi + 1]              // +0, 4 bytes
    mov rdi, rax                    // +4, 3 bytes
    jmp qword ptr [rip + s_tail_slot]
    SEND s_tail

    // The same jump, through a slot that holds an address inside the
    // entry's run (named by a relocation): max(rdi + 1, 3), looping back
    // through the slot.
    SFUNC s_tail_into
    mov rax, rdi                    // +0, 3 bytes
.Ls_tail_into_mid:
    add rax, 1                      // +3, 4 bytes: inside the entry's run
    cmp rax, 3
    jae 1f
    jmp qword ptr [rip + s_tail_into_slot]
1:  ret
    SEND s_tail_into

    // A computed goto the PIC way: its own label's address plus an offset
    // from data (no relocation names the target), stored and loaded back,
    // then jumped through. Returns 2 from the block at s_goto_base + 4,
    // inside the 6-byte run of the probe at s_goto_base.
    SFUNC s_goto
    lea rax, [rip + .Ls_goto_base]
    add rax, qword ptr [rip + s_goto_delta]
    mov qword ptr [rip + s_goto_cell], rax
    mov eax, 1
    mov rdx, qword ptr [rip + s_goto_cell]
    jmp rdx
.Ls_goto_base:
    xor eax, eax                    // 2 bytes
    inc eax                         // 2 bytes
.Ls_goto_target:
    inc eax                         // 2 bytes
    ret
    SEND s_goto

    // Shorter than the jump: rdi + 1. The alignment of the next function
    // pads it with nops nothing executes.
    SFUNC s_short
    lea eax, [rdi + 1]              // 3 bytes
    ret
    SEND s_short
    SFUNC s_after_short
    lea eax, [rdi + 2]
    ret
    SEND s_after_short

    .pushsection .data
    .p2align 3
    .globl s_tail_slot
s_tail_slot: .quad 0
s_tail_into_slot: .quad .Ls_tail_into_mid
s_goto_delta: .quad .Ls_goto_target - .Ls_goto_base
s_goto_cell: .quad 0
    .globl s_goto_base
s_goto_base: .quad .Ls_goto_base
    .popsection
"#
);

extern "C" {
    fn s_loop(n: u64) -> u64;
    fn s_switch(x: u64) -> u64;
    static s_switch_c2: usize;
    fn s_call_in(x: u64, f: extern "C" fn(u64) -> u64) -> u64;
    fn s_read(fd: i32, buf: *mut u8, n: usize) -> i64;
    fn s_endbr(x: u64) -> u64;
    fn s_run(x: u64) -> u64;
    fn s_demote(x: u64) -> u64;
    fn s_tail(x: u64) -> u64;
    static mut s_tail_slot: usize;
    fn s_tail_into(x: u64) -> u64;
    fn s_goto() -> u64;
    fn s_short(x: u64) -> u64;
    fn s_after_short(x: u64) -> u64;
    static s_goto_base: usize;
}

/// The address of a target.
macro_rules! at {
    ($f:ident) => {
        $f as *const () as usize
    };
}

/// The reason of an `UnsupportedInstruction`, or a panic naming what came.
fn refusal(r: probert::Result<ConsumerId>) -> String {
    match r {
        Err(Error::UnsupportedInstruction { reason, .. }) => reason.into_owned(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Attaches a FAST counting consumer at `addr`, which must be refused;
/// returns the reason.
fn fast_refusal(addr: usize) -> String {
    static NEVER: AtomicU64 = AtomicU64::new(0);
    refusal(unsafe { probert::attach_ex(addr, count, counter(&NEVER), Mode::Fast) })
}

/// Waits for `cond`, failing after 10 s.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

isolated!(a_branch_into_the_run_keeps_the_site_on_the_trap_path, {
    static HITS: AtomicU64 = AtomicU64::new(0);
    let f = at!(s_loop);
    let before = bytes(f, 16);
    let why = fast_refusal(f);
    let jg = f + 2 + 3 + 4;
    assert!(
        why.contains(&format!("a branch at {jg:#x}"))
            && why.contains(&format!("inside the displaced range, at {:#x}", f + 2)),
        "{why}"
    );
    assert_eq!(probert::fast_refusal(f), Err(Error::NotFound));
    let id = unsafe { probert::attach(f, count, counter(&HITS)) }.unwrap();
    assert_eq!(probert::probe_mode(f), Ok(Mode::Trap));
    // AUTO says why it chose the trap path: what FAST was refused with.
    let auto_why = probert::fast_refusal(f).unwrap().expect("a reason");
    assert!(why.ends_with(&auto_why), "{why} / {auto_why}");
    assert_eq!(bytes(f, 1), [0xCC]);
    for n in 0..20u64 {
        assert_eq!(unsafe { s_loop(n) }, n * (n + 1) / 2);
    }
    assert_eq!(
        HITS.load(Ordering::SeqCst),
        20,
        "once per call, not per loop"
    );
    probert::detach(id).unwrap();
    assert_eq!(bytes(f, 16), before);
});

/// Every instruction start of `s_switch` with the cases (0..=3, 4 for the
/// default) that execute it, as assembled (the comments in the source).
const SWITCH_LAYOUT: [(usize, &[u64]); 15] = [
    (0, &[0, 1, 2, 3, 4]),
    (4, &[0, 1, 2, 3, 4]),
    (6, &[0, 1, 2, 3]),
    (13, &[0, 1, 2, 3]),
    (17, &[0, 1, 2, 3]),
    (20, &[0, 1, 2, 3]),
    (22, &[0]),
    (27, &[0]),
    (28, &[1]),
    (31, &[1]),
    (32, &[2]),
    (35, &[2, 3]),
    (38, &[2, 3]),
    (39, &[4]),
    (44, &[4]),
];

fn switch_expect(case: u64) -> u64 {
    [10, 21, 35, 15, 99][case as usize]
}

isolated!(switch_jump_table_targets_are_entries, {
    static HITS: AtomicU64 = AtomicU64::new(0);
    let f = at!(s_switch);
    let c2 = unsafe { std::ptr::read_volatile(std::ptr::addr_of!(s_switch_c2)) };
    assert_eq!(c2, f + 32, "the layout the test assumes");
    let before = bytes(f, 48);
    // `add edi, 5` is 3 bytes; the jump would cover case 3's target.
    let why = fast_refusal(c2);
    assert!(
        why.contains("jump-table target of the jump at")
            && why.contains(&format!("{:#x}", f + 20))
            && why.contains(&format!("inside the displaced range, at {:#x}", f + 35)),
        "{why}"
    );
    // The boundaries probert accepts are the instruction starts.
    let mut found = Vec::new();
    for off in 0..45 {
        match unsafe { probert::attach(f + off, count, counter(&HITS)) } {
            Ok(id) => {
                found.push(off);
                probert::detach(id).unwrap();
            }
            Err(Error::Misaligned { .. }) => {}
            Err(e) => panic!("+{off}: {e}"),
        }
    }
    let layout: Vec<usize> = SWITCH_LAYOUT.iter().map(|&(o, _)| o).collect();
    assert_eq!(found, layout, "instruction starts of s_switch");
    // Each boundary alone, in AUTO: right results and exact counts for
    // every case (case k is called k + 1 times).
    let mut fast = 0;
    for &(off, cases) in &SWITCH_LAYOUT {
        HITS.store(0, Ordering::SeqCst);
        let id = unsafe { probert::attach(f + off, count, counter(&HITS)) }.unwrap();
        fast += usize::from(probert::probe_mode(f + off) == Ok(Mode::Fast));
        let mut expect = 0;
        for case in 0..5u64 {
            let x = if case == 4 { 7 } else { case };
            for _ in 0..=case {
                assert_eq!(unsafe { s_switch(x) }, switch_expect(case), "+{off}, x {x}");
            }
            if cases.contains(&case) {
                expect += case + 1;
            }
        }
        assert_eq!(HITS.load(Ordering::SeqCst), expect, "hits at +{off}");
        probert::detach(id).unwrap();
        assert_eq!(bytes(f, 48), before, "restored after +{off}");
    }
    assert!(fast > 0, "some boundary of the switch is a fast site");
});

/// Drops counted by [`Guard`].
static DROPS: AtomicU64 = AtomicU64::new(0);

struct Guard(u64);

impl Drop for Guard {
    fn drop(&mut self) {
        DROPS.fetch_add(self.0, Ordering::SeqCst);
    }
}

#[inline(never)]
fn lp_may_panic(x: u64) -> u64 {
    if x % 5 == 3 {
        std::panic::panic_any(x);
    }
    x.wrapping_mul(3)
}

/// A function with a landing pad: the guard is dropped on both ways out.
#[inline(never)]
fn lp_guarded_target(x: u64) -> u64 {
    let g = Guard(std::hint::black_box(1));
    let y = lp_may_panic(std::hint::black_box(x));
    drop(g);
    y + 1
}

/// The size of the function symbol of this executable whose name contains
/// `name`.
fn symbol_size(name: &str) -> usize {
    use object::{Object, ObjectSymbol};
    let data = std::fs::read("/proc/self/exe").unwrap();
    let file = object::File::parse(&*data).unwrap();
    let sizes: Vec<u64> = file
        .symbols()
        .filter(|s| s.kind() == object::SymbolKind::Text)
        .filter(|s| s.name().is_ok_and(|n| n.contains(name)))
        .map(|s| s.size())
        .collect();
    assert_eq!(sizes.len(), 1, "one symbol named like {name}");
    sizes[0] as usize
}

/// Calls the guarded function panicking and not: (results, drops).
fn landing_pad_scenario() -> (Vec<Option<u64>>, u64) {
    let drops = DROPS.load(Ordering::SeqCst);
    let results = [1u64, 3, 4, 8, 10, 13]
        .iter()
        .map(|&x| std::panic::catch_unwind(|| lp_guarded_target(x)).ok())
        .collect();
    (results, DROPS.load(Ordering::SeqCst) - drops)
}

isolated!(landing_pads_are_entries, {
    static HITS: AtomicU64 = AtomicU64::new(0);
    // The panics the scenario makes (a `u64` payload) are not reported.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |p| {
        if p.payload().downcast_ref::<u64>().is_none() {
            report(p);
        }
    }));
    let f = lp_guarded_target as *const () as usize;
    let size = symbol_size("lp_guarded_target");
    let before = bytes(f, size);
    let unprobed = landing_pad_scenario();
    assert_eq!(
        unprobed,
        (vec![Some(4), None, Some(13), None, Some(31), None], 6)
    );
    let run = |addr: usize, mode: Mode| {
        HITS.store(0, Ordering::SeqCst);
        let id = match unsafe { probert::attach_ex(addr, count, counter(&HITS), mode) } {
            Ok(id) => id,
            Err(Error::Misaligned { .. }) => return None,
            // A `ud2` after a call that does not return (debug builds).
            Err(Error::UnsupportedInstruction { reason, .. }) if reason.contains("ud2") => {
                return None
            }
            Err(e) => panic!("+{:#x} ({mode:?}): {e}", addr - f),
        };
        let served = probert::probe_mode(addr).unwrap();
        let out = landing_pad_scenario();
        probert::detach(id).unwrap();
        assert_eq!(bytes(f, size), before, "restored after +{:#x}", addr - f);
        Some((out, HITS.load(Ordering::SeqCst), served))
    };
    let (mut boundaries, mut fast, mut pads) = (0, 0, Vec::new());
    for off in 0..size {
        let Some((auto, auto_hits, served)) = run(f + off, Mode::Auto) else {
            continue;
        };
        boundaries += 1;
        fast += usize::from(served == Mode::Fast);
        let (trap, trap_hits, _) = run(f + off, Mode::Trap).unwrap();
        assert_eq!(auto, unprobed, "results and drops, AUTO at +{off:#x}");
        assert_eq!(trap, unprobed, "results and drops, TRAP at +{off:#x}");
        assert_eq!(auto_hits, trap_hits, "hits at +{off:#x} ({served:?})");
        if served == Mode::Trap {
            let why = fast_refusal(f + off);
            if why.contains("an entry the caller gave (landing pad, symbol)") {
                pads.push(off);
            }
        }
    }
    eprintln!(
        "{boundaries} boundaries in {size} bytes, {fast} fast; a landing pad refuses at {pads:x?}"
    );
    assert!(boundaries > 10, "{boundaries} boundaries");
    assert!(fast > 0, "some boundary is a fast site");
    assert!(
        !pads.is_empty(),
        "no boundary was refused for a landing pad: the scenario is not exercised"
    );
});

extern "C" fn times7(x: u64) -> u64 {
    x * 7
}

isolated!(a_call_returning_inside_the_run_is_refused, {
    static HITS: AtomicU64 = AtomicU64::new(0);
    let f = at!(s_call_in);
    let before = bytes(f, 5);
    let why = fast_refusal(f);
    assert!(
        why.contains(&format!(
            "the call at {:#x} returns inside the displaced range",
            f + 1
        )),
        "{why}"
    );
    let id = unsafe { probert::attach(f, count, counter(&HITS)) }.unwrap();
    assert_eq!(probert::probe_mode(f), Ok(Mode::Trap));
    for x in 0..10 {
        assert_eq!(unsafe { s_call_in(x, times7) }, 7 * x);
    }
    assert_eq!(HITS.load(Ordering::SeqCst), 10);
    probert::detach(id).unwrap();
    assert_eq!(bytes(f, 5), before);
});

/// The program counter of thread `tid` if it is blocked in `read`
/// (`/proc/<pid>/task/<tid>/syscall`: the number, six arguments, the stack
/// pointer and the program counter).
fn blocked_in_read(tid: i32) -> Option<usize> {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")).ok()?;
    let f: Vec<&str> = s.split_whitespace().collect();
    if f.first() != Some(&"0") {
        return None;
    }
    usize::from_str_radix(f.get(8)?.trim_start_matches("0x"), 16).ok()
}

/// A pipe: (read end, write end).
fn pipe() -> (i32, i32) {
    let mut fds = [0i32; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    (fds[0], fds[1])
}

/// Starts a thread reading one byte from `fd` through `s_read`, and waits
/// until it is blocked in the system call (wherever `s_read` runs: in place
/// or in a stub). Returns it and its tid.
fn reader_in_read(fd: i32) -> (std::thread::JoinHandle<(i64, u8)>, i32) {
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        tx.send(unsafe { libc::gettid() }).unwrap();
        let mut byte = 0u8;
        let n = unsafe { s_read(fd, &mut byte, 1) };
        (n, byte)
    });
    let tid = rx.recv().unwrap();
    wait_for("the reader to block in read", || {
        blocked_in_read(tid).is_some()
    });
    (reader, tid)
}

/// [`reader_in_read`], blocked in `s_read` itself, inside its entry's run.
fn blocked_reader(fd: i32) -> (std::thread::JoinHandle<(i64, u8)>, i32) {
    let (reader, tid) = reader_in_read(fd);
    // Inside the entry's run: after the `syscall`, before the `nop`.
    assert_eq!(blocked_in_read(tid), Some(at!(s_read) + 4));
    (reader, tid)
}

/// The end of a test with a thread held inside `s_read`'s run: now that no
/// thread is inside, another consumer makes the site fast, and a call
/// reaches both.
fn fast_once_the_thread_left(first: ConsumerId, hits: &'static AtomicU64, before: &[u8]) {
    let f = at!(s_read);
    // The site that could not switch is tried again by the next control
    // call, whatever it is.
    probert::sync().unwrap();
    assert_eq!(probert::probe_mode(f), Ok(Mode::Fast), "retried");
    static SECOND: AtomicU64 = AtomicU64::new(0);
    let second = unsafe { probert::attach(f, count, counter(&SECOND)) }.unwrap();
    assert_eq!(probert::probe_mode(f), Ok(Mode::Fast));
    assert_eq!(bytes(f, 1), [0xE9]);
    let (r, w) = pipe();
    assert_eq!(unsafe { libc::write(w, b"y".as_ptr().cast(), 1) }, 1);
    let mut byte = 0u8;
    assert_eq!(unsafe { s_read(r, &mut byte, 1) }, 1);
    assert_eq!(byte, b'y');
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "the reader entered unprobed"
    );
    assert_eq!(SECOND.load(Ordering::SeqCst), 1);
    probert::detach_batch(&[first, second]).unwrap();
    assert_eq!(bytes(f, 8), before);
}

isolated!(
    a_thread_blocked_inside_the_run_keeps_the_site_on_the_trap_path,
    {
        static HITS: AtomicU64 = AtomicU64::new(0);
        let f = at!(s_read);
        let before = bytes(f, 8);
        let (r, w) = pipe();
        let (reader, tid) = blocked_reader(r);
        let id = unsafe { probert::attach(f, count, counter(&HITS)) }.unwrap();
        assert_eq!(
            probert::probe_mode(f),
            Ok(Mode::Trap),
            "a thread is inside the run"
        );
        assert_eq!(bytes(f, 1), [0xCC]);
        assert_eq!(&bytes(f, 5)[1..], &before[1..5], "the run's tail is intact");
        let why = fast_refusal(f);
        assert!(why.contains("a thread is (or may be) inside"), "{why}");
        assert_eq!(probert::probe_mode(f), Ok(Mode::Trap));
        // A TRAP consumer that leaves lets the site try the jump again, and
        // fail the same way: its detach still succeeds (and waits for its
        // handler), the site serving the others on the trap path.
        static PINNED: AtomicU64 = AtomicU64::new(0);
        let pin = unsafe { probert::attach_ex(f, count, counter(&PINNED), Mode::Trap) }.unwrap();
        assert_eq!(probert::detach(pin), Ok(()));
        assert_eq!(
            probert::detach(pin),
            Err(Error::NotFound),
            "it was detached"
        );
        assert_eq!(probert::probe_mode(f), Ok(Mode::Trap));
        // The scans' signals interrupted the read; its handler acked before
        // returning, so the thread may not be back in the kernel yet. A read
        // that failed with EINTR instead would never block again (and the
        // join below would see -1).
        wait_for("the scans to restart its read", || {
            blocked_in_read(tid).is_some()
        });
        assert_eq!(unsafe { libc::write(w, b"x".as_ptr().cast(), 1) }, 1);
        assert_eq!(reader.join().unwrap(), (1, b'x'));
        fast_once_the_thread_left(id, &HITS, &before);
    }
);

static IN_USR1: AtomicBool = AtomicBool::new(false);
static RELEASE_USR1: AtomicBool = AtomicBool::new(false);

extern "C" fn spin_usr1(_: i32, _: *mut libc::siginfo_t, _: *mut std::ffi::c_void) {
    IN_USR1.store(true, Ordering::SeqCst);
    while !RELEASE_USR1.load(Ordering::SeqCst) {
        std::hint::spin_loop();
    }
}

isolated!(a_context_saved_inside_the_run_in_a_signal_frame_is_seen, {
    static HITS: AtomicU64 = AtomicU64::new(0);
    let f = at!(s_read);
    let before = bytes(f, 8);
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = spin_usr1 as *const () as usize;
        // SA_RESTART: the interrupted read restarts after the handler, so
        // the context saved in the frame is at the `syscall`, inside the
        // run.
        act.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        assert_eq!(
            libc::sigaction(libc::SIGUSR1, &act, std::ptr::null_mut()),
            0
        );
    }
    let (r, w) = pipe();
    let (reader, tid) = blocked_reader(r);
    let rc = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGUSR1) };
    assert_eq!(rc, 0);
    wait_for("the reader's SIGUSR1 handler", || {
        IN_USR1.load(Ordering::SeqCst)
    });
    assert_eq!(blocked_in_read(tid), None, "the reader runs its handler");
    // The innermost context is in the handler, outside the run; the one the
    // handler returns to is inside it. Without walking signal frames the
    // site would go fast and the reader resume inside the jump.
    let id = unsafe { probert::attach(f, count, counter(&HITS)) }.unwrap();
    assert_eq!(probert::probe_mode(f), Ok(Mode::Trap));
    let why = fast_refusal(f);
    assert!(why.contains("a thread is (or may be) inside"), "{why}");
    assert_eq!(probert::probe_mode(f), Ok(Mode::Trap));
    RELEASE_USR1.store(true, Ordering::SeqCst);
    wait_for("the reader to block in read again", || {
        blocked_in_read(tid).is_some()
    });
    assert_eq!(unsafe { libc::write(w, b"x".as_ptr().cast(), 1) }, 1);
    assert_eq!(reader.join().unwrap(), (1, b'x'));
    fast_once_the_thread_left(id, &HITS, &before);
});

isolated!(an_endbr64_entry_keeps_its_endbr64, {
    static HITS: AtomicU64 = AtomicU64::new(0);
    static RIP: AtomicU64 = AtomicU64::new(0);
    static ADDR: AtomicUsize = AtomicUsize::new(0);
    unsafe extern "C" fn seen(hit: *mut Hit) -> u32 {
        let hit = unsafe { &*hit };
        RIP.store(hit.regs().rip, Ordering::SeqCst);
        ADDR.store(hit.addr, Ordering::SeqCst);
        HITS.fetch_add(1, Ordering::SeqCst);
        probert::Action::Continue as u32
    }
    let f = at!(s_endbr);
    let before = bytes(f, 16);
    assert_eq!(&before[..4], [0xF3, 0x0F, 0x1E, 0xFA]);
    let id = unsafe { probert::attach(f, seen, std::ptr::null_mut()) }.unwrap();
    assert_eq!(probert::probe_mode(f), Ok(Mode::Fast));
    assert_eq!(probert::fast_refusal(f), Ok(None));
    let now = bytes(f, 16);
    assert_eq!(&now[..4], [0xF3, 0x0F, 0x1E, 0xFA], "the endbr64 stays");
    assert_eq!(now[4], 0xE9, "the jump follows it");
    assert_eq!(
        &now[9..],
        &before[9..],
        "the run is 3 instructions, 8 bytes"
    );
    // An indirect call, as through a vtable or a PLT: it lands on the
    // endbr64 (an IBT target) and runs into the jump.
    let fp: unsafe extern "C" fn(u64) -> u64 = std::hint::black_box(s_endbr);
    for x in 0..10 {
        assert_eq!(unsafe { fp(x) }, x + 5);
    }
    assert_eq!(unsafe { s_endbr(1) }, 6);
    assert_eq!(HITS.load(Ordering::SeqCst), 11);
    assert_eq!(
        RIP.load(Ordering::SeqCst),
        f as u64,
        "handlers see the entry"
    );
    assert_eq!(ADDR.load(Ordering::SeqCst), f);
    probert::detach(id).unwrap();
    assert_eq!(bytes(f, 16), before);
});

isolated!(a_fast_stub_is_not_reused_while_a_thread_blocks_in_it, {
    // The run holds a `syscall`: a thread that entered through the jump
    // blocks inside the site stub's copy of it. Detaching retires the stub;
    // recycling must keep it (a thread scan sees the thread inside) until
    // the thread has left. A stub reused early would be poisoned with ud2
    // and crash the thread when its read returns.
    static HITS: AtomicU64 = AtomicU64::new(0);
    let f = at!(s_read);
    let before = bytes(f, 8);
    let id = unsafe { probert::attach(f, count, counter(&HITS)) }.unwrap();
    assert_eq!(probert::probe_mode(f), Ok(Mode::Fast));
    let (r, w) = pipe();
    let (reader, tid) = reader_in_read(r);
    let pc = blocked_in_read(tid).unwrap();
    assert!(!(f..f + 8).contains(&pc), "blocked in the stub, at {pc:#x}");
    assert_eq!(HITS.load(Ordering::SeqCst), 1);
    probert::detach(id).unwrap();
    assert_eq!(bytes(f, 8), before);
    probert::recycle_stubs().unwrap();
    let (grace, scan) = probert::retired_stubs();
    assert!(grace + scan >= 1, "the stub the reader is in stays retired");
    assert_eq!(unsafe { libc::write(w, b"x".as_ptr().cast(), 1) }, 1);
    assert_eq!(
        reader.join().unwrap(),
        (1, b'x'),
        "the reader left the stub intact"
    );
    probert::recycle_stubs().unwrap();
    probert::recycle_stubs().unwrap();
    assert_eq!(probert::retired_stubs(), (0, 0), "reusable once it left");
});

isolated!(
    a_thread_in_a_retired_stub_that_continues_inside_the_run_is_seen,
    {
        // A probe inside the run demotes the entry's site; the reader then runs
        // the `xor` from the demoted site's stub and blocks in the stub of the
        // probe at the `syscall`, which continues at the `nop`, inside the run.
        // Both probes go; a new one at the entry must not write its jump over
        // the run while the reader can still come back into it from that
        // retired stub.
        static HITS: AtomicU64 = AtomicU64::new(0);
        let f = at!(s_read);
        let before = bytes(f, 8);
        let entry = unsafe { probert::attach(f, count, counter(&HITS)) }.unwrap();
        assert_eq!(probert::probe_mode(f), Ok(Mode::Fast));
        let inner = unsafe { probert::attach(f + 2, count, counter(&HITS)) }.unwrap();
        assert_eq!(probert::probe_mode(f), Ok(Mode::Trap), "demoted");
        let (r, w) = pipe();
        let (reader, tid) = reader_in_read(r);
        let pc = blocked_in_read(tid).unwrap();
        assert!(!(f..f + 8).contains(&pc), "blocked in a stub, at {pc:#x}");
        assert_eq!(HITS.load(Ordering::SeqCst), 2);
        probert::detach_batch(&[entry, inner]).unwrap();
        assert_eq!(bytes(f, 8), before);
        let id = unsafe { probert::attach(f, count, counter(&HITS)) }.unwrap();
        assert_eq!(
            probert::probe_mode(f),
            Ok(Mode::Trap),
            "the reader may come back inside the run"
        );
        assert_eq!(&bytes(f, 5)[1..], &before[1..5], "the run's tail is intact");
        assert_eq!(unsafe { libc::write(w, b"x".as_ptr().cast(), 1) }, 1);
        assert_eq!(reader.join().unwrap(), (1, b'x'), "the reader came back");
        assert_eq!(HITS.load(Ordering::SeqCst), 2, "it entered before");
        // Gone from the stub: the site may go fast now.
        probert::sync().unwrap();
        assert_eq!(probert::probe_mode(f), Ok(Mode::Fast), "retried");
        let (r, w) = pipe();
        assert_eq!(unsafe { libc::write(w, b"y".as_ptr().cast(), 1) }, 1);
        let mut byte = 0u8;
        assert_eq!(unsafe { s_read(r, &mut byte, 1) }, 1);
        assert_eq!(byte, b'y');
        assert_eq!(HITS.load(Ordering::SeqCst), 3);
        probert::detach(id).unwrap();
        assert_eq!(bytes(f, 8), before);
    }
);

/// Threads hammering `s_run` until `stop`: each returns its calls.
fn hammer(stop: &'static AtomicBool, threads: usize) -> Vec<std::thread::JoinHandle<u64>> {
    (0..threads)
        .map(|t| {
            std::thread::spawn(move || {
                let mut calls = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for i in 0..256 {
                        let x = calls + i + t as u64;
                        assert_eq!(unsafe { s_run(x) }, x + 3);
                    }
                    calls += 256;
                }
                calls
            })
        })
        .collect()
}

isolated!(detach_while_threads_run_the_stub, {
    static CHURN: AtomicU64 = AtomicU64::new(0);
    static STEADY: AtomicU64 = AtomicU64::new(0);
    static STOP1: AtomicBool = AtomicBool::new(false);
    static STOP2: AtomicBool = AtomicBool::new(false);
    const CYCLES: usize = 60;
    let f = at!(s_run);
    let before = bytes(f, 16);
    let attach = |mode: Mode| unsafe { probert::attach_ex(f, count, counter(&CHURN), mode) };
    // Until the jump is written the hammering threads take the trap path,
    // and a scan signal often arrives together with a SIGTRAP: the trap's
    // frame, at the byte after the int3 (inside the run), lies under the
    // scan handler. Such a frame is not yet looked up and resumes in the
    // stub, and the scan knows it (interrupted at the trap handler's
    // entry); a trap already looked up says the int3 itself. Before that,
    // every attach here took 40-65 ms and about 1 in 300 stayed on the trap
    // path. FAST attaches must now never be refused.
    let mut fast = 0;
    // 1. The site comes and goes while two threads run its stub: each
    //    removal retires a stub threads may be in, and recycling (stubs
    //    freed are poisoned with ud2) must wait for them.
    let threads = hammer(&STOP1, 2);
    for i in 0..CYCLES {
        let a = attach(Mode::Auto).unwrap();
        fast += usize::from(probert::probe_mode(f) == Ok(Mode::Fast));
        match i % 4 {
            0 => probert::detach(a).unwrap(),
            1 => match attach(Mode::Fast) {
                Ok(b) => probert::detach_batch(&[a, b]).unwrap(),
                Err(e) => panic!("a FAST attach on a hammered run was refused: {e}"),
            },
            2 => {
                probert::detach_nosync(a).unwrap();
                probert::sync().unwrap();
            }
            _ => {
                let b = attach(Mode::Trap).unwrap();
                assert_eq!(probert::probe_mode(f), Ok(Mode::Trap));
                probert::detach(b).unwrap();
                probert::detach(a).unwrap();
                probert::recycle_stubs().unwrap();
            }
        }
    }
    STOP1.store(true, Ordering::SeqCst);
    let calls1: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(bytes(f, 16), before);
    assert!(
        fast > CYCLES / 2,
        "the site was fast in {fast} of {CYCLES} cycles"
    );
    // 2. A consumer attached throughout sees every call exactly once while
    //    others come and go (the site switching between trap and fast).
    let steady = unsafe { probert::attach(f, count, counter(&STEADY)) }.unwrap();
    assert_eq!(probert::probe_mode(f), Ok(Mode::Fast));
    let threads = hammer(&STOP2, 2);
    let mut switched = 0;
    for i in 0..CYCLES {
        let mode = [Mode::Auto, Mode::Trap, Mode::Fast][i % 3];
        let a = match attach(mode) {
            Ok(a) => a,
            Err(e) => panic!("a {mode:?} attach on a hammered run was refused: {e}"),
        };
        switched += usize::from(probert::probe_mode(f) == Ok(Mode::Trap));
        let b = attach(Mode::Auto).unwrap();
        match i % 2 {
            0 => probert::detach_batch(&[a, b]).unwrap(),
            _ => {
                probert::detach(b).unwrap();
                probert::detach(a).unwrap();
            }
        }
    }
    STOP2.store(true, Ordering::SeqCst);
    let calls2: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(
        switched >= CYCLES / 3,
        "the site went to the trap path {switched} times"
    );
    assert_eq!(
        STEADY.load(Ordering::SeqCst),
        calls2,
        "exactly once per call"
    );
    assert_eq!(probert::stats(steady).unwrap().hits, calls2);
    probert::detach(steady).unwrap();
    assert_eq!(bytes(f, 16), before);
    eprintln!(
        "calls: {calls1} then {calls2}; churn hits {}; fast in {fast} of {CYCLES}",
        CHURN.load(Ordering::SeqCst)
    );
});

isolated!(a_probe_inside_a_run_demotes_its_site, {
    static ENTRY: AtomicU64 = AtomicU64::new(0);
    static INNER: AtomicU64 = AtomicU64::new(0);
    static STOP: AtomicBool = AtomicBool::new(false);
    static INNER_ON: AtomicBool = AtomicBool::new(false);
    static CALLS: AtomicU64 = AtomicU64::new(0);
    static CALLS_AFTER: AtomicU64 = AtomicU64::new(0);
    let f = at!(s_demote);
    let before = bytes(f, 16);
    // A FAST consumer keeps the run: a probe inside it is refused.
    let fast = unsafe { probert::attach_ex(f, count, counter(&ENTRY), Mode::Fast) }.unwrap();
    let why = refusal(unsafe { probert::attach(f + 1, count, counter(&INNER)) });
    assert!(why.contains("a FAST probe at"), "{why}");
    assert_eq!(probert::probe_mode(f), Ok(Mode::Fast));
    assert_eq!(probert::probe_mode(f + 1), Err(Error::NotFound));
    probert::detach(fast).unwrap();
    assert_eq!(bytes(f, 16), before);
    ENTRY.store(0, Ordering::SeqCst);

    let entry = unsafe { probert::attach(f, count, counter(&ENTRY)) }.unwrap();
    assert_eq!(probert::probe_mode(f), Ok(Mode::Fast));
    assert_eq!(bytes(f, 1), [0xE9]);
    let hammer = std::thread::spawn(|| {
        let mut x = 0u64;
        while !STOP.load(Ordering::SeqCst) {
            let after = INNER_ON.load(Ordering::SeqCst);
            assert_eq!(unsafe { s_demote(x) }, x + 4);
            CALLS.fetch_add(1, Ordering::SeqCst);
            if after {
                CALLS_AFTER.fetch_add(1, Ordering::SeqCst);
            }
            x += 1;
        }
    });
    wait_for("calls through the fast site", || {
        CALLS.load(Ordering::SeqCst) > 10_000
    });
    // `mov rbp, rsp` is the run's second instruction.
    let inner = unsafe { probert::attach(f + 1, count, counter(&INNER)) }.unwrap();
    INNER_ON.store(true, Ordering::SeqCst);
    // The entry's first instruction (`push rbp`) is too short for a jump.
    assert_eq!(probert::probe_mode(f), Ok(Mode::Trap));
    assert_eq!(bytes(f, 1), [0xCC]);
    eprintln!("the inner site is {:?}", probert::probe_mode(f + 1));
    wait_for("calls after the inner attach", || {
        CALLS_AFTER.load(Ordering::SeqCst) > 10_000
    });
    STOP.store(true, Ordering::SeqCst);
    hammer.join().unwrap();
    let (total, after) = (
        CALLS.load(Ordering::SeqCst),
        CALLS_AFTER.load(Ordering::SeqCst),
    );
    assert_eq!(
        ENTRY.load(Ordering::SeqCst),
        total,
        "the entry saw every call"
    );
    let inner_hits = INNER.load(Ordering::SeqCst);
    assert!(
        (after..=total).contains(&inner_hits),
        "inner hits {inner_hits}: {after} calls after its attach, {total} in all"
    );
    assert_eq!(unsafe { s_demote(1) }, 5);
    assert_eq!(ENTRY.load(Ordering::SeqCst), total + 1);
    assert_eq!(INNER.load(Ordering::SeqCst), inner_hits + 1);
    probert::detach_batch(&[entry, inner]).unwrap();
    assert_eq!(bytes(f, 16), before);
});

extern "C" fn times_ten(x: u64) -> u64 {
    x * 10
}

isolated!(a_tail_call_through_a_function_pointer_goes_fast, {
    // In position-independent code every code address data can hold is
    // named by a dynamic relocation, so a jump through a loaded pointer
    // lands on a function start or one of those: the entry may be
    // displaced whole.
    static HITS: AtomicU64 = AtomicU64::new(0);
    unsafe { *std::ptr::addr_of_mut!(s_tail_slot) = times_ten as *const () as usize };
    let f = at!(s_tail);
    let before = bytes(f, 16);
    let id = unsafe { probert::attach(f, count, counter(&HITS)) }.unwrap();
    assert_eq!(probert::probe_mode(f), Ok(Mode::Fast));
    assert_eq!(probert::fast_refusal(f), Ok(None));
    assert_eq!(bytes(f, 1), [0xE9]);
    for x in 0..100 {
        assert_eq!(unsafe { s_tail(x) }, (x + 1) * 10);
    }
    assert_eq!(HITS.load(Ordering::SeqCst), 100);
    probert::detach(id).unwrap();
    assert_eq!(bytes(f, 16), before);
});

isolated!(
    a_pointer_a_relocation_names_inside_the_run_keeps_the_trap_path,
    {
        // The slot holds the address 3 bytes into the function: the jump
        // through it would land inside a 5-byte jump at the entry.
        static HITS: AtomicU64 = AtomicU64::new(0);
        let f = at!(s_tail_into);
        let before = bytes(f, 16);
        let why = fast_refusal(f);
        assert!(why.contains("lands inside the displaced range"), "{why}");
        let id = unsafe { probert::attach(f, count, counter(&HITS)) }.unwrap();
        assert_eq!(probert::probe_mode(f), Ok(Mode::Trap));
        assert_eq!(unsafe { s_tail_into(0) }, 3, "twice through the slot");
        assert_eq!(unsafe { s_tail_into(7) }, 8);
        assert_eq!(HITS.load(Ordering::SeqCst), 2, "entered twice");
        probert::detach(id).unwrap();
        assert_eq!(bytes(f, 16), before);
    }
);

isolated!(a_computed_goto_is_not_taken_for_a_tail_call, {
    // Its target is its own label plus an offset no relocation names: a
    // function that takes its own code's address and jumps through a
    // pointer is not proven.
    static HITS: AtomicU64 = AtomicU64::new(0);
    let block = unsafe { s_goto_base };
    let before = bytes(block, 8);
    let why = fast_refusal(block);
    assert!(why.contains("takes addresses of its own code"), "{why}");
    let id = unsafe { probert::attach(block, count, counter(&HITS)) }.unwrap();
    assert_eq!(probert::probe_mode(block), Ok(Mode::Trap));
    assert_eq!(
        unsafe { s_goto() },
        2,
        "it jumped past the probed block's start"
    );
    assert_eq!(HITS.load(Ordering::SeqCst), 0);
    probert::detach(id).unwrap();
    assert_eq!(bytes(block, 8), before);
});

/// Debian's libsqlite3, loaded: the address of a symbol (0 if none), or
/// `None` (said on stderr) where the library is not installed.
fn sqlite_symbols() -> Option<impl Fn(&std::ffi::CStr) -> usize> {
    let lib = c"libsqlite3.so.0";
    let h = unsafe { libc::dlopen(lib.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) } as usize;
    if h == 0 {
        eprintln!("no libsqlite3.so.0: skipped");
        return None;
    }
    Some(move |name: &std::ffi::CStr| unsafe {
        libc::dlsym(h as *mut libc::c_void, name.as_ptr()) as usize
    })
}

isolated!(
    sqlite_mutex_methods_tail_called_through_its_config_go_fast,
    {
        // Real code: SQLite's `sqlite3_mutex_enter` is `test rdi, rdi; je
        // out; mov rax, [rip + config]; jmp [rax + 0x80]`, a tail call through
        // the mutex methods it was configured with.
        let Some(sqlite) = sqlite_symbols() else {
            return;
        };
        let sym = |name: &std::ffi::CStr| {
            let p = sqlite(name);
            assert_ne!(p, 0, "{name:?}");
            p
        };
        type Alloc = unsafe extern "C" fn(i32) -> *mut libc::c_void;
        type Op = unsafe extern "C" fn(*mut libc::c_void);
        type Try = unsafe extern "C" fn(*mut libc::c_void) -> i32;
        let alloc: Alloc = unsafe { std::mem::transmute(sym(c"sqlite3_mutex_alloc")) };
        let (enter, leave) = (sym(c"sqlite3_mutex_enter"), sym(c"sqlite3_mutex_leave"));
        let try_enter: Try = unsafe { std::mem::transmute(sym(c"sqlite3_mutex_try")) };
        let free: Op = unsafe { std::mem::transmute(sym(c"sqlite3_mutex_free")) };
        let m = unsafe { alloc(1) }; // SQLITE_MUTEX_RECURSIVE
        assert!(!m.is_null());
        static ENTERS: AtomicU64 = AtomicU64::new(0);
        static LEAVES: AtomicU64 = AtomicU64::new(0);
        let before = (bytes(enter, 16), bytes(leave, 16));
        let ids = [
            unsafe { probert::attach(enter, count, counter(&ENTERS)) }.unwrap(),
            unsafe { probert::attach(leave, count, counter(&LEAVES)) }.unwrap(),
        ];
        for f in [enter, leave] {
            assert_eq!(probert::probe_mode(f), Ok(Mode::Fast), "{f:#x}");
            assert_eq!(probert::fast_refusal(f), Ok(None));
        }
        let (enter_fn, leave_fn): (Op, Op) = unsafe {
            (
                std::mem::transmute::<usize, Op>(enter),
                std::mem::transmute::<usize, Op>(leave),
            )
        };
        let shared = m as usize;
        let t = std::thread::spawn(move || {
            let m = shared as *mut libc::c_void;
            for _ in 0..1000 {
                unsafe { enter_fn(m) };
                unsafe { leave_fn(m) };
            }
        });
        for _ in 0..1000 {
            unsafe { enter_fn(m) };
            // Recursive: the lock holder may enter again.
            unsafe { enter_fn(m) };
            assert_eq!(unsafe { try_enter(m) }, 0, "SQLITE_OK");
            unsafe { leave_fn(m) };
            unsafe { leave_fn(m) };
            unsafe { leave_fn(m) };
        }
        t.join().unwrap();
        unsafe { enter_fn(std::ptr::null_mut()) }; // the je: no mutex, no call
        assert_eq!(ENTERS.load(Ordering::SeqCst), 3001);
        assert_eq!(LEAVES.load(Ordering::SeqCst), 4000);
        probert::detach_batch(&ids).unwrap();
        assert_eq!((bytes(enter, 16), bytes(leave, 16)), before);
        unsafe { free(m) };
    }
);

isolated!(
    a_function_shorter_than_the_jump_takes_the_padding_after_it,
    {
        static HITS: AtomicU64 = AtomicU64::new(0);
        let f = at!(s_short);
        assert_eq!(at!(s_after_short), f + 16);
        let before = bytes(f, 16);
        assert_eq!(before[4], 0x66, "a long nop after the ret: {before:x?}");
        let id = unsafe { probert::attach(f, count, counter(&HITS)) }.unwrap();
        assert_eq!(probert::probe_mode(f), Ok(Mode::Fast));
        assert_eq!(bytes(f, 1), [0xE9]);
        assert_eq!(
            &bytes(f, 16)[5..],
            &before[5..],
            "only the jump's bytes change"
        );
        for x in 0..100 {
            assert_eq!(unsafe { s_short(x) }, x + 1);
            assert_eq!(unsafe { s_after_short(x) }, x + 2);
        }
        assert_eq!(HITS.load(Ordering::SeqCst), 100);
        // The next function, probed too, right after the padding.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let next = unsafe { probert::attach(f + 16, count, counter(&NEXT)) }.unwrap();
        assert_eq!(unsafe { s_after_short(1) }, 3);
        assert_eq!(NEXT.load(Ordering::SeqCst), 1);
        probert::detach_batch(&[id, next]).unwrap();
        assert_eq!(bytes(f, 16), before, "the padding byte restored too");
        assert_eq!(unsafe { s_short(1) }, 2);
    }
);

isolated!(sqlite_functions_shorter_than_the_jump_go_fast, {
    // Real code: `sqlite3BitvecSize` is `mov eax, [rdi]; ret` (3 bytes),
    // `sqlite3NoopDestructor` a lone `ret`; gcc pads both to 16 bytes with
    // long nops.
    let Some(sym) = sqlite_symbols() else {
        return;
    };
    let (size, noop) = (sym(c"sqlite3BitvecSize"), sym(c"sqlite3NoopDestructor"));
    if size == 0 || noop == 0 {
        eprintln!("this libsqlite3 exports neither: skipped");
        return;
    }
    static SIZE: AtomicU64 = AtomicU64::new(0);
    static NOOP: AtomicU64 = AtomicU64::new(0);
    let before = (bytes(size, 16), bytes(noop, 16));
    let ids = [
        unsafe { probert::attach(size, count, counter(&SIZE)) }.unwrap(),
        unsafe { probert::attach(noop, count, counter(&NOOP)) }.unwrap(),
    ];
    for f in [size, noop] {
        assert_eq!(probert::probe_mode(f), Ok(Mode::Fast), "{f:#x}");
        assert_eq!(bytes(f, 1), [0xE9]);
    }
    let size_fn: unsafe extern "C" fn(*const u32) -> u32 = unsafe { std::mem::transmute(size) };
    let noop_fn: unsafe extern "C" fn(*mut libc::c_void) = unsafe { std::mem::transmute(noop) };
    for x in 0..500u32 {
        assert_eq!(unsafe { size_fn(&x) }, x);
        unsafe { noop_fn(std::ptr::null_mut()) };
    }
    assert_eq!(SIZE.load(Ordering::SeqCst), 500);
    assert_eq!(NOOP.load(Ordering::SeqCst), 500);
    probert::detach_batch(&ids).unwrap();
    assert_eq!((bytes(size, 16), bytes(noop, 16)), before);
});

isolated!(sqlite_switch_functions_go_fast_with_exact_counts, {
    // Real code whose jump tables took the last refinements of the
    // indirect-jump analysis: `sqlite3_str_vappendf` (printf; its table
    // base is set once before the format loop) and `sqlite3Parser` (the
    // parser's reduce switch, whose index is compared through a copy).
    // Their entries are served by trap first (the exact reference), then
    // must go fast in AUTO with the same counts and results. In a release
    // build the counting handler needs nothing saved: the fast hits are the
    // trampoline's lean case, on code nobody here wrote.
    if !cfg!(debug_assertions) {
        assert_eq!(probert::__fuzz::handler_classes(count), "none");
    }
    let Some(sym) = sqlite_symbols() else {
        return;
    };
    let (printf, parser) = (sym(c"sqlite3_str_vappendf"), sym(c"sqlite3Parser"));
    if printf == 0 || parser == 0 {
        eprintln!("this libsqlite3 exports neither: skipped");
        return;
    }
    type Exec = unsafe extern "C" fn(
        *mut libc::c_void,
        *const libc::c_char,
        Option<unsafe extern "C" fn(*mut libc::c_void, i32, *mut *mut i8, *mut *mut i8) -> i32>,
        *mut libc::c_void,
        *mut *mut i8,
    ) -> i32;
    let open: unsafe extern "C" fn(*const libc::c_char, *mut *mut libc::c_void) -> i32 =
        unsafe { std::mem::transmute(sym(c"sqlite3_open")) };
    let exec: Exec = unsafe { std::mem::transmute(sym(c"sqlite3_exec")) };
    let close: unsafe extern "C" fn(*mut libc::c_void) -> i32 =
        unsafe { std::mem::transmute(sym(c"sqlite3_close")) };
    unsafe extern "C" fn row(
        out: *mut libc::c_void,
        n: i32,
        vals: *mut *mut i8,
        _: *mut *mut i8,
    ) -> i32 {
        let out = unsafe { &mut *(out as *mut String) };
        for i in 0..n as usize {
            let v = unsafe { *vals.add(i) };
            if !v.is_null() {
                out.push_str(&unsafe { std::ffi::CStr::from_ptr(v) }.to_string_lossy());
            }
            out.push('|');
        }
        0
    }
    let workload = || {
        let mut db = std::ptr::null_mut();
        assert_eq!(unsafe { open(c":memory:".as_ptr(), &mut db) }, 0);
        let mut out = String::new();
        let sql = c"CREATE TABLE t(a INTEGER, b TEXT);
            WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 200)
              INSERT INTO t SELECT x, printf('%05d-%s-%.2f', x, hex(x), x / 7.0) FROM c;
            SELECT count(*), sum(a), max(b) FROM t WHERE b LIKE '%-C%';
            SELECT printf('%-8s|%x|%c', b, a, 65 + a % 26) FROM t WHERE a % 50 = 0;";
        let rc = unsafe {
            exec(
                db,
                sql.as_ptr(),
                Some(row),
                (&mut out as *mut String).cast(),
                std::ptr::null_mut(),
            )
        };
        assert_eq!(rc, 0);
        assert_eq!(unsafe { close(db) }, 0);
        out
    };
    let reference = workload();
    static PRINTF: AtomicU64 = AtomicU64::new(0);
    static PARSER: AtomicU64 = AtomicU64::new(0);
    let before = (bytes(printf, 16), bytes(parser, 16));
    let attach = |mode| {
        [
            unsafe { probert::attach_ex(printf, count, counter(&PRINTF), mode) }.unwrap(),
            unsafe { probert::attach_ex(parser, count, counter(&PARSER), mode) }.unwrap(),
        ]
    };
    let ids = attach(Mode::Trap);
    assert_eq!(workload(), reference);
    let trap = (
        PRINTF.swap(0, Ordering::SeqCst),
        PARSER.swap(0, Ordering::SeqCst),
    );
    assert!(
        trap.0 > 200 && trap.1 > 4,
        "the workload reaches both: {trap:?}"
    );
    probert::detach_batch(&ids).unwrap();
    let ids = attach(Mode::Auto);
    probert::sync().unwrap();
    for f in [printf, parser] {
        assert_eq!(
            probert::probe_mode(f),
            Ok(Mode::Fast),
            "{f:#x}: {:?}",
            probert::fast_refusal(f)
        );
    }
    assert_eq!(workload(), reference);
    let fast = (PRINTF.load(Ordering::SeqCst), PARSER.load(Ordering::SeqCst));
    assert_eq!(fast, trap, "the fast path's counts");
    probert::detach_batch(&ids).unwrap();
    assert_eq!((bytes(printf, 16), bytes(parser, 16)), before);
});

isolated!(
    every_instruction_of_zlib_in_batches_counts_exactly_and_restores_its_code,
    {
        // The control plane at scale, on real code: every instruction boundary
        // of Debian's zlib (about 18,000) attached in batches — first all on the
        // trap path, the exact reference, then in AUTO, where the sites that can
        // be fast are — each with a counter of its own; a small compress and
        // uncompress gives the same bytes and every boundary the same count
        // both times; one `detach_batch` puts back every byte of the library's
        // code.
        let lib = c"libz.so.1";
        let h = unsafe { libc::dlopen(lib.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if h.is_null() {
            eprintln!("no libz.so.1: skipped");
            return;
        }
        let sym = |name: &std::ffi::CStr| {
            let p = unsafe { libc::dlsym(h, name.as_ptr()) } as usize;
            assert_ne!(p, 0, "{name:?}");
            p
        };
        type Compress =
            unsafe extern "C" fn(*mut u8, *mut libc::c_ulong, *const u8, libc::c_ulong, i32) -> i32;
        type Uncompress =
            unsafe extern "C" fn(*mut u8, *mut libc::c_ulong, *const u8, libc::c_ulong) -> i32;
        let compress: Compress = unsafe { std::mem::transmute(sym(c"compress2")) };
        let uncompress: Uncompress = unsafe { std::mem::transmute(sym(c"uncompress")) };
        let workload = || {
            let text: Vec<u8> = (0..600u32)
                .map(|i| b"probert zlib "[(i % 13) as usize] ^ (i / 97) as u8)
                .collect();
            let mut packed = vec![0u8; 1024];
            let mut n = packed.len() as libc::c_ulong;
            assert_eq!(
                unsafe {
                    compress(
                        packed.as_mut_ptr(),
                        &mut n,
                        text.as_ptr(),
                        text.len() as _,
                        6,
                    )
                },
                0
            );
            packed.truncate(n as usize);
            let mut back = vec![0u8; text.len()];
            let mut m = back.len() as libc::c_ulong;
            assert_eq!(
                unsafe {
                    uncompress(
                        back.as_mut_ptr(),
                        &mut m,
                        packed.as_ptr(),
                        packed.len() as _,
                    )
                },
                0
            );
            assert_eq!(back, text);
            packed
        };
        let reference = workload();
        let funcs = probert::functions("libz.so.1").unwrap();
        let mut bounds = Vec::new();
        for f in &funcs {
            if let Ok(insns) = probert::instructions(f.start) {
                bounds.extend(insns.into_iter().filter(|&a| a < f.end));
            }
        }
        bounds.sort_unstable();
        bounds.dedup();
        assert!(bounds.len() > 10_000, "{} boundaries", bounds.len());
        let (lo, hi) = (
            funcs.iter().map(|f| f.start).min().unwrap(),
            funcs.iter().map(|f| f.end).max().unwrap(),
        );
        let code = bytes(lo, hi - lo);
        let counts: &'static [AtomicU64] =
            Box::leak((0..bounds.len()).map(|_| AtomicU64::new(0)).collect());
        let attach_all = |mode: Mode| {
            let mut ids = Vec::new();
            let mut at = Vec::new();
            for (k, chunk) in bounds.chunks(4096).enumerate() {
                let reqs: Vec<(usize, probert::AttachReq)> = chunk
                    .iter()
                    .enumerate()
                    .map(|(i, &addr)| {
                        let c = &counts[k * 4096 + i];
                        (
                            k * 4096 + i,
                            probert::AttachReq {
                                addr,
                                handler: count,
                                user_data: counter(c),
                            },
                        )
                    })
                    .collect();
                // A batch is all or nothing: an address it refuses is set
                // aside and the batch tried again without it.
                let mut todo = reqs;
                loop {
                    let plain: Vec<probert::AttachReq> = todo.iter().map(|r| r.1).collect();
                    let opts = probert::AttachOptions {
                        mode,
                        ..Default::default()
                    };
                    match probert::attach_batch_with(&plain, opts) {
                        Ok(got) => {
                            ids.extend(got);
                            at.extend(todo.iter().map(|r| r.0));
                            break;
                        }
                        Err((i, _)) => {
                            todo.remove(i);
                        }
                    }
                }
            }
            (ids, at)
        };
        let (ids, trap_at) = attach_all(Mode::Trap);
        assert!(
            ids.len() * 100 >= bounds.len() * 99,
            "{} of {} attached",
            ids.len(),
            bounds.len()
        );
        assert_eq!(workload(), reference);
        let trap: Vec<u64> = counts.iter().map(|c| c.swap(0, Ordering::SeqCst)).collect();
        assert!(
            trap.iter().sum::<u64>() > 10_000,
            "the workload runs probed instructions"
        );
        probert::detach_batch(&ids).unwrap();
        assert_eq!(probert::probe_count(), 0);
        assert!(
            bytes(lo, hi - lo) == code,
            "every byte restored after the trap pass"
        );
        let (ids, auto_at) = attach_all(Mode::Auto);
        assert_eq!(auto_at, trap_at, "the same boundaries attach");
        probert::sync().unwrap();
        let fast = auto_at
            .iter()
            .filter(|&&k| probert::probe_mode(bounds[k]) == Ok(Mode::Fast))
            .count();
        assert!(fast > 1000, "{fast} sites fast");
        assert_eq!(workload(), reference);
        for &k in &auto_at {
            assert_eq!(
                counts[k].load(Ordering::SeqCst),
                trap[k],
                "hits at {:#x} ({:?})",
                bounds[k],
                probert::probe_mode(bounds[k])
            );
        }
        probert::detach_batch(&ids).unwrap();
        assert_eq!(probert::probe_count(), 0);
        assert!(bytes(lo, hi - lo) == code, "every byte restored");
        assert_eq!(workload(), reference);
    }
);
