//! # probert — probes on live code, in process
//!
//! probert lets a program (a JIT, a VM, any C/C++/Rust host) attach *probes* to
//! any instruction of its own code — ELF code and code it generates at run
//! time — and get a callback with the thread's registers every time the
//! instruction executes. No ptrace, no root, no restart.
//!
//! ```no_run
//! use probert::{Action, Hit};
//!
//! #[inline(never)]
//! extern "C" fn work(x: u64) -> u64 { x * 2 }
//!
//! static SEEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
//!
//! // SAFETY: `work` is a function of this program; the handler is
//! // async-signal-safe (one atomic add).
//! let probe = unsafe {
//!     probert::probe(work as usize, |hit: &mut Hit| {
//!         SEEN.fetch_add(hit.regs().arg(0).unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
//!         Action::Continue
//!     })
//! }?;
//! work(21);
//! drop(probe); // detaches and waits until the handler can no longer run
//! assert_eq!(SEEN.load(std::sync::atomic::Ordering::Relaxed), 21);
//! # Ok::<(), probert::Error>(())
//! ```
//!
//! # How it works
//!
//! **Patching.** Attaching writes `int3` (`0xCC`) over the first byte of the
//! instruction — one byte, so other threads running the code see the old
//! instruction or the trap, never a mix. Code is written through a cached
//! `/proc/self/mem` descriptor (no protection change, works under
//! `PR_SET_MDWE`), falling back to a brief RWX → RX protection change; code
//! pages are never made non-executable. JIT regions may supply their own
//! write callback (e.g. for a dual-mapped memfd whose executable view is never
//! writable). Detaching the last consumer writes the original byte back.
//!
//! **The trap path.** probert's `SIGTRAP` handler looks the address up in the
//! probe index, calls the consumers with the registers, and resumes at the
//! displaced instruction: emulated in the handler (`call` — so the callee
//! sees the original return address —, `jmp`, `jcc`, `loop`, `push`, `ret`,
//! `nop`, `endbr64`), or run *out of line* from a stub holding a copy
//! relocated to the stub's address followed by a jump back. No single-step,
//! ever. A trap that is not probert's goes to the handler installed before
//! (or to the default action).
//!
//! **The fast path.** Where the function's flow proves it safe (no branch
//! lands inside, no call returns inside, every instruction relocates), the
//! fewest whole instructions covering 5 bytes are displaced into a per-site
//! stub and the site becomes a `jmp` to it: the stub's trampoline saves the
//! registers the consumers' code may change into the same frame the trap
//! path fills, dispatches (the common case inline, in assembly), and runs
//! the displaced instructions — no signal. That is [`Mode::Auto`]'s choice
//! wherever it can; [`Mode::Trap`] keeps a site on `int3`, [`Mode::Fast`]
//! insists. Sites switch with the `int3`-first protocol of cross-modifying
//! code, cores serialised between steps, and a thread scan before the
//! displaced run is overwritten (the `site` module's docs give the
//! argument). In a position-independent module (a shared library, a PIE)
//! a jump through a code pointer — a tail call through a function pointer,
//! the GOT, a vtable — is taken to land on a function start, a return
//! address, or an address the module's dynamic relocations name (the only
//! code addresses such a module's data can hold), unless the function
//! takes addresses of its own code (a computed goto); in an `ET_EXEC`
//! executable and in JIT code such a jump makes runs of several
//! instructions refused in its function. A function shorter than the jump
//! may displace the alignment padding after it.
//!
//! **The index** is read by the handler without locks, and the handler may
//! have interrupted the writer on its own thread, so it can never wait: the
//! index is a hash table kept in two copies behind a *latch* sequence counter
//! (the kernel's `seqcount_latch`), so a lookup always reads a consistent copy
//! and finishes in bounded steps (the `map` module's docs).
//!
//! **Read-side sections and grace periods.** Every handler call runs inside a
//! read-side section that takes no lock and writes only its own thread's
//! cache line. [`sync`] waits one *grace period* — until every section that
//! began before it has ended — using one `membarrier` and a scan of the
//! section table. Detaching consumers is cheap and batched: [`detach_nosync`]
//! any number, then one [`sync`]; [`detach_batch`] does both. Trampoline
//! stubs are reused only after, in addition, a thread scan has seen no thread
//! inside them.
//!
//! # Contracts
//!
//! - After [`detach`], [`detach_batch`] or [`sync`] returns, the handler is
//!   never called again for those consumers and their user data may be freed.
//! - After [`region_remove`] returns, probert never reads or writes that
//!   memory again.
//! - Every execution of a probed instruction, by any thread, while a consumer
//!   is attached for the whole duration of that execution, calls that consumer
//!   exactly once — except a *missed* hit: a probe hit by a thread that is
//!   already running a handler (a consumer called probed code) runs the
//!   instruction but not the consumers, and counts in [`Stats::missed`].
//! - Detaching everything restores the code byte for byte.
//! - Bad input returns an [`Error`] and changes nothing.
//!
//! # Handlers run in signal context
//!
//! A handler on the trap path runs inside a `SIGTRAP` handler, so it must be
//! **async-signal-safe**: no allocation, no locks another thread may hold, no
//! `println!`, no panics (a panic in a handler aborts the process: it cannot
//! unwind through a signal frame). Atomics, `write(2)`, reading and writing
//! the registers are fine. A handler may call probed code (counted as
//! missed), but must not call [`sync`], [`detach`] or anything that waits for
//! a grace period — those return an error when called from a handler.
//!
//! On the fast path a handler runs in normal context, called from a stub
//! that saved the general-purpose registers, the flags and xmm0–15 — not the
//! upper halves of ymm/zmm (the kernel saves the whole vector state around a
//! signal handler, the stub does not). A handler built to use AVX (e.g.
//! `-C target-cpu=native`, `-mavx2`) must not be attached to code that keeps
//! live AVX values across the probed instruction; use [`Mode::Trap`] there.
//!
//! # The parts
//!
//! - `writer`: the writer lock, the probe records and their index, the
//!   consumer lists, and the API entry points; `consumer`: the handles and
//!   the writer's consumer slots;
//! - `site`: the life of one patched site (plain → trap ⇄ fast → plain) and
//!   the protocol that switches its bytes; `patch`: code writes batched per
//!   page; `region`: where probes may go and how their bytes are written;
//! - `trap`: the `SIGTRAP` handler; `fast`: the fast path's dispatcher;
//!   `probe`: probe and consumer records and the one dispatcher of both
//!   paths; `map`: the latch-protected index; `grace`: read-side sections
//!   and grace periods; `xol`: the stub pool and when a stub may be reused;
//!   `arena`: the never-unmapped record arrays; `effects`: which register
//!   state a handler may change, from its call graph's machine code;
//! - `arch`: everything that knows an instruction encoding or a register
//!   layout, behind a written interface (its module docs state the contract
//!   hook by hook, and how an aarch64 backend would fill it); `sys`: the only
//!   place that calls libc or makes system calls.
//!
//! # Dependencies
//!
//! - `iced-x86` decodes, classifies and re-encodes instructions; `dynasmrt`
//!   emits stubs and trampolines (`VecAssembler` at the final address); both
//!   run in normal context only (attach), never on a hit.
//! - `crossbeam-utils`: `CachePadded` keeps each thread's read-side slot
//!   alone on its cache lines.
//! - `libc`: types, constants and the libc calls of normal-context code. The
//!   signal path, the code-write path and the index update use raw system
//!   calls instead (`sys::raw`): a probed libc function there would run code
//!   the writer may be switching.
//! - `region` (tests and examples) maps and protects JIT pages. The code
//!   writer cannot use it: it must not call libc (see above) nor allocate.
//! - `object` reads loaded modules' ELF files (symbols, program headers,
//!   build-ids) and `gimli` their call-frame information (`.eh_frame` FDEs:
//!   every function's bounds, stripped or not), on the attach path.
//! - `seize` protects the snapshot of loaded modules and their tables,
//!   which control calls on any thread read while another replaces it. Its
//!   guards initialise per-thread state lazily (allocating, locking), so it
//!   is never entered in signal context: every structure a handler reads is
//!   protected by probert's own read-side sections (`grace`) instead, as
//!   `crossbeam-epoch` would have to be.
//! - `thiserror` derives [`Error`].
//!
//! # The host's signals and threads
//!
//! - A `SIGTRAP` that is not a probe's goes to the disposition probert
//!   replaced, which acts as it would have without probert: a handler is
//!   called, an ignored `kill -TRAP` stays ignored (also when `SIG_IGN` was
//!   inherited across `exec`), the default action (and a foreign `int3`,
//!   which the kernel never lets a process ignore) kills the process.
//!   probert's handler stays installed.
//! - A host that installs its own `SIGTRAP` handler after probert must chain
//!   to probert's and say so ([`declare_chained_sigtrap_handler`]); until it
//!   does, attaching fails with [`Error::Signal`].
//! - Thread scans send a real-time signal, `SIGRTMAX - 1` unless the host
//!   picks another ([`set_scan_signal`], or `PROBERT_SCAN_SIGNAL`) — or
//!   none: a host that forbids foreign signals reports *quiescent points*
//!   from its registered threads instead ([`use_quiescent_points`],
//!   [`register_thread`], [`quiescent`]).
//! - Grace periods use `membarrier`; where it is missing, a barrier that is
//!   just as real (signals to every thread, or the quiescent points;
//!   [`barrier_mechanism`]), or initialisation fails.
//! - `SIGTRAP` is kept out of the signal masks set through the C library
//!   (probert defines `sigprocmask`, `pthread_sigmask` and `sigaction`), and
//!   `posix_spawn`, `posix_spawnp`, `system` and `popen` run a child of
//!   probert's that serves probes until its `execve` (glibc's runs in the
//!   parent's memory with every handler reset: a trap site there would kill
//!   it). Probes on the C library's own definitions of these functions (and
//!   of `pclose`) see only the calls that still reach them. Not covered:
//!   masks set by raw system calls, `pthread_create`'s all-blocked window.
//!   A program's own `vfork` child
//!   inherits probert's handler and works, but thread scans do not wait for
//!   it and its return probes share its parent's shadow stack.
//!
//! # Return probes
//!
//! [`AttachOptions::on_return`] (C: `on_return` in `probert_attach_opts`)
//! adds a return handler to a function-entry probe: one entry hit and one
//! return hit per invocation, with a per-invocation session word
//! ([`Hit::session`], or the typed session of [`probe_returns`]). probert
//! finds every way the function returns in its machine code — each `ret`,
//! following tail jumps into other functions — from the function's extent
//! (ELF symbols and `.eh_frame`, or [`region_functions`] for JIT code), and
//! puts an exit consumer on each, shared by every return probe that needs
//! it. A tail jump through a PLT entry is followed through the slot the
//! dynamic loader bound; one not bound yet (lazy binding, before the
//! first call) leads into the loader's resolver, which may go anywhere, so
//! the attach is refused (`UnsupportedInstruction`, naming the remedy:
//! call the function once first, or `LD_BIND_NOW=1`). A function that is
//! only `endbr64; ret` takes no return probe: its entry probe goes after
//! the `endbr64`, on the `ret` its exit would patch too (refused,
//! `UnsupportedInstruction`; so is any probe that would patch the byte
//! another probe patches).
//! Nothing on the stack changes: unwinders, `backtrace()`,
//! `__builtin_return_address` and C++ exceptions see the program as it is.
//! A per-thread shadow stack pairs returns with entries (by stack pointer),
//! so recursion, nesting and tail calls pair exactly, and an invocation left
//! by `longjmp`, an exception or thread exit is counted *abandoned* once a
//! later entry or return on that thread (or the thread's exit and a
//! [`sync`]) shows it over. A function that jumps to its own entry (a tail
//! call to itself, as SQLite's `sqlite3WhereSplit` makes) chains: each
//! invocation of the chain gets its return hit when the last one returns,
//! innermost first — which also means that such a function, left by
//! `longjmp` and called again from the same call site, has its earlier
//! invocation returned then rather than counted abandoned. The return
//! handler sees the registers just after the `ret` (RIP the return address,
//! RSP above it) and may change them.
//!
//! A `ret` is served without a signal where its epilogue allows an *exit
//! run*: the fewest whole instructions before the `ret` that cover the
//! jump, with it, none of them a branch target (nor the function's entry);
//! or, for the function's last `ret`, the `ret` alone with the alignment
//! padding after the function (nothing executes or jumps there), which
//! leaves the instructions before it to other probes — in a small
//! function, to the entry's own run. They are displaced into an exit stub
//! that runs them, calls the consumers at the `ret`, and returns. Elsewhere the `ret` traps. A probe wanted
//! inside an exit run is refused (`UnsupportedInstruction`) until the return
//! probe is detached; one attached first makes that exit take the trap
//! path instead.
//!
//! # Limitations
//!
//! x86_64 Linux only. A module unloaded (`dlclose`) with probes still
//! attached: its probes are retired at the next control call (their handles
//! and statistics keep working; nothing is written there). A thread scan sees a thread's
//! innermost context and the contexts saved in signal frames above it on the
//! same stack; a context saved on another stack (a handler running on an
//! alternate signal stack, interrupting a stub) is not seen.
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod addr_hash;
mod api;
mod arch;
mod arena;
mod consumer;
mod effects;
mod error;
mod fast;
mod grace;
mod hit;
mod host;
mod layout;
mod lookup;
mod map;
mod patch;
mod probe;
mod region;
mod shadow;
mod sigctx;
mod site;
mod slab_map;
mod sync;
mod sys;
mod trap;
mod writer;
mod xol;

