//! The Rust API for attaching handlers and closures.
//!
//! # Safety
//!
//! Attaching is `unsafe`: probert cannot prove an address starts an
//! instruction everywhere, nor that a handler is async-signal-safe. Closures
//! are boxed and freed only after a grace period that follows their detach.
#![allow(unsafe_code)]

use crate::consumer::{ConsumerId, Owner, Stats};
use crate::error::Result;
use crate::hit::{Action, Handler, Hit};
use crate::site::Mode;
use crate::writer::{self, detach, stats};

/// Attaches `handler` to the instruction at `addr`.
///
/// Returns a handle for [`detach`]; [`Error::UnsupportedInstruction`](crate::Error::UnsupportedInstruction),
/// [`Error::Misaligned`](crate::Error::Misaligned), [`Error::Conflict`](crate::Error::Conflict), [`Error::NoRegion`](crate::Error::NoRegion) etc. when
/// the address cannot be probed.
///
/// # Safety
/// - `addr` must be the first byte of an instruction in code that stays mapped
///   while the probe is attached. probert checks the instruction boundary
///   where it knows the enclosing function (an ELF symbol, or the start of a
///   JIT region), but cannot elsewhere.
/// - `handler` must be async-signal-safe (see the crate docs) and may be
///   called with `user_data` from any thread until `detach` returns.
pub unsafe fn attach(
    addr: usize,
    handler: Handler,
    user_data: *mut std::ffi::c_void,
) -> Result<ConsumerId> {
    writer::attach_owned(addr, handler, user_data, Mode::Auto, None)
}

/// [`attach`] with a choice of mechanism: [`Mode::Trap`] keeps the site on
/// the `int3` path; [`Mode::Fast`] fails with
/// [`Error::UnsupportedInstruction`](crate::Error) unless the site can be fast.
///
/// # Safety
/// As [`attach`].
pub unsafe fn attach_ex(
    addr: usize,
    handler: Handler,
    user_data: *mut std::ffi::c_void,
    mode: Mode,
) -> Result<ConsumerId> {
    writer::attach_owned(addr, handler, user_data, mode, None)
}

/// Attaches a closure to the instruction at `addr`. The closure is dropped
/// after it is detached and a grace period has passed.
///
/// # Safety
/// As [`attach`]: `addr` must start an instruction in code that stays mapped,
/// and the closure must be async-signal-safe.
pub unsafe fn attach_fn<F>(addr: usize, f: F) -> Result<ConsumerId>
where
    F: Fn(&mut Hit) -> Action + Send + Sync + 'static,
{
    struct Owned<F>(*mut F);
    // SAFETY: `F: Send`, and the pointer is only dereferenced by handlers
    // (`F: Sync`) and freed once.
    unsafe impl<F: Send> Send for Owned<F> {}
    impl<F> Drop for Owned<F> {
        fn drop(&mut self) {
            // SAFETY: created by `Box::into_raw` below; dropped once, after
            // the last handler call (a grace period after detaching).
            drop(unsafe { Box::from_raw(self.0) });
        }
    }
    unsafe extern "C" fn call<F: Fn(&mut Hit) -> Action>(hit: *mut Hit) -> u32 {
        // SAFETY: the dispatcher passes a valid, exclusive `Hit` whose
        // `user_data` is the boxed `F` installed with this trampoline.
        let hit = unsafe { &mut *hit };
        // SAFETY: as above.
        let f = unsafe { &*(hit.user_data as *const F) };
        f(hit) as u32
    }
    let raw = Box::into_raw(Box::new(f));
    let owner: Owner = Box::new(Owned(raw));
    writer::attach_owned(addr, call::<F>, raw.cast(), Mode::Auto, Some(owner))
}

