//! Which classes of register state a handler may change, from the machine
//! code of everything it may run: what the fast path's trampoline must save
//! around the call.
//!
//! # The walk
//!
//! [`handler_effects`] starts at the handler's entry and visits functions
//! depth-first: for an address, the loaded module's function around it
//! ([`modules::function_extent`]), its bytes (a non-faulting read), their
//! analysis ([`function_effects`]), then its callees. A callee named by a
//! pointer slot (`call [rip + got]`, which rustc emits for some calls
//! within a program, and every PLT stub's `jmp`) is followed only if the
//! slot is read-only (the loader filled it, then RELRO protected it) and
//! points into the calling function's own module. The answer is the union
//! of the classes found, or [`Clobbers::ALL`] with a reason ([`WhyAll`])
//! as soon as one function's effects are unknowable, an address lies
//! outside every module's functions (JIT code), a slot points into another
//! module (calling the C library gives `ALL`: it may do anything), code
//! cannot be read, or the graph grows beyond [`MAX_FUNCTIONS`] functions or
//! [`MAX_CODE`] bytes.
//!
//! # The cache
//!
//! An [`EffectsCache`] remembers, per address, the function around it, per
//! function, its analysis, and per handler, the answer: a second attach of
//! the same handler costs one generation check and a hash lookup. All of it
//! depends on which modules are loaded where, so the cache is stamped with
//! the loader's generation ([`modules::generation`]) it was filled under,
//! and is emptied whenever a lookup finds another one. A walk during which
//! the generation moved is thrown away and repeated.
//!
//! # Why this is correct
//!
//! - *Everything the handler may run is analysed.* Execution leaves a
//!   function only by a return, a call or a branch out of it; the analysis
//!   lists every direct one as a callee (or sees that it cannot return), and
//!   any other makes the function unknowable; a trusted pointer slot holds
//!   the one address the call can reach. So the functions visited hold
//!   every instruction that can run before the handler returns, and a
//!   function whose extent is larger than the callee's own (a call into its
//!   middle) only adds instructions.
//! - *Never an answer for code that is no longer there.* The generation
//!   counters only grow and every load or unload grows one, so a module
//!   unloaded and another loaded at the same address changes the
//!   generation and empties the cache before anything is looked up; a walk
//!   is kept only if the generation was the same before and after it.
//!   A loader that does not report a generation gets no cache across calls.
//!
//! Assumed: module code and read-only data do not change while loaded
//! (probert's own probes aside, which preserve what the code does). A tool
//! that makes a GOT writable again to redirect a call within a module would
//! break this; one that redirects calls into the C library would not. The
//! answer is about code that stays loaded while it is used: a handler that
//! calls into a module the host unloads is the host's bug with or without
//! probert.

use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;

use crate::arch::{function_effects, Callee, Clobbers, FunctionEffects, Unknowable};
use crate::sys::{maps, modules, peek};

/// The most functions one walk analyses before answering [`Clobbers::ALL`].
pub const MAX_FUNCTIONS: usize = 256;
/// The most bytes of code one walk analyses before answering
/// [`Clobbers::ALL`].
pub const MAX_CODE: usize = 1 << 20;
/// How often a walk is repeated when modules load or unload during it.
const ATTEMPTS: usize = 3;

/// What a handler may change, and why it may change everything if that is
/// the answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandlerEffects {
    /// The classes the handler may change.
    pub clobbers: Clobbers,
    /// Why the answer is [`Clobbers::ALL`] without the code showing it.
    pub unknown: Option<WhyAll>,
    /// How many functions the walk analysed (or looked up in the cache).
    pub functions: usize,
}