pub use api::{
    attach, attach_batch_with, attach_ex, attach_fn, attach_with, probe, probe_returns,
    AttachOptions, Probe,
};
pub use arch::{Reg, Regs};
pub use consumer::{AttachReq, ConsumerId, Stats};
pub use error::{Error, Result};
pub use hit::{Action, Handler, Hit};
pub use host::{
    barrier_mechanism, quiescent, register_thread, set_scan_signal, thread_offline, thread_online,
    unregister_thread, use_quiescent_points, Barrier, HostThread,
};
pub use lookup::{functions, symbol_addr, Function};
pub use region::{RegionDesc, RegionId, RegionOptions, WriteFn, MAX_REGION_LEN};
pub use site::Mode;
pub use writer::{
    attach_batch, code_write, declare_chained_sigtrap_handler, detach, detach_batch, detach_nosync,
    fast_refusal, init, instructions, probe_count, probe_mode, recycle_stubs, region_add,
    region_add_with, region_functions, region_remove, region_remove_gone, retired_stubs, stats,
    sync, Rewritten,
};

/// Whether the calling thread is running a probert handler right now (it is
/// inside a read-side section). Calls that take the writer lock or wait for
/// a grace period must not be made there; the C ABI checks this and refuses
/// them.
///
/// # Signal safety
/// Scans the section table for this thread's slots: no allocation, lock or
/// panic.
pub fn in_handler() -> bool {
    grace::in_section()
}