/// What an attach asks for beyond the address and the handler.
#[derive(Clone, Copy, Debug, Default)]
pub struct AttachOptions {
    /// The mechanism ([`Mode::Auto`] by default).
    pub mode: Mode,
    /// A return handler: called once for every normal return of every
    /// invocation whose entry hit called this consumer, with the registers
    /// as just after the return (RIP the return address in the caller, RSP
    /// the caller's stack pointer, RAX/RDX and xmm0/xmm1 the value
    /// returned; writes take effect). The address must then be a function's
    /// entry ([`Error::Misaligned`](crate::Error::Misaligned) otherwise),
    /// and probert must find every way the function returns (its `ret`s and
    /// the functions it tail-calls;
    /// [`Error::UnsupportedInstruction`](crate::Error::UnsupportedInstruction)
    /// says why when it cannot). See the crate docs, "Return probes".
    pub on_return: Option<Handler>,
}

/// [`attach`] with [`AttachOptions`]: a mechanism, a return handler.
///
/// # Safety
/// As [`attach`]; the return handler has the same rules as any handler.
pub unsafe fn attach_with(
    addr: usize,
    handler: Handler,
    user_data: *mut std::ffi::c_void,
    opts: AttachOptions,
) -> Result<ConsumerId> {
    let req = crate::consumer::AttachReq {
        addr,
        handler,
        user_data,
    };
    writer::attach_batch_with(&[req], &[opts.into()], Vec::new())
        .map(|ids| ids[0])
        .map_err(|(_, e)| e)
}

/// [`attach_batch`](crate::attach_batch) with the same [`AttachOptions`]
/// for every request; all or nothing, as it.
pub fn attach_batch_with(
    reqs: &[crate::consumer::AttachReq],
    opts: AttachOptions,
) -> std::result::Result<Vec<ConsumerId>, (usize, crate::Error)> {
    writer::attach_batch_with(reqs, &[opts.into()], Vec::new())
}

impl From<AttachOptions> for writer::Options {
    fn from(o: AttachOptions) -> writer::Options {
        writer::Options {
            mode: o.mode,
            on_return: o.on_return,
        }
    }
}