/// Why a handler is assumed to change everything.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WhyAll {
    /// The address lies in no loaded module (JIT code, freed memory).
    #[error("{addr:#x} lies in no loaded module")]
    OutsideModules {
        /// The address.
        addr: usize,
    },
    /// The address lies in a module, but no function covers it (PLT stubs,
    /// or a module whose file could not be matched to its image).
    #[error("no function of {module} covers {addr:#x} (a PLT stub?)")]
    NoFunction {
        /// The address.
        addr: usize,
        /// The module's path.
        module: String,
    },
    /// A call or jump through a pointer into another module (the C
    /// library through its GOT entry or PLT stub: it may do anything).
    #[error("{slot:#x} points into {module} ({target:#x}), another module")]
    OtherModule {
        /// The pointer slot.
        slot: usize,
        /// What it holds.
        target: usize,
        /// The target's module.
        module: String,
    },
    /// A call or jump through a pointer that may change: it is writable
    /// (lazy binding, no RELRO), or not part of the file it points into.
    #[error("the pointer at {slot:#x} is writable, or not in the file it points into")]
    WritableSlot {
        /// The pointer slot.
        slot: usize,
    },
    /// A function's bytes or a pointer slot could not be read.
    #[error("the memory at {addr:#x} could not be read (errno {errno})")]
    Unreadable {
        /// The function's start, or the slot.
        addr: usize,
        /// What the read failed with.
        errno: i32,
    },
    /// One function's effects are unknowable.
    #[error("in {}: {why}", name.as_deref().unwrap_or("the function"))]
    Function {
        /// The function's start.
        start: usize,
        /// Its symbol, if it has one.
        name: Option<String>,
        /// Why.
        why: Unknowable,
    },
    /// The call graph is larger than a walk may analyse.
    #[error("the handler runs more than {functions} functions or {bytes} bytes of code")]
    TooLarge {
        /// The function limit.
        functions: usize,
        /// The code limit.
        bytes: usize,
    },
    /// Modules were loaded or unloaded during every attempt.
    #[error("modules kept loading or unloading during the analysis")]
    Unsettled,
}

/// One analysed function.
#[derive(Debug)]
struct Analysed {
    /// Its length in bytes.
    len: usize,
    /// Its symbol.
    name: Option<String>,
    effects: FunctionEffects,
}

/// Memoized analyses, valid for one loader generation (see the module
/// docs). Owned by whoever attaches (the writer); normal context only.
#[derive(Debug)]
pub struct EffectsCache {
    /// The generation the entries belong to; `None` while empty.
    generation: Option<(u64, u64)>,
    /// Address → the start of the function around it, or why there is none.
    starts: HashMap<usize, Result<usize, WhyAll>>,
    /// Pointer slot into the caller's module → the address it holds, if it
    /// cannot change.
    slots: HashMap<usize, Result<usize, WhyAll>>,
    /// Function start → its analysis.
    functions: HashMap<usize, Analysed>,
    /// Handler entry → the answer.
    handlers: HashMap<usize, HandlerEffects>,
    max_functions: usize,
    max_code: usize,
}

impl Default for EffectsCache {
    fn default() -> Self {
        EffectsCache::new()
    }
}

impl EffectsCache {
    /// An empty cache with the default limits.
    pub fn new() -> EffectsCache {
        EffectsCache::with_limits(MAX_FUNCTIONS, MAX_CODE)
    }

    /// An empty cache whose walks stop at `functions` functions or `bytes`
    /// bytes of code.
    pub fn with_limits(functions: usize, bytes: usize) -> EffectsCache {
        EffectsCache {
            generation: None,
            starts: HashMap::new(),
            slots: HashMap::new(),
            functions: HashMap::new(),
            handlers: HashMap::new(),
            max_functions: functions,
            max_code: bytes,
        }
    }