pub mod __fuzz {
    //! Internals exposed for `fuzz/` only. **Not API**: no stability, no
    //! semver; anything here may change or vanish in any release.
    //!
    //! # Safety
    //!
    //! The one `unsafe` creates a `SignalContext` for a lookup that calls only
    //! signal-safe functions, exactly as the trap handler does.
    #![doc(hidden)]
    #![allow(missing_docs, missing_debug_implementations, unsafe_code)]

    /// The size of one trampoline slot; an out-of-line stub never exceeds it.
    pub const STUB_SLOT: usize = crate::arch::STUB_SLOT;

    /// The ways of a thread's hit cache: more consumers than this, hit in
    /// turn, share ways.
    pub const HIT_WAYS: usize = crate::grace::HIT_WAYS;

    /// The classes of register state the fast path saves for `handler`
    /// (`none`: its lean case), as `Clobbers` displays them.
    pub fn handler_classes(handler: crate::Handler) -> String {
        let mut cache = crate::effects::EffectsCache::new();
        crate::effects::handler_clobbers(handler as usize, &mut cache).to_string()
    }

    /// Decodes and classifies the instruction `code` mapped at `addr`:
    /// `(length, out_of_line, disassembly)`.
    pub fn analyze(code: &[u8], addr: usize) -> crate::Result<(usize, bool, String)> {
        let d = crate::arch::analyze(code, addr)?;
        let ool = d.displaced == crate::arch::Displaced::OutOfLine;
        Ok((
            usize::from(d.len),
            ool,
            crate::arch::disassemble(code, addr),
        ))
    }