/// Attaches an entry and a return closure to the function at `addr`, with
/// a session of type `S` per invocation: `S::default()` when the entry
/// closure runs, and what it left there when the return closure runs. The
/// closures are dropped after the probe is detached and a grace period has
/// passed. `S` fits in 8 bytes (the session word) — a timestamp, a counter,
/// an argument to compare with the result.
///
/// The entry closure's [`Action::NoReturn`] skips the return for that
/// invocation; [`Action::Remove`] from either detaches the probe.
///
/// # Safety
/// As [`attach_fn`]; `addr` must be a function's entry.
///
/// # Examples
///
/// ```no_run
/// # fn f() {}
/// // Nanoseconds per call of `f`.
/// let probe = unsafe {
///     probert::probe_returns(
///         f as *const () as usize,
///         |_hit, start: &mut u64| {
///             *start = 1; // e.g. a clock read
///             probert::Action::Continue
///         },
///         |hit, start: &mut u64| {
///             let _ = (hit.regs().get(probert::Reg::Rax), *start);
///             probert::Action::Continue
///         },
///     )
/// }
/// .unwrap();
/// # drop(probe);
/// ```
pub unsafe fn probe_returns<S, E, R>(addr: usize, on_entry: E, on_return: R) -> Result<Probe>
where
    S: Copy + Default + 'static,
    E: Fn(&mut Hit, &mut S) -> Action + Send + Sync + 'static,
    R: Fn(&mut Hit, &mut S) -> Action + Send + Sync + 'static,
{
    struct Fits<S>(std::marker::PhantomData<S>);
    impl<S> Fits<S> {
        const OK: () = assert!(
            std::mem::size_of::<S>() <= 8 && std::mem::align_of::<S>() <= 8,
            "a session type fits in the 8-byte session word"
        );
    }
    #[allow(clippy::let_unit_value)]
    let () = Fits::<S>::OK;
    struct Pair<E, R>(E, R);
    struct Owned<P>(*mut P);
    // SAFETY: the pair is `Send`, and the pointer is only dereferenced by
    // handlers (the closures are `Sync`) and freed once.
    unsafe impl<P: Send> Send for Owned<P> {}
    impl<P> Drop for Owned<P> {
        fn drop(&mut self) {
            // SAFETY: created by `Box::into_raw` below; dropped once, after
            // the last handler call.
            drop(unsafe { Box::from_raw(self.0) });
        }
    }
    /// The session word as an `S` (the word is 8-byte aligned and private
    /// to the invocation).
    ///
    /// # Safety
    /// `hit.session` is this invocation's session word, or null.
    unsafe fn session<'a, S: Copy + Default>(hit: &Hit, fresh: bool) -> Option<&'a mut S> {
        let p = hit.session.cast::<S>();
        if p.is_null() {
            return None;
        }
        if fresh {
            // SAFETY: the word is zero and ours; `S` fits (checked above).
            unsafe { p.write(S::default()) };
        }
        // SAFETY: as above.
        Some(unsafe { &mut *p })
    }
    unsafe extern "C" fn entry<S: Copy + Default, E, R>(hit: *mut Hit) -> u32
    where
        E: Fn(&mut Hit, &mut S) -> Action,
    {
        // SAFETY: the dispatcher passes a valid, exclusive `Hit` whose
        // `user_data` is the boxed pair installed with this trampoline.
        let hit = unsafe { &mut *hit };
        // SAFETY: as above.
        let pair = unsafe { &*(hit.user_data as *const Pair<E, R>) };
        let mut spare = S::default();
        // SAFETY: `session` is the invocation's word.
        let s = unsafe { session::<S>(hit, true) }.unwrap_or(&mut spare);
        let mut s2 = *s;
        let action = (pair.0)(hit, &mut s2);
        // SAFETY: as above (re-borrowed after the closure had `hit`).
        if let Some(w) = unsafe { session::<S>(hit, false) } {
            *w = s2;
        }
        action as u32
    }
    unsafe extern "C" fn ret<S: Copy + Default, E, R>(hit: *mut Hit) -> u32
    where
        R: Fn(&mut Hit, &mut S) -> Action,
    {
        // SAFETY: as in `entry`.
        let hit = unsafe { &mut *hit };
        // SAFETY: as above.
        let pair = unsafe { &*(hit.user_data as *const Pair<E, R>) };
        // SAFETY: as above.
        let mut s = unsafe { session::<S>(hit, false) }.map_or_else(S::default, |w| *w);
        (pair.1)(hit, &mut s) as u32
    }
    let raw = Box::into_raw(Box::new(Pair(on_entry, on_return)));
    let owner: Owner = Box::new(Owned(raw));
    let req = crate::consumer::AttachReq {
        addr,
        handler: entry::<S, E, R>,
        user_data: raw.cast(),
    };
    let opts = writer::Options {
        mode: Mode::Auto,
        on_return: Some(ret::<S, E, R>),
    };
    writer::attach_batch_with(&[req], &[opts], vec![Some(owner)])
        .map(|ids| Probe { id: ids[0] })
        .map_err(|(_, e)| e)
}

/// An attached closure that detaches (and waits for its handler) when
/// dropped.
#[derive(Debug)]
#[must_use = "dropping a Probe detaches it"]
pub struct Probe {
    id: ConsumerId,
}

impl Probe {
    /// The consumer handle.
    pub fn id(&self) -> ConsumerId {
        self.id
    }

    /// The consumer's statistics.
    pub fn stats(&self) -> Result<Stats> {
        stats(self.id)
    }

    /// Detaches now, reporting errors (dropping ignores them).
    pub fn detach(self) -> Result<()> {
        let id = self.id;
        std::mem::forget(self);
        detach(id)
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        // A handler that returned `Remove` already made the handle stale.
        let _ = detach(self.id);
    }
}

/// Attaches a closure and returns a guard that detaches it on drop.
///
/// # Safety
/// As [`attach_fn`].
pub unsafe fn probe<F>(addr: usize, f: F) -> Result<Probe>
where
    F: Fn(&mut Hit) -> Action + Send + Sync + 'static,
{
    // SAFETY: forwarded contract.
    unsafe { attach_fn(addr, f) }.map(|id| Probe { id })
}