    /// How many functions are memoized.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.functions.len()
    }

    /// Whether nothing is memoized.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.functions.is_empty()
            && self.starts.is_empty()
            && self.slots.is_empty()
            && self.handlers.is_empty()
    }

    fn clear(&mut self) {
        self.generation = None;
        self.starts.clear();
        self.slots.clear();
        self.functions.clear();
        self.handlers.clear();
    }

    /// Empties the cache unless it belongs to `generation`, and stamps it.
    fn revalidate(&mut self, generation: Option<(u64, u64)>) {
        if self.generation != generation || generation.is_none() {
            self.clear();
        }
        self.generation = generation;
    }

    /// Where `callee`, called or jumped to from the function at `from`,
    /// goes: a pointer slot is trusted if it points into the caller's own
    /// module and is a read-only part of that module's image
    /// ([`slot_is_fixed`]).
    fn target_of(&mut self, callee: Callee, from: usize) -> Result<usize, WhyAll> {
        let slot = match callee {
            Callee::Direct(addr) => return Ok(addr),
            Callee::Through(slot) => slot,
        };
        if let Some(known) = self.slots.get(&slot) {
            return known.clone();
        }
        let mut bytes = [0u8; 8];
        peek::read_memory(slot, &mut bytes)
            .map_err(|errno| WhyAll::Unreadable { addr: slot, errno })?;
        let target = usize::from_le_bytes(bytes);
        let home = modules::module_containing(from).map(|m| m.path);
        match modules::module_containing(target) {
            Some(m) if Some(&m.path) == home.as_ref() => {}
            Some(m) => {
                return Err(WhyAll::OtherModule {
                    slot,
                    target,
                    module: m.path,
                })
            }
            None => return Err(WhyAll::OutsideModules { addr: target }),
        }
        // Only a slot that cannot change keeps its answer.
        let verdict = match slot_is_fixed(slot, target) {
            Ok(true) => Ok(target),
            Ok(false) => Err(WhyAll::WritableSlot { slot }),
            Err(errno) => return Err(WhyAll::Unreadable { addr: slot, errno }),
        };
        self.slots.insert(slot, verdict.clone());
        verdict
    }

    /// The start of the function around `addr`, analysing it on first use.
    fn function_at(&mut self, addr: usize) -> Result<usize, WhyAll> {
        if let Some(s) = self.starts.get(&addr) {
            return s.clone();
        }
        let found = self.look_up(addr);
        // An unreadable function may be readable later: not remembered.
        if !matches!(found, Err(WhyAll::Unreadable { .. })) {
            self.starts.insert(addr, found.clone());
        }
        found
    }

    fn look_up(&mut self, addr: usize) -> Result<usize, WhyAll> {
        let Some(extent) = modules::function_extent(addr) else {
            return Err(match modules::module_containing(addr) {
                Some(m) => WhyAll::NoFunction {
                    addr,
                    module: m.path,
                },
                None => WhyAll::OutsideModules { addr },
            });
        };
        if self.functions.contains_key(&extent.start) {
            return Ok(extent.start);
        }
        let len = extent.end - extent.start;
        if len > self.max_code {
            return Err(self.too_large());
        }
        let mut code = vec![0u8; len];
        peek::read_memory(extent.start, &mut code).map_err(|errno| WhyAll::Unreadable {
            addr: extent.start,
            errno,
        })?;
        let read = |a: usize, buf: &mut [u8]| peek::read_memory(a, buf).is_ok();
        let effects = function_effects(&code, extent.start, &read);
        self.functions.insert(
            extent.start,
            Analysed {
                len,
                name: extent.name().map(str::to_owned),
                effects,
            },
        );
        Ok(extent.start)
    }

    fn too_large(&self) -> WhyAll {
        WhyAll::TooLarge {
            functions: self.max_functions,
            bytes: self.max_code,
        }
    }
}

/// Whether the pointer at `slot` (holding `target`) lies in a read-only
/// mapping of the file whose mapping holds `target`: a GOT that RELRO
/// protects, `.data.rel.ro`. Nothing but the loader wrote it, and nothing
/// writes it again. One pass over `/proc/self/maps`; `Err(errno)` if that
/// cannot be read.
fn slot_is_fixed(slot: usize, target: usize) -> Result<bool, i32> {
    // (writable, file) of the slot's mapping, and the file of the target's.
    let (mut holder, mut code) = (None, None);
    maps::for_each_mapping(|m| {
        if m.start <= slot && slot.saturating_add(8) <= m.end {
            holder = Some((m.prot & libc::PROT_WRITE != 0, m.name.to_vec()));
        }
        if m.start <= target && target < m.end {
            code = Some(m.name.to_vec());
        }
        if holder.is_some() && code.is_some() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })?;
    Ok(matches!(
        (holder, code),
        (Some((false, file)), Some(code)) if !file.is_empty() && file == code
    ))
}

/// The classes of register state beyond the general-purpose registers and
/// the flags that the handler at `handler` may change; [`Clobbers::ALL`]
/// when that cannot be known. See [`handler_effects`].
///
/// Normal context only.
pub fn handler_clobbers(handler: usize, cache: &mut EffectsCache) -> Clobbers {
    handler_effects(handler, cache).clobbers
}

/// What the handler at `handler` may change, with the reason when that is
/// everything (module docs). Memoized in `cache`.
///
/// In an optimised build, 2–4 µs for a one-function handler and about 2 µs
/// per further function on first use, plus one read of `/proc/self/maps`
/// (tens of µs) per pointer slot into the caller's module; a handler seen
/// before costs one `dl_iterate_phdr` call and a hash lookup (under 0.1
/// µs). Normal context only.
pub fn handler_effects(handler: usize, cache: &mut EffectsCache) -> HandlerEffects {
    for _ in 0..ATTEMPTS {
        let before = modules::generation();
        cache.revalidate(before);
        if let Some(known) = cache.handlers.get(&handler) {
            return known.clone();
        }
        let answer = walk(handler, cache);
        let after = modules::generation();
        match (before, after) {
            (Some(b), Some(a)) if a == b => {
                cache.handlers.insert(handler, answer.clone());
                return answer;
            }
            // No generation to check against: the answer is as of the
            // walk, and nothing is kept.
            (None, _) => {
                cache.clear();
                return answer;
            }
            _ => cache.clear(),
        }
    }
    HandlerEffects {
        clobbers: Clobbers::ALL,
        unknown: Some(WhyAll::Unsettled),
        functions: 0,
    }
}