    /// The bytes of an out-of-line stub for `code` (at `addr`) placed at `stub`.
    pub fn emit_out_of_line(code: &[u8], addr: usize, stub: usize) -> crate::Result<Vec<u8>> {
        crate::arch::emit_out_of_line(code, addr, stub)
    }

    /// What the trap path would decide for a trap at `addr` arriving now:
    /// `"probe"`, `"restart"` (re-execute the restored instruction) or
    /// `"foreign"` (chain). Runs the handler's real lookup, in a read-side
    /// section.
    pub fn late_trap(addr: usize) -> &'static str {
        // SAFETY: only signal-safe functions get the token: `enter`,
        // `lookup` and `exit`.
        let cx = unsafe { crate::sigctx::SignalContext::new() };
        let section = crate::grace::enter(cx);
        let what = match crate::trap::lookup(cx, addr) {
            crate::trap::Lookup::Probe(_) => "probe",
            crate::trap::Lookup::Restart => "restart",
            crate::trap::Lookup::Foreign { .. } => "foreign",
        };
        section.exit(cx);
        what
    }

    /// The probe index (latch map) with its real reader: a lookup runs inside
    /// a read-side section. Writers must be serialised by the caller, insert
    /// only absent keys and remove only present ones (as the runtime does).
    pub struct LatchIndex {
        index: crate::map::Index,
        retired: std::sync::Mutex<Vec<crate::map::RetiredTables>>,
    }

    impl Default for LatchIndex {
        fn default() -> Self {
            Self::new()
        }
    }

    impl LatchIndex {
        pub const fn new() -> LatchIndex {
            LatchIndex {
                index: crate::map::Index::new(),
                retired: std::sync::Mutex::new(Vec::new()),
            }
        }

        /// Writer only. `key != 0`, absent.
        pub fn insert(&self, key: usize, value: usize) {
            assert_ne!(key, 0, "key 0 marks an empty bucket");
            if let Some(r) = self.index.insert(key, value) {
                self.retired
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(r);
            }
        }

        /// Writer only. `key` present.
        pub fn remove(&self, key: usize) {
            self.index.remove(key);
        }

        /// Writer only.
        pub fn len(&self) -> usize {
            self.index.len()
        }

        /// Writer only.
        pub fn is_empty(&self) -> bool {
            self.len() == 0
        }

        /// Any thread: the speculative read the trap handler does.
        pub fn lookup(&self, key: usize) -> Option<usize> {
            // SAFETY: only signal-safe functions get the token: `enter`,
            // `read_speculative` and `exit`.
            let cx = unsafe { crate::sigctx::SignalContext::new() };
            let section = crate::grace::enter(cx);
            let v = self.index.read_speculative(cx, key, |v| v);
            section.exit(cx);
            v
        }

        /// Frees the tables replaced by growth, after a grace period. Not
        /// from inside a lookup.
        pub fn collect(&self) {
            let old = std::mem::take(&mut *self.retired.lock().unwrap_or_else(|e| e.into_inner()));
            crate::grace::synchronize();
            drop(old);
        }
    }
}

/// The crate version, e.g. `"0.1.0"`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