/// One walk over the call graph from `handler`, within one generation.
fn walk(handler: usize, cache: &mut EffectsCache) -> HandlerEffects {
    let all = |why: WhyAll, functions: usize| HandlerEffects {
        clobbers: Clobbers::ALL,
        unknown: Some(why),
        functions,
    };
    let mut clobbers = Clobbers::NONE;
    let mut visited = HashSet::new();
    let mut bytes = 0usize;
    // (where to, the function it is called or jumped to from)
    let mut work = vec![(Callee::Direct(handler), handler)];
    while let Some((callee, from)) = work.pop() {
        let start = match cache
            .target_of(callee, from)
            .and_then(|addr| cache.function_at(addr))
        {
            Ok(s) => s,
            Err(why) => return all(why, visited.len()),
        };
        if !visited.insert(start) {
            continue;
        }
        let f = &cache.functions[&start];
        bytes += f.len;
        if visited.len() > cache.max_functions || bytes > cache.max_code {
            return all(cache.too_large(), visited.len());
        }
        if let Some(why) = &f.effects.unknown {
            let why = WhyAll::Function {
                start,
                name: f.name.clone(),
                why: why.clone(),
            };
            return all(why, visited.len());
        }
        clobbers = clobbers.union(f.effects.clobbers);
        if clobbers == Clobbers::ALL {
            break;
        }
        work.extend(f.effects.callees.iter().rev().map(|&c| (c, start)));
    }
    HandlerEffects {
        clobbers,
        unknown: None,
        functions: visited.len(),
    }
}

#[cfg(test)]
#[allow(unsafe_code)] // handlers, `dlopen`/`dlsym`
mod tests {
    use std::ffi::{c_void, CString};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::{Action, Hit};

    static HITS: AtomicU64 = AtomicU64::new(0);

    /// The counting handler: one atomic add.
    #[inline(never)]
    unsafe extern "C" fn count_hit(_hit: *mut Hit) -> u32 {
        HITS.fetch_add(1, Ordering::Relaxed);
        Action::Continue as u32
    }

    /// A handler that computes in `f64` and writes the result into rax.
    #[inline(never)]
    unsafe extern "C" fn float_hit(hit: *mut Hit) -> u32 {
        // SAFETY: the dispatcher passes a valid `Hit` with valid registers.
        let hit = unsafe { &mut *hit };
        let x = hit.addr as f64;
        // SAFETY: as above.
        let regs = unsafe { &mut *hit.regs };
        regs.set(crate::Reg::Rax, (x * 1.5 + 0.25).to_bits());
        Action::Continue as u32
    }

    /// A handler that writes (nothing) to stderr: the C library.
    #[inline(never)]
    unsafe extern "C" fn write_hit(_hit: *mut Hit) -> u32 {
        // SAFETY: a zero-length write of a valid buffer.
        unsafe { libc::write(2, b"".as_ptr().cast(), 0) };
        Action::Continue as u32
    }

    /// What `api::attach_fn` installs for a closure `F`.
    unsafe extern "C" fn call<F: Fn(&mut Hit) -> Action>(hit: *mut Hit) -> u32 {
        // SAFETY: the dispatcher passes a valid, exclusive `Hit` whose
        // `user_data` is an `F`.
        let hit = unsafe { &mut *hit };
        // SAFETY: as above.
        let f = unsafe { &*(hit.user_data as *const F) };
        f(hit) as u32
    }

    fn closure_handler<F: Fn(&mut Hit) -> Action>(_: &F) -> usize {
        call::<F> as *const () as usize
    }

    fn effects_of(handler: usize) -> HandlerEffects {
        handler_effects(handler, &mut EffectsCache::new())
    }

    /// In debug builds `AtomicU64::fetch_add` is not inlined, and its
    /// `match` on the ordering is a jump table with no bounds check (the
    /// enum's validity is the bound) indexed through a stack spill: the
    /// recogniser cannot bound it.
    fn is_debug_atomic(e: &HandlerEffects) -> bool {
        matches!(
            &e.unknown,
            Some(WhyAll::Function { name: Some(n), why: Unknowable::IndirectJump { .. }, .. })
                if n.contains("atomic")
        )
    }

    #[test]
    fn a_counting_handler_changes_nothing() {
        let e = effects_of(count_hit as *const () as usize);
        if cfg!(debug_assertions) {
            assert!(is_debug_atomic(&e), "{e:?}");
        } else {
            assert_eq!((e.clobbers, &e.unknown), (Clobbers::NONE, &None), "{e:?}");
        }
    }

    #[test]
    fn a_float_handler_changes_sse_state() {
        // Run it once, so that its store is not dead code.
        let mut regs = crate::Regs::default();
        let mut hit = Hit {
            addr: 2,
            regs: &mut regs,
            user_data: std::ptr::null_mut(),
            session: std::ptr::null_mut(),
            is_return: 0,
        };
        // SAFETY: a valid `Hit`.
        assert_eq!(unsafe { float_hit(&mut hit) }, 0);
        assert_eq!(f64::from_bits(regs.get(crate::Reg::Rax)), 3.25);
        let e = effects_of(float_hit as *const () as usize);
        // It reads the registers: `FRAME` too.
        let want = Clobbers::SSE.union(Clobbers::FRAME);
        assert_eq!((e.clobbers, &e.unknown), (want, &None), "{e:?}");
    }

    #[test]
    fn a_handler_calling_the_c_library_changes_everything() {
        let e = effects_of(write_hit as *const () as usize);
        assert_eq!(e.clobbers, Clobbers::ALL);
        assert!(
            matches!(&e.unknown, Some(WhyAll::OtherModule { module, .. }) if module.contains("libc")),
            "{e:?}"
        );
    }

    #[test]
    fn a_closure_with_a_bounds_check_needs_at_most_sse() {
        let counts: Arc<Vec<AtomicU64>> = Arc::new((0..8).map(|_| AtomicU64::new(0)).collect());
        let f = move |hit: &mut Hit| {
            counts[hit.addr & 15].fetch_add(1, Ordering::Relaxed);
            Action::Continue
        };
        let e = effects_of(closure_handler(&f));
        println!("closure: {} over {} functions", e.clobbers, e.functions);
        if cfg!(debug_assertions) {
            assert!(is_debug_atomic(&e), "{e:?}");
        } else {
            assert_eq!(e.unknown, None, "{e:?}");
            // It copies the hit pointer (`mov rax, rdi`), which the
            // flow-insensitive rule of `FRAME` cannot follow.
            assert!(
                e.clobbers.within(Clobbers::SSE.union(Clobbers::FRAME)),
                "{e:?}"
            );
        }
    }

    #[test]
    fn code_outside_modules_changes_everything() {
        let heap = Box::new([0xC3u8; 16]);
        let e = effects_of(heap.as_ptr() as usize);
        assert_eq!(e.clobbers, Clobbers::ALL);
        assert!(
            matches!(e.unknown, Some(WhyAll::OutsideModules { .. })),
            "{e:?}"
        );
    }

    // Hand-written handlers with exact bytes (Intel syntax), with FDEs and
    // sized symbols like compiled code.
    core::arch::global_asm!(
        ".macro pe_fn name",
        ".globl \\name",
        ".type \\name, @function",
        ".p2align 4",
        "\\name:",
        ".cfi_startproc",
        ".endm",
        ".macro pe_end name",
        ".cfi_endproc",
        ".size \\name, . - \\name",
        ".endm",
        // Calls two functions, cannot return from a third, tail-jumps to a
        // fourth: opmask | x87 | sse.
        "pe_fn probert_pe_calls",
        "push rbx",
        "test rdi, rdi",
        "je .Lpe_fail",
        "call probert_pe_opmask",
        "call probert_pe_x87",
        "pop rbx",
        "jmp probert_pe_sse",
        ".Lpe_fail:",
        "call probert_pe_indirect",
        "ud2",
        "pe_end probert_pe_calls",
        "pe_fn probert_pe_opmask",
        "kxorw k1, k1, k1",
        "ret",
        "pe_end probert_pe_opmask",
        "pe_fn probert_pe_x87",
        "fldz",
        "fstp st(0)",
        "ret",
        "pe_end probert_pe_x87",
        "pe_fn probert_pe_sse",
        "pxor xmm0, xmm0",
        "ret",
        "pe_end probert_pe_sse",
        "pe_fn probert_pe_indirect",
        "call rax",
        "ret",
        "pe_end probert_pe_indirect",
        // A switch whose third case is another function: vector | sse.
        "pe_fn probert_pe_switch",
        "cmp edi, 2",
        "ja .Lpe_default",
        "lea rdx, [rip + probert_pe_table]",
        "movsxd rax, dword ptr [rdx + rdi*4]",
        "add rax, rdx",
        "jmp rax",
        ".Lpe_case0:",
        "mov eax, 10",
        "ret",
        ".Lpe_default:",
        "xor eax, eax",
        "ret",
        "pe_end probert_pe_switch",
        "pe_fn probert_pe_vector",
        "vpxor ymm0, ymm0, ymm0",
        "vzeroupper",
        "ret",
        "pe_end probert_pe_vector",
        // Writes errno the way the C library does (initial-exec TLS).
        "pe_fn probert_pe_errno",
        "mov rax, -8",
        "mov dword ptr fs:[rax], 22",
        "ret",
        "pe_end probert_pe_errno",
        // Calls itself, and a function that calls it back.
        "pe_fn probert_pe_recursive",
        "dec rdi",
        "jz .Lpe_done",
        "call probert_pe_recursive",
        "call probert_pe_mutual",
        ".Lpe_done:",
        "ret",
        "pe_end probert_pe_recursive",
        "pe_fn probert_pe_mutual",
        "call probert_pe_recursive",
        "ret",
        "pe_end probert_pe_mutual",
        // Calls through pointers: one RELRO protects, one it does not.
        "pe_fn probert_pe_through_ro",
        "call qword ptr [rip + probert_pe_ro_slot]",
        "ret",
        "pe_end probert_pe_through_ro",
        "pe_fn probert_pe_through_rw",
        "jmp qword ptr [rip + probert_pe_rw_slot]",
        "pe_end probert_pe_through_rw",
        ".pushsection .data.rel.ro, \"aw\"",
        ".p2align 3",
        "probert_pe_ro_slot:",
        ".quad probert_pe_opmask",
        ".popsection",
        ".pushsection .data, \"aw\"",
        ".p2align 3",
        "probert_pe_rw_slot:",
        ".quad probert_pe_opmask",
        ".popsection",
        ".pushsection .rodata",
        ".p2align 2",
        "probert_pe_table:",
        ".long .Lpe_case0 - probert_pe_table",
        ".long .Lpe_default - probert_pe_table",
        ".long probert_pe_vector - probert_pe_table",
        ".popsection",
    );

    extern "C" {
        fn probert_pe_calls();
        fn probert_pe_indirect();
        fn probert_pe_switch();
        fn probert_pe_errno();
        fn probert_pe_recursive();
        fn probert_pe_through_ro();
        fn probert_pe_through_rw();
    }

    #[test]
    fn hand_written_handlers_are_walked_exactly() {
        let e = effects_of(probert_pe_calls as *const () as usize);
        // Calls pass the hit on: `FRAME` wherever there is one.
        let want = Clobbers::OPMASK
            .union(Clobbers::X87)
            .union(Clobbers::SSE)
            .union(Clobbers::FRAME);
        assert_eq!(
            (e.clobbers, &e.unknown, e.functions),
            (want, &None, 4),
            "{e:?}"
        );
        let e = effects_of(probert_pe_indirect as *const () as usize);
        assert!(
            matches!(
                &e.unknown,
                Some(WhyAll::Function { name: Some(n), why: Unknowable::IndirectCall { .. }, .. })
                    if n == "probert_pe_indirect"
            ),
            "{e:?}"
        );
        let e = effects_of(probert_pe_switch as *const () as usize);
        let want = Clobbers::VECTOR.union(Clobbers::SSE).union(Clobbers::FRAME);
        assert_eq!(
            (e.clobbers, &e.unknown, e.functions),
            (want, &None, 2),
            "{e:?}"
        );
        let e = effects_of(probert_pe_errno as *const () as usize);
        assert_eq!((e.clobbers, &e.unknown), (Clobbers::ERRNO, &None), "{e:?}");
        let e = effects_of(probert_pe_recursive as *const () as usize);
        assert_eq!(
            (e.clobbers, &e.unknown, e.functions),
            (Clobbers::FRAME, &None, 2)
        );
    }

    #[test]
    fn pointer_slots_are_followed_only_when_read_only_and_local() {
        let e = effects_of(probert_pe_through_ro as *const () as usize);
        assert_eq!(
            (e.clobbers, &e.unknown, e.functions),
            (Clobbers::OPMASK.union(Clobbers::FRAME), &None, 2)
        );
        let e = effects_of(probert_pe_through_rw as *const () as usize);
        assert_eq!(e.clobbers, Clobbers::ALL);
        assert!(
            matches!(e.unknown, Some(WhyAll::WritableSlot { .. })),
            "{e:?}"
        );
    }

    #[test]
    fn walks_are_bounded_and_memoized() {
        let mut small = EffectsCache::with_limits(3, MAX_CODE);
        let e = handler_effects(probert_pe_calls as *const () as usize, &mut small);
        assert_eq!(e.clobbers, Clobbers::ALL);
        assert!(matches!(
            e.unknown,
            Some(WhyAll::TooLarge { functions: 3, .. })
        ));

        let mut cache = EffectsCache::new();
        let first = handler_effects(probert_pe_calls as *const () as usize, &mut cache);
        assert_eq!(cache.len(), 4);
        assert_eq!(
            handler_effects(probert_pe_calls as *const () as usize, &mut cache),
            first
        );
        // Functions shared with another handler are not analysed again.
        let sse = handler_effects(probert_pe_switch as *const () as usize, &mut cache);
        assert_eq!(cache.len(), 6);
        assert!(Clobbers::SSE.within(sse.clobbers));
        // Another generation empties the cache.
        let generation = cache.generation.expect("glibc reports a generation");
        cache.revalidate(Some((generation.0 + 1, generation.1)));
        assert!(cache.is_empty());
    }

    fn dlsym(handle: *mut c_void, name: &str) -> usize {
        let c = CString::new(name).expect("name");
        // SAFETY: a valid handle (or RTLD_DEFAULT) and NUL-terminated name.
        let p = unsafe { libc::dlsym(handle, c.as_ptr()) };
        assert!(!p.is_null(), "dlsym {name}");
        p as usize
    }

    /// What the C library's string functions come to, resolved the way a
    /// call would resolve them (their IFUNC picked the variant).
    #[test]
    fn c_library_functions_through_dlsym() {
        for name in ["memset", "memcpy", "strlen", "getpid"] {
            let addr = dlsym(libc::RTLD_DEFAULT, name);
            let extent = modules::function_extent(addr);
            let e = effects_of(addr);
            let symbol = extent.as_ref().and_then(|x| x.name().map(str::to_owned));
            println!(
                "{name} -> {symbol:?}: {} over {} functions{}",
                e.clobbers,
                e.functions,
                e.unknown
                    .as_ref()
                    .map(|w| format!(" ({w})"))
                    .unwrap_or_default()
            );
            // Whatever the variant, the answer covers its own instructions.
            if let Some(x) = extent {
                let mut code = vec![0; x.end - x.start];
                peek::read_memory(x.start, &mut code).expect("read");
                let own = function_effects(&code, x.start, &|a, b| peek::read_memory(a, b).is_ok());
                assert!(own.clobbers.within(e.clobbers), "{name}: {own:?} vs {e:?}");
            }
        }
    }

    /// Builds `source` into a shared object with the system C compiler;
    /// `None` if there is none.
    fn build_c(source: &str, tag: &str) -> Option<String> {
        let dir = std::env::temp_dir().join(format!("probert-effects-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let c = dir.join(format!("{tag}.c"));
        let so = dir.join(format!("lib{tag}.so"));
        std::fs::write(&c, source).expect("write");
        let status = std::process::Command::new("cc")
            .args([
                "-O2",
                "-fno-math-errno",
                "-shared",
                "-fPIC",
                "-Wall",
                "-Wextra",
            ])
            .args(["-Werror", "-o"])
            .arg(&so)
            .arg(&c)
            .status();
        match status {
            Ok(s) if s.success() => Some(so.to_str().expect("utf-8").to_string()),
            Ok(s) => panic!("cc failed: {s}"),
            Err(e) => {
                println!("no C compiler ({e}): C handlers not tested");
                None
            }
        }
    }

    fn dlopen(path: &str) -> *mut c_void {
        let c = CString::new(path).expect("path");
        // SAFETY: a NUL-terminated path of a library this test built.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        assert!(!h.is_null(), "dlopen {path}");
        h
    }

    const C_HANDLERS: &str = r#"
        #include <errno.h>
        static long double sum;
        int extended(void *hit) { sum += (long double)(unsigned long)hit * 1.5L; return 0; }
        int sets_errno(void *hit) { (void)hit; errno = 0; return 0; }
        int uses_double(void *hit) { return (int)__builtin_sqrt((double)(unsigned long)hit); }
    "#;

    /// One handler, loaded first.
    const C_COUNTING: &str = r#"
        static unsigned long hits;
        int handler(void *hit) { (void)hit; __atomic_fetch_add(&hits, 1, __ATOMIC_RELAXED); return 0; }
    "#;

    /// The same name, other code, loaded after it: at the same address if
    /// the loader reuses the hole.
    const C_EXTENDED: &str = r#"
        static long double sum;
        int handler(void *hit) { sum += (long double)(unsigned long)hit * 1.5L; return 0; }
    "#;

    #[test]
    fn c_handlers_in_a_dlopened_object() {
        let Some(path) = build_c(C_HANDLERS, "handlers") else {
            return;
        };
        let mut cache = EffectsCache::new();
        let h = dlopen(&path);
        let mut effects = |name: &str| {
            let e = handler_effects(dlsym(h, name), &mut cache);
            println!("C {name}: {} ({:?})", e.clobbers, e.unknown);
            e
        };
        // Both use the hit pointer's value: `FRAME`.
        assert_eq!(
            effects("extended").clobbers,
            Clobbers::X87.union(Clobbers::FRAME)
        );
        // errno is written through __errno_location, in the C library (its
        // PLT stub shares an FDE with the others and the resolver's slot).
        assert_eq!(effects("sets_errno").clobbers, Clobbers::ALL);
        // Without errno, sqrt is one sqrtsd.
        assert_eq!(
            effects("uses_double").clobbers,
            Clobbers::SSE.union(Clobbers::FRAME)
        );
        // SAFETY: closes the handle this test opened; nothing uses it since.
        unsafe { libc::dlclose(h) };
    }

    #[test]
    fn a_module_reloaded_at_the_same_address_is_analysed_again() {
        let (Some(first), Some(second)) = (
            build_c(C_COUNTING, "counting"),
            build_c(C_EXTENDED, "extended"),
        ) else {
            return;
        };
        let mut cache = EffectsCache::new();
        let h = dlopen(&first);
        let handler = dlsym(h, "handler");
        assert_eq!(handler_clobbers(handler, &mut cache), Clobbers::NONE);
        // SAFETY: closes the handle this test opened; nothing uses it since.
        unsafe { libc::dlclose(h) };
        let h = dlopen(&second);
        let reloaded = dlsym(h, "handler");
        println!("reloaded at the same address: {}", reloaded == handler);
        assert_eq!(
            handler_clobbers(reloaded, &mut cache),
            Clobbers::X87.union(Clobbers::FRAME),
            "the cache answered for the unloaded object"
        );
        // SAFETY: as above.
        unsafe { libc::dlclose(h) };
    }

    /// How long an analysis takes, cold (a new cache) and memoized. A
    /// measurement, not a test: `cargo test --release -p probert --lib
    /// effects_cost -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn effects_cost() {
        let counts: Arc<Vec<AtomicU64>> = Arc::new((0..8).map(|_| AtomicU64::new(0)).collect());
        let f = move |hit: &mut Hit| {
            counts[hit.addr & 15].fetch_add(1, Ordering::Relaxed);
            Action::Continue
        };
        let handlers = [
            ("count_hit", count_hit as *const () as usize),
            ("float_hit", float_hit as *const () as usize),
            ("closure", closure_handler(&f)),
            ("write_hit", write_hit as *const () as usize),
            ("asm calls (4 fns)", probert_pe_calls as *const () as usize),
            (
                "asm through a slot",
                probert_pe_through_ro as *const () as usize,
            ),
            ("memset", dlsym(libc::RTLD_DEFAULT, "memset")),
        ];
        for (name, addr) in handlers {
            let _ = effects_of(addr); // the module's table is built once
            let n = 200;
            let t = std::time::Instant::now();
            for _ in 0..n {
                std::hint::black_box(effects_of(addr));
            }
            let cold = t.elapsed().as_secs_f64() * 1e6 / n as f64;
            let mut cache = EffectsCache::new();
            let e = handler_effects(addr, &mut cache);
            let n = 20_000;
            let t = std::time::Instant::now();
            for _ in 0..n {
                std::hint::black_box(handler_effects(addr, &mut cache));
            }
            let warm = t.elapsed().as_secs_f64() * 1e6 / n as f64;
            println!(
                "{name:>18}: {cold:7.2} µs cold, {warm:5.3} µs memoized ({} fns, {})",
                e.functions, e.clobbers
            );
        }
    }
}
